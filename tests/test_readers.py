"""Readers on fixture trees written in each data set's exact on-disk format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from retrieval.data import DATASETS, load_records, split_records
from retrieval.data.cars import read_cars
from retrieval.data.cub import read_cub
from retrieval.data.dataset import ImageDataset
from retrieval.data.folder import read_folder
from retrieval.data.records import Record, carve_validation, train_class_count
from retrieval.data.sop import read_sop
from retrieval.errors import DataError, RetrievalError


def _jpeg_bytes(size: tuple[int, int] = (8, 8), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _check_split(records: list[Record]) -> None:
    """Labels dense from 0, and no class in both splits."""
    labels = {r.label for r in records}
    assert labels == set(range(len(labels)))
    train = {r.label for r in records if r.split == "train"}
    test = {r.label for r in records if r.split == "test"}
    assert train and test and not train & test and train | test == labels


# ---------------------------------------------------------------- CUB-200-2011

def make_cub(root: Path, n_classes: int = 4, per_class: int = 3, *, boxes: bool = False) -> Path:
    """CUB-200-2011 layout; image ids interleave the classes, as a reader must not rely on order."""
    classes = [f"{c:03d}.Bird_number_{c}" for c in range(1, n_classes + 1)]
    images, labels, split, bboxes = [], [], [], []
    for i in range(per_class):
        for c, name in enumerate(classes, 1):
            image_id = len(images) + 1
            rel = f"{name}/{name[4:]}_{i:04d}_{image_id}.jpg"
            _write(root / "images" / rel, JPEG)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {i % 2}")
            bboxes.append(f"{image_id} 1.0 2.0 5.0 4.0")
    _write(root / "classes.txt", "".join(f"{c} {name}\n" for c, name in enumerate(classes, 1)))
    for name, lines in [("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split)]:
        _write(root / name, "\n".join(lines) + "\n")
    if boxes:
        _write(root / "bounding_boxes.txt", "\n".join(bboxes) + "\n")
    return root


def test_cub_reads_labels_names_and_split(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    records = read_cub(root)
    assert len(records) == 12
    lines = (root / "images.txt").read_text().splitlines()
    for record, line in zip(records, lines, strict=True):  # images.txt order, absolute existing paths
        image_id, rel = line.split()
        assert record.path == root / "images" / rel and record.path.is_absolute() and record.path.is_file()
        class_id = int(rel[:3])
        assert record.label == class_id - 1 and record.class_name == rel.split("/")[0]
        assert record.split == ("train" if class_id <= 2 else "test") and record.bbox is None
    _check_split(records)


@pytest.mark.parametrize("n_classes, n_train", [(200, 100), (5, 2), (41, 20), (2, 1)])
def test_cub_split_is_first_half_of_class_ids(tmp_path, n_classes, n_train):
    records = read_cub(make_cub(tmp_path, n_classes, 1))
    assert sorted({r.label for r in records if r.split == "train"}) == list(range(n_train))
    assert train_class_count(n_classes) == n_train
    _check_split(records)


def test_cub_crop_attaches_boxes(tmp_path):
    records = read_cub(make_cub(tmp_path, boxes=True), crop=True)
    assert {r.bbox for r in records} == {(1.0, 2.0, 5.0, 4.0)}
    dataset = ImageDataset(records, lambda img: torch.tensor(img.size), draft_size=None)
    size, label, index = dataset[4]
    assert size.tolist() == [5, 4] and label == records[4].label and index == 4
    assert dataset.labels == [r.label for r in records]


def test_cub_crop_without_boxes_file(tmp_path):
    root = make_cub(tmp_path)
    with pytest.raises(DataError) as info:
        read_cub(root, crop=True)
    assert info.value.path == root / "bounding_boxes.txt" and "not found" in info.value.reason


@pytest.mark.parametrize(
    "filename, line_no, new_line, reason",
    [
        ("images.txt", 3, "3", "expected 2 fields"),
        ("images.txt", 2, "two 002.Bird_number_2/x.jpg", "image_id must be an integer"),
        ("images.txt", 5, "1 001.Bird_number_1/Bird_number_1_0000_1.jpg", "duplicate image_id 1"),
        ("images.txt", 4, "4 004.Bird_number_4/missing.jpg", "not found"),
        ("image_class_labels.txt", 6, "6 x", "class_id must be an integer"),
        ("image_class_labels.txt", 7, "7 9", "class_id 9 is not in classes.txt"),
        ("classes.txt", 2, "2", "expected 2 fields"),
        ("bounding_boxes.txt", 8, "8 1 2 0 4", "must be positive"),
        ("bounding_boxes.txt", 9, "9 1 2 nan 4", "finite number"),
    ],
)
def test_cub_malformed_line_names_file_and_line(tmp_path, filename, line_no, new_line, reason):
    root = make_cub(tmp_path, boxes=True)
    lines = (root / filename).read_text().splitlines()
    lines[line_no - 1] = new_line
    (root / filename).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=reason) as info:
        read_cub(root, crop=True)
    assert info.value.path == root / filename and info.value.line == line_no
    assert f"{filename}:{line_no}: " in str(info.value)


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "classes.txt", "images", ""])
def test_cub_missing_file_or_dir(tmp_path, missing):
    root = make_cub(tmp_path / "cub")
    target = root / missing
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DataError, match="not found") as info:
        read_cub(root)
    assert info.value.path == target


def test_cub_image_without_label(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="no class for image_id 12"):
        read_cub(root)


# ---------------------------------------------------------------- Cars196

_CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "relative_im_path", "class", "test")


def make_cars(root: Path, n_classes: int = 4, per_class: int = 2, *, names: bool = True,
              fields: tuple[str, ...] = _CARS_FIELDS, classes: list[int] | None = None) -> Path:
    """cars_annos.mat as the real one loads: a 1 x N struct array of 1x1 / 1-string cells, plus class_names."""
    class_ids = classes or [c for i in range(per_class) for c in range(1, n_classes + 1)]
    annotations = np.zeros((1, len(class_ids)), dtype=[(f, "O") for f in fields])
    for i, class_id in enumerate(class_ids):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _write(root / rel, JPEG)
        values = {"bbox_x1": np.array([[1]], np.uint8), "bbox_y1": np.array([[2]], np.uint8),
                  "bbox_x2": np.array([[7]], np.uint16), "bbox_y2": np.array([[6]], np.uint16),
                  "relative_im_path": np.array([rel]), "class": np.array([[class_id]], np.uint8),
                  "test": np.array([[i % 2]], np.uint8)}
        annotations[0, i] = tuple(values[f] for f in fields)
    contents = {"annotations": annotations}
    if names:
        class_names = np.empty((1, n_classes), dtype=object)
        for c in range(n_classes):
            class_names[0, c] = np.array([f"Maker Model {c + 1} Sedan 2012"])
        contents["class_names"] = class_names
    scipy.io.savemat(str(root / "cars_annos.mat"), contents)
    return root


def test_cars_mat_fixture_matches_real_layout(tmp_path):
    mat = scipy.io.loadmat(str(make_cars(tmp_path) / "cars_annos.mat"))
    first = mat["annotations"][0][0]  # how papers' loaders index the real file
    assert first["relative_im_path"][0] == "car_ims/000001.jpg" and first["class"][0][0] == 1
    assert mat["class_names"][0][1][0] == "Maker Model 2 Sedan 2012"


def test_cars_reads_labels_names_and_split(tmp_path):
    root = make_cars(tmp_path)
    records = read_cars(root)
    assert len(records) == 8
    for i, record in enumerate(records):
        class_id = i % 4 + 1
        assert record.path == root / f"car_ims/{i + 1:06d}.jpg" and record.path.is_file()
        assert record.label == class_id - 1 and record.class_name == f"Maker Model {class_id} Sedan 2012"
        assert record.split == ("train" if class_id <= 2 else "test")  # the mat's `test` flag is ignored
    _check_split(records)


def test_cars_196_classes_split_98_98(tmp_path):
    records = read_cars(make_cars(tmp_path, 196, 1, names=False))
    assert {r.class_name for r in records if r.label == 97} == {"class_098"}
    assert sorted({r.label for r in records if r.split == "train"}) == list(range(98))
    _check_split(records)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"fields": ("relative_im_path", "test")}, "lacks the field"),
        ({"classes": [1, 2, 0, 3]}, "annotation 3 .*bad class 0"),
        ({"classes": [1, 2, 3, 9]}, "annotation 4 .*bad class 9"),  # beyond class_names
    ],
)
def test_cars_malformed_annotations(tmp_path, kwargs, reason):
    root = make_cars(tmp_path, **kwargs)
    with pytest.raises(DataError, match=reason) as info:
        read_cars(root)
    assert info.value.path == root / "cars_annos.mat"


def test_cars_bad_or_missing_files(tmp_path):
    root = make_cars(tmp_path)
    (root / "car_ims/000005.jpg").unlink()
    with pytest.raises(DataError, match="annotation 5: image 'car_ims/000005.jpg' not found"):
        read_cars(root)
    scipy.io.savemat(str(root / "cars_annos.mat"), {"class_names": np.array(["x"], dtype=object)})
    with pytest.raises(DataError, match="no 'annotations'"):
        read_cars(root)
    (root / "cars_annos.mat").write_text("not a mat file\n")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        read_cars(root)
    (root / "cars_annos.mat").unlink()
    with pytest.raises(DataError, match="not found"):
        read_cars(root)


# ---------------------------------------------------------------- Stanford Online Products

_SOP_HEADER = "image_id class_id super_class_id path"


def make_sop(root: Path, train_classes=(1, 2), test_classes=(3, 4), per_class: int = 2) -> Path:
    """Ebay_train.txt / Ebay_test.txt with the real header; paths under super-class folders."""
    image_id = 0
    for filename, classes in [("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)]:
        lines = [_SOP_HEADER]
        for class_id in classes:
            for i in range(per_class):
                image_id += 1
                super_id = class_id % 2 + 1
                rel = f"{['bicycle', 'chair'][super_id - 1]}_final/{111085122870 + class_id}_{i}.JPG"
                _write(root / rel, JPEG)
                lines.append(f"{image_id} {class_id} {super_id} {rel}")
        _write(root / filename, "\n".join(lines) + "\n")
    return root


def test_sop_split_by_file_and_dense_labels(tmp_path):
    root = make_sop(tmp_path, train_classes=(1, 5, 2), test_classes=(11, 7))
    records = read_sop(root)
    assert [r.split for r in records] == ["train"] * 6 + ["test"] * 4
    assert [r.label for r in records] == [0, 0, 2, 2, 1, 1, 4, 4, 3, 3]  # order of class id: 1 2 5 7 11
    assert records[0].path == root / "chair_final/111085122871_0.JPG" and records[0].class_name == "chair_final/1"
    _check_split(records)


@pytest.mark.parametrize(
    "filename, line_no, new_line, reason",
    [
        ("Ebay_train.txt", 1, "id class super path", "first line must be the header"),
        ("Ebay_train.txt", 3, "2 1 2", "expected 4 fields"),
        ("Ebay_train.txt", 2, "1 1 two chair_final/111085122871_0.JPG", "super_class_id must be an integer"),
        ("Ebay_test.txt", 2, "5 x 2 chair_final/111085122873_0.JPG", "class_id must be an integer"),
        ("Ebay_test.txt", 3, "6 1 2 chair_final/111085122871_0.JPG", "class_id 1 is also in Ebay_train.txt"),
        ("Ebay_test.txt", 4, "7 4 1 bicycle_final/nothing.JPG", "not found"),
    ],
)
def test_sop_malformed_line_names_file_and_line(tmp_path, filename, line_no, new_line, reason):
    root = make_sop(tmp_path)
    lines = (root / filename).read_text().splitlines()
    lines[line_no - 1] = new_line
    (root / filename).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=reason) as info:
        read_sop(root)
    assert info.value.path == root / filename and info.value.line == line_no


def test_sop_missing_file(tmp_path):
    root = make_sop(tmp_path)
    (root / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match="not found") as info:
        read_sop(root)
    assert info.value.path == root / "Ebay_test.txt"


# ---------------------------------------------------------------- folder tree

def make_folder(root: Path) -> Path:
    for rel in ["b_cls/x.jpg", "a_cls/z.jpg", "a_cls/sub/deeper/y.png", "c_cls/one.jpeg", "c_cls/two.JPG",
                "d_cls/p/q.jpg", ".hidden/h.jpg", "a_cls/.cache/w.jpg", "a_cls/.dot.jpg"]:
        _write(root / rel, JPEG)
    _write(root / "a_cls/readme.txt", "not an image")
    _write(root / "e_no_images/readme.txt", "no images here")
    _write(root / "loose.jpg", JPEG)
    return root


@pytest.mark.parametrize("fraction, train_names", [(0.5, {"a_cls", "b_cls"}), (0.75, {"a_cls", "b_cls", "c_cls"}),
                                                    (0.1, {"a_cls"}), (0.95, {"a_cls", "b_cls", "c_cls"})])
def test_folder_classes_split_and_depth(tmp_path, fraction, train_names):
    root = make_folder(tmp_path)
    records = read_folder(root, train_fraction=fraction)
    assert [r.path.relative_to(root).as_posix() for r in records] == [
        "a_cls/sub/deeper/y.png", "a_cls/z.jpg", "b_cls/x.jpg", "c_cls/one.jpeg", "c_cls/two.JPG", "d_cls/p/q.jpg"]
    assert [r.label for r in records] == [0, 0, 1, 2, 2, 3]
    assert {r.class_name for r in records if r.split == "train"} == train_names
    _check_split(records)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        read_folder(tmp_path / "nowhere")
    _write(tmp_path / "only/a.jpg", JPEG)
    with pytest.raises(DataError, match="at least 2 class sub-folders"):
        read_folder(tmp_path)
    _write(tmp_path / "other/b.jpg", JPEG)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        read_folder(tmp_path, train_fraction=1.0)


# ---------------------------------------------------------------- front door

def test_load_and_split_records(tmp_path):
    roots = {"cub": make_cub(tmp_path / "cub"), "cars": make_cars(tmp_path / "cars"),
             "sop": make_sop(tmp_path / "sop"), "folder": make_folder(tmp_path / "folder")}
    assert set(roots) == set(DATASETS)
    for name, root in roots.items():
        records = load_records(name, root)
        train, test = split_records(records, "train"), split_records(records, "test")
        assert train and test and len(train) + len(test) == len(records)
        assert {r.split for r in train} == {"train"} and not {r.label for r in train} & {r.label for r in test}
    with pytest.raises(RetrievalError, match="unknown dataset"):
        load_records("imagenet", tmp_path)
    with pytest.raises(RetrievalError, match="only the cub format"):
        load_records("cars", roots["cars"], crop=True)
    with pytest.raises(RetrievalError, match="unknown split"):
        split_records([], "val")


def test_validation_split_is_class_disjoint_from_train_and_test_and_deterministic(tmp_path):
    records = [Record(Path(f"/d/{c}/{i}.jpg"), c, f"class{c}", "train" if c < 20 else "test")
               for c in range(40) for i in range(3)]
    train, test = split_records(records, "train"), split_records(records, "test")
    kept, val = carve_validation(train, 0.2, seed=0)
    classes = lambda rs: {r.label for r in rs}  # noqa: E731
    assert len(classes(val)) == 4 and len(classes(kept)) == 16            # round(0.2 * 20) whole classes
    assert not classes(val) & classes(kept) and not classes(val) & classes(test)
    assert sorted(kept + val, key=lambda r: str(r.path)) == sorted(train, key=lambda r: str(r.path))
    # the same classes whatever the order of the records, and again on a second call; another seed differs
    again_kept, again_val = carve_validation(list(reversed(train)), 0.2, seed=0)
    assert classes(again_val) == classes(val) and classes(again_kept) == classes(kept)
    assert {classes(carve_validation(train, 0.2, seed=s)[1]) != classes(val) for s in range(1, 4)} == {True}
    # too few classes to leave 2 on each side, or a fraction of 0: nothing is held out
    assert carve_validation(train, 0.0)[1] == [] and carve_validation(train[:9], 0.2)[1] == []   # 3 classes
    assert len(classes(carve_validation(train[:12], 0.2)[1])) == 2                               # at least 2
    with pytest.raises(ValueError, match="validation fraction"):
        carve_validation(train, 1.0)
