"""The generated bird set: deterministic bytes, CUB format, fine-grained by measurement, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from retrieval.data import generate
from retrieval.data.generate import GenerateConfig, class_list, make_dataset, render_bird, sample_scene
from retrieval.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = _tree(Path(make_dataset(GenerateConfig(tmp_path / "a", classes=4, per_class=3, size=64, seed=7)).root))
    b = _tree(Path(make_dataset(GenerateConfig(tmp_path / "b", classes=4, per_class=3, size=64, seed=7)).root))
    c = _tree(Path(make_dataset(GenerateConfig(tmp_path / "c", classes=4, per_class=3, size=64, seed=8)).root))
    assert a == b
    jpgs = [name for name in a if name.endswith(".jpg")]
    assert len(jpgs) == 12 and sorted(c) == sorted(a)
    assert all(a[name] != c[name] for name in jpgs)  # the seed changes every instance...
    assert a["classes.txt"] == c["classes.txt"]  # ...but not the class list


def test_counts_sizes_and_summary(tmp_path):
    cfg = GenerateConfig(tmp_path / "birds", classes=5, per_class=3, size=72, seed=1)
    summary = make_dataset(cfg)
    assert summary.to_json() == {"root": str(cfg.out_dir), "images": 15, "classes": 5, "train_classes": 2,
                                 "test_classes": 3, "size": 72, "seed": 1}
    assert summary.root == cfg.out_dir
    folders = sorted(p for p in (cfg.out_dir / "images").iterdir())
    assert len(folders) == 5 and all(len(list(f.glob("*.jpg"))) == 3 for f in folders)
    for jpg in (cfg.out_dir / "images").rglob("*.jpg"):
        with Image.open(jpg) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (72, 72))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["birds"]  # no temporary folder left behind


def test_files_are_cub_format(tmp_path):
    root = tmp_path / "birds"
    make_dataset(GenerateConfig(root, classes=4, per_class=4, size=64))
    images, labels, classes, split, boxes = (_rows(root / name) for name in TEXT_FILES)
    n = 16
    assert [int(r[0]) for r in images] == list(range(1, n + 1))
    for rows in (labels, split, boxes):
        assert [int(r[0]) for r in rows] == list(range(1, n + 1))
    assert [int(r[0]) for r in classes] == [1, 2, 3, 4]
    class_folder = {int(r[0]): r[1] for r in classes}
    assert all(re.fullmatch(rf"{i:03d}\.[A-Z][a-z]+(_[A-Z][a-z]+)+", name) for i, name in class_folder.items())
    assert len(set(class_folder.values())) == 4
    for (_image_id, rel), (_, class_id), (_, is_train), (_, *box) in zip(images, labels, split, boxes, strict=True):
        assert rel.split("/")[0] == class_folder[int(class_id)]
        assert (root / "images" / rel).is_file()
        assert is_train in ("0", "1")
        x, y, w, h = map(float, box)
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 + 1e-6 and y + h <= 64 + 1e-6
    per_class_train = {}
    for (_, class_id), (_, is_train) in zip(labels, split, strict=True):
        per_class_train.setdefault(class_id, []).append(int(is_train))
    assert all(sum(v) == 2 for v in per_class_train.values())  # half of each class is CUB's "training image"
    marker = json.loads((root / "generate.json").read_text())
    assert marker["config"] == {"classes": 4, "per_class": 4, "size": 64, "seed": 0}
    assert set(marker["class_attributes"]) == {"1", "2", "3", "4"}


def test_bounding_box_holds_the_bird(tmp_path):
    """The written box is where the bird is: on a flat background the pixels outside it are untouched."""
    scene = dataclasses.replace(sample_scene(np.random.default_rng(3)), clutter=0, perch=False,
                                bg_from=(200, 200, 200), bg_to=(200, 200, 200))
    image, (x, y, w, h) = render_bird(class_list(3)[2], scene, 96)
    a = np.asarray(image).astype(int)
    painted = np.argwhere(np.abs(a - 200).sum(axis=2) > 30)
    assert painted[:, 1].min() >= int(x) - 1 and painted[:, 1].max() <= x + w + 1
    assert painted[:, 0].min() >= int(y) - 1 and painted[:, 0].max() <= y + h + 1
    assert painted.size and w * h < 0.8 * 96 * 96


def test_read_back_with_cub_reader_class_disjoint(tmp_path):
    cub = pytest.importorskip("retrieval.data.cub")
    root = tmp_path / "birds"
    make_dataset(GenerateConfig(root, classes=6, per_class=2, size=48))
    records = cub.read_cub(root, crop=True)
    assert len(records) == 12
    assert sorted({r.label for r in records}) == list(range(6))
    train = {r.label for r in records if r.split == "train"}
    test = {r.label for r in records if r.split == "test"}
    assert train == {0, 1, 2} and test == {3, 4, 5} and not train & test
    names = {r.label: r.class_name for r in records}
    assert [names[i] for i in range(6)] == [f"{i + 1:03d}.{b.name}" for i, b in enumerate(class_list(6))]
    boxes = {int(r[0]): tuple(map(float, r[1:])) for r in _rows(root / "bounding_boxes.txt")}
    assert [r.bbox for r in records] == [boxes[i] for i in range(1, 13)]


def test_classes_differ_subtly_instances_differ_a_lot():
    """Changing one attribute under the same scene moves few pixels; a new scene for the same class moves many."""
    axes = [f.name for f in dataclasses.fields(generate.BirdClass)]
    attribute_change, instance_change = [], []
    for i, bird in enumerate(class_list(6)):
        scene = sample_scene(np.random.default_rng([11, i, 0]))
        image = np.asarray(render_bird(bird, scene, 64)[0], dtype=np.float32)
        other_scene = sample_scene(np.random.default_rng([11, i, 1]))
        instance_change.append(np.abs(image - np.asarray(render_bird(bird, other_scene, 64)[0], np.float32)).mean())
        for axis, values in zip(axes, generate._AXES, strict=True):
            variant = dataclasses.replace(bird, **{axis: (getattr(bird, axis) + 1) % len(values)})
            attribute_change.append(np.abs(image - np.asarray(render_bird(variant, scene, 64)[0], np.float32)).mean())
    assert min(attribute_change) > 0  # every attribute is visible
    assert max(attribute_change) < 0.2 * min(instance_change)


def test_raw_pixels_do_not_separate_classes(tmp_path):
    """Fine-grained in the data as written: same-class images are about as far apart as different-class ones."""
    root = tmp_path / "birds"
    make_dataset(GenerateConfig(root, classes=6, per_class=5, size=48, seed=2))
    labels = {int(i): int(c) for i, c in _rows(root / "image_class_labels.txt")}
    rows = _rows(root / "images.txt")
    x = np.stack([_pixels(root / "images" / rel).ravel() for _, rel in rows])
    y = np.array([labels[int(i)] for i, _ in rows])
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    assert dist[same].mean() > 0.9 * dist[y[:, None] != y[None, :]].mean()


def test_class_list_is_distinct_and_fixed():
    birds = class_list(generate.N_COMBINATIONS)
    assert len(set(birds)) == len({b.name for b in birds}) == generate.N_COMBINATIONS
    assert class_list(10) == birds[:10]
    with pytest.raises(ValueError):
        class_list(generate.N_COMBINATIONS + 1)


def test_reuses_a_matching_set_and_refuses_others(tmp_path):
    cfg = GenerateConfig(tmp_path / "birds", classes=2, per_class=2, size=40)
    first = make_dataset(cfg)
    before = {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")}
    assert make_dataset(cfg) == first
    assert {p: p.stat().st_mtime_ns for p in cfg.out_dir.rglob("*")} == before
    with pytest.raises(DataError, match="not a generated set with this config"):
        make_dataset(dataclasses.replace(cfg, seed=1))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError):
        make_dataset(GenerateConfig(other, classes=2, per_class=1, size=40))
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_dataset(GenerateConfig(empty, classes=2, per_class=1, size=40)).images == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["birds", "empty", "photos"]


@pytest.mark.parametrize("field,value", [("classes", 1), ("per_class", 0), ("size", 8), ("seed", -1)])
def test_bad_config_is_a_data_error(tmp_path, field, value):
    with pytest.raises(DataError, match=field.replace("_", "-")):
        make_dataset(dataclasses.replace(GenerateConfig(tmp_path / "x"), **{field: value}))
    assert not (tmp_path / "x").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return render(*args)

    render = generate.render_bird
    monkeypatch.setattr(generate, "render_bird", failing)
    with pytest.raises(DataError, match="disk full"):
        make_dataset(GenerateConfig(tmp_path / "birds", classes=2, per_class=2, size=40))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_killed_generation_never_leaves_a_partial_set(tmp_path):
    """A process killed mid-way leaves out_dir absent (only a stale temp folder), and a rerun succeeds."""
    out = tmp_path / "birds"
    code = f"from retrieval.data.generate import *; make_dataset(GenerateConfig({str(out)!r}, per_class=30))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until images are being written
            if any(tmp_path.glob(".birds.tmp-*/images/*/*.jpg")) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "generation finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not out.exists()
    assert make_dataset(GenerateConfig(out, classes=2, per_class=1, size=40)).images == 2


def test_default_dataset_dir_and_ensure(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCLE_RETRIEVAL_HOME", str(tmp_path / "home"))
    assert generate.default_dataset_dir() == tmp_path / "home" / f"birds-v{generate.GENERATOR_VERSION}"

    @dataclasses.dataclass(frozen=True)
    class TinyConfig(GenerateConfig):  # the real defaults take seconds; the logic is the same
        classes: int = 2
        per_class: int = 2
        size: int = 40

    monkeypatch.setattr(generate, "GenerateConfig", TinyConfig)
    root = generate.ensure_default_dataset()
    assert root == generate.default_dataset_dir() and (root / "generate.json").is_file()
    stamp = (root / "images.txt").stat().st_mtime_ns
    assert generate.ensure_default_dataset() == root
    assert (root / "images.txt").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_cli_make_dataset(tmp_path):
    out = tmp_path / "birds"
    result = CliRunner().invoke(cli, ["make-dataset", str(out), "--classes", "4", "--per-class", "3", "--size", "96",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary == {"root": str(out), "images": 12, "classes": 4, "train_classes": 2, "test_classes": 2,
                       "size": 96, "seed": 0}
    assert len(list((out / "images").rglob("*.jpg"))) == 12


def test_cli_make_dataset_bad_option_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["make-dataset", str(tmp_path / "x"), "--classes", "1"])
    assert result.exit_code == 1
    assert "--classes must be" in result.output and "Traceback" not in result.output
