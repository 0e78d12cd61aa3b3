"""The embedded default data set: stylised birds drawn with PIL, written in CUB-200-2011 format.

Why it exists: every command needs *some* fine-grained data to run on a fresh machine with no
downloads. The set is fine-grained on purpose: all classes are the same small blue bird and differ
only in a few subtle attributes (body shade within one hue family, wing-bar pattern, beak length,
tail length, eye ring, crest, a small mark), while images of one class vary far more in pose,
scale, position, background clutter, lighting, blur and JPEG quality. Raw pixels therefore barely
separate the classes; an encoder has to learn the attributes.

Everything is deterministic: the class list is a fixed enumeration of attribute combinations, and
each image draws its nuisance parameters from a NumPy generator seeded by (seed, class, image), so
the same config gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retrieval.errors import DataError
from retrieval.files import atomic_dir

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the drawing changes, so cached sets are not silently reused
MARKER = "generate.json"
SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing

# Attribute values, in the order `BirdClass` fields use them. An empty word leaves it out of the name.
SHADES = {  # one hue family (blue); (hue, saturation, value)
    "Azure": (0.57, 0.60, 0.85),
    "Steel": (0.58, 0.45, 0.72),
    "Cobalt": (0.61, 0.75, 0.66),
    "Slate": (0.59, 0.33, 0.56),
}
WINGS = ("Plainwinged", "Barred", "Doublebarred", "Spotted")
BEAKS = {"Stubbill": 0.09, "Longbill": 0.21}  # beak length, in body units
TAILS = {"Shorttailed": 0.17, "Longtailed": 0.40}  # tail length, in body units
EYE_RINGS = {"": None, "Whiteringed": (245, 245, 240), "Goldringed": (240, 190, 40)}
CRESTS = ("", "Crested")
MARKS = ("", "Bibbed", "Redcheeked")

_AXES = (tuple(SHADES), WINGS, tuple(BEAKS), tuple(TAILS), tuple(EYE_RINGS), CRESTS, MARKS)
N_COMBINATIONS = math.prod(len(axis) for axis in _AXES)  # 1152
# A stride coprime with N_COMBINATIONS, so class i -> combination (i * _STRIDE) % N is one-to-one; chosen so
# each half of the first 40 classes (train and test) holds every attribute value about equally often (±1).
_STRIDE = 349


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate and where. `seed` changes the instances, not the class list."""

    out_dir: Path
    classes: int = 40
    per_class: int = 30
    size: int = 160
    seed: int = 0


@dataclass(frozen=True)
class BirdClass:
    """One fine-grained class: an index into each attribute axis (see the module constants)."""

    shade: int
    wing: int
    beak: int
    tail: int
    eye_ring: int
    crest: int
    mark: int

    def words(self) -> list[str]:
        """The attribute words, in field order ("" where an optional attribute is absent)."""
        return [axis[v] for axis, v in zip(_AXES, astuple(self), strict=True)]

    @property
    def name(self) -> str:
        """E.g. "Azure_Crested_Goldringed_Bibbed_Barred_Longtailed_Stubbill" (unique per class)."""
        shade, wing, beak, tail, ring, crest, mark = self.words()
        return "_".join(w for w in (shade, crest, ring, mark, wing, tail, beak) if w)


@dataclass(frozen=True)
class Scene:
    """Per-image nuisance parameters: everything that varies *within* a class."""

    angle: float  # degrees, counter-clockwise
    flip: bool  # bird faces left instead of right
    scale: float  # one body unit, as a fraction of the image side
    cx: float  # bird centre, fractions of the image side
    cy: float
    plump: float  # body height factor
    stretch: float  # beak and tail length factor (much smaller than the class difference)
    wing_tilt: float  # degrees
    bg_from: tuple[int, int, int]
    bg_to: tuple[int, int, int]
    bg_angle: float  # gradient direction, radians
    clutter: int  # number of background shapes
    clutter_seed: int
    perch: bool
    brightness: float
    contrast: float
    cast: tuple[float, float, float]  # per-channel gain
    noise: float  # grain, standard deviation in grey levels
    blur: float  # Gaussian radius in pixels
    quality: int  # JPEG quality


