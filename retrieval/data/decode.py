"""Safe image decoding, the one place where training, indexing and query turn bytes into RGB images.

Every failure (empty, truncated, not an image, too many pixels, exotic mode) becomes a DecodeError carrying
the path and a reason; nothing else escapes. Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False
(this module never sets it), so a truncated file is an error instead of a silently grey image.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DecodeError
from .records import BBox

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default Image.MAX_IMAGE_PIXELS
_ORIENTATION_TAG = 0x0112
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"}


def default_workers(device: str, *, minimum: int) -> int:
    """Decode worker processes for a DataLoader. On a GPU decoding is the bottleneck: one per CPU, at most 8.
    On the CPU every worker takes cores from the model, so one per 4 CPUs, and at least `minimum`: the
    indexer keeps 1 (a 1024x768 JPEG costs ~3.3 CPU-ms to read, decode and resize against ~34 to encode, and
    overlapping them pays), fine-tuning 0 (on 2 cores decoding in line cost 0-4.5% of the bare training rate,
    1 or 2 workers 7.6-12.6%; scripts/bench_finetune.py)."""
    cpus = os.cpu_count() or 1
    return max(minimum, min(8, cpus if str(device).startswith("cuda") else cpus // 4))


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image with EXIF orientation applied, possibly draft()-reduced and cropped."""

    image: Image.Image
    width: int  # original width after EXIF transpose, before draft reduction or crop
    height: int


def decode_image(
    data: bytes,
    *,
    name: str | Path,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bbox: BBox | None = None,
) -> DecodedImage:
    """Decode `data` to RGB; `name` is only used in errors.

    draft_size: smallest side wanted (of the bbox region when cropping); JPEGs decode at a reduced scale whose
    shorter side is still >= draft_size. max_pixels: cap on width * height, checked from the header before
    any pixel is decoded. Pillow's process-wide MAX_IMAGE_PIXELS still refuses above twice its value (89.5M
    by default): an entry point that takes a larger cap calls `allow_pixels` first.
    bbox: (x, y, w, h) in pixels of the EXIF-oriented original image.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and draft_size <= 0:
        raise ValueError(f"draft_size must be positive, got {draft_size}")
    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own cap replaces Pillow's warning below 2x its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
        stored_w, stored_h = img.size
        if stored_w * stored_h > max_pixels:
            raise DecodeError(name, _too_many_pixels(f"{stored_w}x{stored_h} = {stored_w * stored_h:,}", max_pixels))
        if draft_size is not None:
            short = min(bbox[2], bbox[3]) if bbox is not None else min(stored_w, stored_h)
            if short > 0:
                img.draft("RGB", (math.ceil(draft_size * stored_w / short), math.ceil(draft_size * stored_h / short)))
        img.load()
        rotated = img.getexif().get(_ORIENTATION_TAG, 1) in _ROTATED_ORIENTATIONS
        width, height = (stored_h, stored_w) if rotated else (stored_w, stored_h)
        img = ImageOps.exif_transpose(img)
        if bbox is not None:
            img = _crop(img, bbox, width, height, name)
        return DecodedImage(_to_rgb(img), width, height)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        pillow = Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels
        hint = " (Pillow's process-wide Image.MAX_IMAGE_PIXELS refused it first: see allow_pixels)" if pillow else ""
        raise DecodeError(name, _too_many_pixels(str(exc), max_pixels) + hint) from None
    except UnidentifiedImageError:
        raise DecodeError(name, "not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001 - malformed files raise many kinds (OSError, SyntaxError, struct.error...)
        raise DecodeError(name, f"cannot decode: {type(exc).__name__}: {exc}") from exc


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's process-wide MAX_IMAGE_PIXELS (never lower it) so it cannot undercut `max_pixels`.

    For entry points (the `index` command, a Ray decode task): a library call leaves that global alone.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_image(path: str | Path, **kwargs: Any) -> DecodedImage:
    """Read `path` and decode it with `decode_image` (same keyword arguments); unreadable -> DecodeError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(path, f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, name=path, **kwargs)


def _too_many_pixels(detail: str, max_pixels: int) -> str:
    return f"too many pixels ({detail}); the cap is max_pixels={max_pixels:,} (raise it to accept larger images)"


def _crop(img: Image.Image, bbox: BBox, width: int, height: int, name: str | Path) -> Image.Image:
    """Crop the bbox, given in original-size coordinates, from a possibly draft-reduced image."""
    x, y, w, h = bbox
    fx, fy = img.width / width, img.height / height
    left, top = max(0, math.floor(x * fx)), max(0, math.floor(y * fy))
    right, bottom = min(img.width, math.ceil((x + w) * fx)), min(img.height, math.ceil((y + h) * fy))
    if right <= left or bottom <= top:
        raise DecodeError(name, f"bbox {bbox} lies outside the {width}x{height} image")
    return img.crop((left, top, right, bottom))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, 16-bit scaled to 8-bit, CMYK/palette/grey converted."""
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.rint(np.clip(np.asarray(img), 0, 255)).astype(np.uint8)).convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img if img.mode == "RGB" else img.convert("RGB")