def class_list(n: int) -> list[BirdClass]:
    """The first `n` classes: distinct attribute combinations, spread evenly over every attribute."""
    if not 1 <= n <= N_COMBINATIONS:
        raise ValueError(f"n must be in 1..{N_COMBINATIONS}, got {n}")
    combos = list(itertools.product(*(range(len(axis)) for axis in _AXES)))
    return [BirdClass(*combos[(i * _STRIDE) % N_COMBINATIONS]) for i in range(n)]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(v, 1.0))
    return round(255 * r), round(255 * g), round(255 * b)


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw the nuisance parameters of one image (a fixed number of draws, whatever the class)."""
    scale = rng.uniform(0.34, 0.60)
    slack_x = max(0.0, 0.48 - 0.68 * scale)
    slack_y = max(0.0, 0.48 - 0.55 * scale)
    hues = rng.uniform(0.0, 1.0, 2)
    return Scene(
        angle=float(rng.uniform(-25, 25)),
        flip=bool(rng.random() < 0.5),
        scale=float(scale),
        cx=float(0.5 + rng.uniform(-slack_x, slack_x)),
        cy=float(0.5 + rng.uniform(-slack_y, slack_y)),
        plump=float(rng.uniform(0.9, 1.1)),
        stretch=float(rng.uniform(0.9, 1.1)),
        wing_tilt=float(rng.uniform(-12, 12)),
        bg_from=_rgb(hues[0], rng.uniform(0.1, 0.6), rng.uniform(0.45, 0.95)),
        bg_to=_rgb(hues[1], rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)),
        bg_angle=float(rng.uniform(0, 2 * math.pi)),
        clutter=int(rng.integers(2, 11)),
        clutter_seed=int(rng.integers(0, 2**31)),
        perch=bool(rng.random() < 0.5),
        brightness=float(rng.uniform(0.7, 1.3)),
        contrast=float(rng.uniform(0.7, 1.25)),
        cast=_triple(rng.uniform(0.88, 1.12, 3)),
        noise=float(rng.uniform(0, 10)),
        blur=float(rng.uniform(0, 1.2)),
        quality=int(rng.integers(40, 96)),
    )


# --- drawing -------------------------------------------------------------------------------------


def _in_frame(points: np.ndarray, cx: float, cy: float, tilt_deg: float) -> np.ndarray:
    """Points given in a part's own frame (centred, untilted) -> bird units."""
    a = math.radians(tilt_deg)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rotation.T + np.array([cx, cy])


def _ellipse(cx: float, cy: float, rx: float, ry: float, tilt_deg: float = 0.0, n: int = 24) -> np.ndarray:
    """An ellipse as an (n, 2) polygon in bird units, so it rotates with the bird."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return _in_frame(np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1), cx, cy, tilt_deg)


def _bird_parts(bird: BirdClass, scene: Scene) -> tuple[list[tuple[np.ndarray, tuple[int, int, int]]], list]:
    """Coloured polygons (bird units, facing +x, y down) back to front, and leg segments."""
    shade, wing, beak_word, tail_word, ring, crest, mark = bird.words()
    h, s, v = SHADES[shade]
    body_rgb = _rgb(h, s, v)
    wing_rgb = _rgb(h, s * 1.05, v * 0.72)
    belly_rgb = _rgb(h, s * 0.4, min(1.0, v * 1.12))
    pale = (236, 234, 222)
    ry = 0.2 * scene.plump
    tail = TAILS[tail_word] * scene.stretch
    beak = BEAKS[beak_word] * scene.stretch
    wing_tilt = -12 + scene.wing_tilt

    parts = [
        (np.array([[-0.24, -0.04], [-0.24 - tail, -0.09], [-0.24 - tail, 0.08], [-0.24, 0.06]]), wing_rgb),
        (_ellipse(0.0, 0.0, 0.32, ry, -8), body_rgb),
        (_ellipse(0.04, 0.06 * scene.plump, 0.24, 0.11 * scene.plump, -8), belly_rgb),
        (_ellipse(-0.06, -0.03, 0.24, 0.105, wing_tilt), wing_rgb),
    ]

    for u in {"Barred": (0.0,), "Doublebarred": (-0.07, 0.07)}.get(wing, ()):  # pale bands across the wing
        half = 0.105 * math.sqrt(1 - (u / 0.24) ** 2) * 0.85
        band = np.array([[u - 0.022, -half], [u + 0.022, -half], [u + 0.022, half], [u - 0.022, half]])
        parts.append((_in_frame(band, -0.06, -0.03, wing_tilt), pale))
    if wing == "Spotted":
        for u, w in ((-0.12, -0.03), (-0.04, 0.03), (0.04, -0.03), (0.12, 0.02), (-0.15, 0.04)):
            parts.append((_in_frame(_ellipse(u, w, 0.022, 0.022, n=8), -0.06, -0.03, wing_tilt), pale))

    if crest:
        parts.append((np.array([[0.38, -0.27], [0.24, -0.41], [0.27, -0.34], [0.12, -0.38], [0.24, -0.25]]), body_rgb))
    parts.append((_ellipse(0.33, -0.17, 0.13, 0.13), body_rgb))
    parts.append((np.array([[0.44, -0.205], [0.44 + beak, -0.165], [0.44, -0.125]]), (70, 60, 50)))
    if mark == "Bibbed":
        parts.append((_ellipse(0.39, -0.07, 0.05, 0.035, -20), (35, 35, 40)))
    elif mark == "Redcheeked":
        parts.append((_ellipse(0.31, -0.125, 0.032, 0.032, n=12), (205, 40, 40)))
    ring_rgb = EYE_RINGS[ring]
    if ring_rgb is not None:
        parts.append((_ellipse(0.375, -0.195, 0.045, 0.045, n=12), ring_rgb))
    parts.append((_ellipse(0.375, -0.195, 0.025, 0.025, n=10), (15, 15, 20)))

    legs = [np.array([[0.0, 0.17], [-0.02, 0.33]]), np.array([[0.07, 0.16], [0.07, 0.33]])]
    return parts, legs


def _to_pixels(scene: Scene, side: int) -> Callable[[np.ndarray], list[tuple[float, float]]]:
    """The affine map bird units -> pixel coordinates on a canvas of `side` pixels."""
    a = math.radians(scene.angle)
    k = scene.scale * side
    cos_a, sin_a = math.cos(a) * k, math.sin(a) * k
    sx = -1.0 if scene.flip else 1.0

    def apply(points: np.ndarray) -> list[tuple[float, float]]:
        x, y = points[:, 0] * sx, points[:, 1]
        px = scene.cx * side + x * cos_a + y * sin_a
        py = scene.cy * side - x * sin_a + y * cos_a
        return list(zip(px.tolist(), py.tolist(), strict=True))

    return apply


def _background(scene: Scene, side: int) -> Image.Image:
    """A linear colour gradient plus random blobs, leaves and twigs (drawn from `clutter_seed`)."""
    t = np.linspace(-1.0, 1.0, 16, dtype=np.float32)  # a linear ramp: computing it small and resizing is exact enough
    ramp = (t[None, :] * math.cos(scene.bg_angle) + t[:, None] * math.sin(scene.bg_angle)) * 0.5 + 0.5
    c0, c1 = np.array(scene.bg_from, np.float32), np.array(scene.bg_to, np.float32)
    pixels = c0 + (c1 - c0) * ramp[..., None]
    canvas = Image.fromarray(pixels.round().astype(np.uint8), "RGB").resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    rng = np.random.default_rng(scene.clutter_seed)
    for _ in range(scene.clutter):
        kind = rng.integers(0, 3)
        colour = _rgb(rng.uniform(0, 1), rng.uniform(0.15, 0.7), rng.uniform(0.25, 0.9))
        x, y = rng.uniform(-0.1, 1.1, 2) * side
        r = rng.uniform(0.04, 0.2) * side
        if kind == 0:  # blob
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1.0), x + r, y + r * rng.uniform(0.4, 1.0)], fill=colour)
        elif kind == 1:  # leaf
            a = rng.uniform(0, math.pi)
            dx, dy = math.cos(a) * r, math.sin(a) * r
            w = r * 0.35
            draw.polygon([(x - dx, y - dy), (x - dy * w / r, y + dx * w / r), (x + dx, y + dy),
                          (x + dy * w / r, y - dx * w / r)], fill=colour)
        else:  # twig
            x2, y2 = rng.uniform(-0.1, 1.1, 2) * side
            draw.line([(x, y), (x2, y2)], fill=colour, width=max(1, int(r * 0.15)))
    return canvas


def render_bird(bird: BirdClass, scene: Scene, size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Draw one image before lighting and encoding; returns it and the bird's box (x, y, w, h)."""
    side = size * SUPERSAMPLE
    canvas = _background(scene, side)
    draw = ImageDraw.Draw(canvas)
    to_px = _to_pixels(scene, side)
    if scene.perch:
        branch = to_px(np.array([[-0.7, 0.34], [0.7, 0.36]]))
        draw.line(branch, fill=(96, 72, 48), width=max(2, int(0.05 * scene.scale * side)))
    parts, legs = _bird_parts(bird, scene)
    for leg in legs:
        draw.line(to_px(leg), fill=(90, 70, 60), width=max(1, int(0.025 * scene.scale * side)))
    for polygon, colour in parts:
        draw.polygon(to_px(polygon), fill=colour)
    xy = np.array([p for polygon, _ in parts for p in to_px(polygon)] + [p for leg in legs for p in to_px(leg)])
    x0, y0 = np.clip(xy.min(axis=0) / SUPERSAMPLE, 0, size)
    x1, y1 = np.clip(xy.max(axis=0) / SUPERSAMPLE, 0, size)
    box = (round(float(x0), 1), round(float(y0), 1), round(float(x1 - x0), 1), round(float(y1 - y0), 1))
    return canvas.reduce(SUPERSAMPLE), box


def photograph(image: Image.Image, scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Lighting (brightness, contrast, colour cast), grain and blur: the camera's share of the variation."""
    x = np.asarray(image, dtype=np.float32)
    x = ((x - 128.0) * scene.contrast + 128.0) * scene.brightness * np.array(scene.cast, np.float32)
    x += rng.standard_normal(x.shape, dtype=np.float32) * scene.noise
    out = Image.fromarray(x.clip(0, 255).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(scene.blur)) if scene.blur > 0.2 else out


def _image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, class_index, image_index])


# --- writing -------------------------------------------------------------------------------------


def _validate(cfg: GenerateConfig) -> None:
    problems = []
    if not 2 <= cfg.classes <= N_COMBINATIONS:
        problems.append(f"--classes must be 2..{N_COMBINATIONS} (a train and a test half), got {cfg.classes}")
    if cfg.per_class < 1:
        problems.append(f"--per-class must be >= 1, got {cfg.per_class}")
    if not 32 <= cfg.size <= 2048:
        problems.append(f"--size must be 32..2048 pixels, got {cfg.size}")
    if cfg.seed < 0:
        problems.append(f"--seed must be >= 0, got {cfg.seed}")
    if problems:
        raise DataError(cfg.out_dir, "; ".join(problems))


def _marker(cfg: GenerateConfig) -> dict:
    params = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    return {"generator": "circle-retrieval birds", "version": GENERATOR_VERSION, "config": params}


@dataclass(frozen=True)
class GeneratedSet:
    """What `make_dataset` wrote (or found already there): a CUB-format set at `root`."""

    root: Path
    images: int
    classes: int
    train_classes: int
    test_classes: int
    size: int
    seed: int

    def to_json(self) -> dict:
        """The `make-dataset --json` object."""
        return {**asdict(self), "root": str(self.root)}


def _summary(cfg: GenerateConfig) -> GeneratedSet:
    train = cfg.classes // 2
    return GeneratedSet(root=Path(cfg.out_dir), images=cfg.classes * cfg.per_class, classes=cfg.classes,
                        train_classes=train, test_classes=cfg.classes - train, size=cfg.size, seed=cfg.seed)


def _is_generated_with(out_dir: Path, cfg: GenerateConfig) -> bool:
    """True when `out_dir` is a complete set made with this config (the marker is written last)."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker(cfg)
    return all(marker.get(key) == expected[key] for key in expected)


def _write_set(cfg: GenerateConfig, root: Path) -> None:
    """Write every image and the CUB text files into `root` (an empty directory)."""
    birds = class_list(cfg.classes)
    images: list[str] = []
    labels: list[str] = []
    split: list[str] = []
    boxes: list[str] = []
    class_lines: list[str] = []
    for c, bird in enumerate(birds):
        folder = f"{c + 1:03d}.{bird.name}"
        class_lines.append(f"{c + 1} {folder}")
        (root / "images" / folder).mkdir(parents=True)
        for j in range(cfg.per_class):
            rng = _image_rng(cfg.seed, c, j)
            scene = sample_scene(rng)
            image, box = render_bird(bird, scene, cfg.size)
            relpath = f"{folder}/{bird.name}_{j + 1:04d}.jpg"
            photograph(image, scene, rng).save(
                root / "images" / relpath, "JPEG",
                quality=scene.quality, subsampling=2, optimize=False, progressive=False,
            )
            image_id = len(images) + 1
            images.append(f"{image_id} {relpath}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if j % 2 == 0 else 0}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", class_lines),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)):
        (root / name).write_text("\n".join(lines) + "\n")
    axes = [f.name for f in fields(BirdClass)]
    attributes = {f"{c + 1}": dict(zip(axes, b.words(), strict=True)) for c, b in enumerate(birds)}
    (root / MARKER).write_text(json.dumps({**_marker(cfg), "class_attributes": attributes}, indent=1) + "\n")


def make_dataset(cfg: GenerateConfig) -> GeneratedSet:
    """Generate the bird set into `cfg.out_dir` atomically and return its summary.

    The set is built in a temporary folder beside `out_dir`, flushed to disk and renamed into place
    (retrieval.files.atomic_dir), so `out_dir` is either absent or complete, even after a power cut.
    An existing complete set with the same config is reused as is; any other non-empty `out_dir` is an
    error (nothing is overwritten).
    """
    _validate(cfg)
    out_dir = Path(cfg.out_dir)
    if out_dir.exists():
        if _is_generated_with(out_dir, cfg):
            logger.info("reusing generated set at %s", out_dir)
            return _summary(cfg)
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise DataError(out_dir, "exists and is not a generated set with this config; pass an empty or new folder")
    start = time.perf_counter()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir) as tmp:
            _write_set(cfg, tmp)
    except OSError as exc:
        if not _is_generated_with(out_dir, cfg):  # else another process finished first (several ranks on first use)
            raise DataError(out_dir, f"cannot write the generated set: {exc}") from exc
    seconds = time.perf_counter() - start
    logger.info("generated %d images in %.1f s at %s", cfg.classes * cfg.per_class, seconds, out_dir)
    return _summary(cfg)


def default_dataset_dir() -> Path:
    """Where the default set lives: $CIRCLE_RETRIEVAL_HOME, else ~/.cache/circle-retrieval, per generator version."""
    home = os.environ.get("CIRCLE_RETRIEVAL_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "circle-retrieval"
    return base / f"birds-v{GENERATOR_VERSION}"


def ensure_default_dataset() -> Path:
    """The default set (GenerateConfig defaults), generated on first use; returns its root."""
    cfg = GenerateConfig(out_dir=default_dataset_dir())
    make_dataset(cfg)
    return cfg.out_dir
