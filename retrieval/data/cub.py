"""Reader for CUB-200-2011 (and the generated set, which is written in the same format).

Files under root: images.txt (image_id path), image_class_labels.txt (image_id class_id), classes.txt
(class_id name), images/, and with crop=True bounding_boxes.txt (image_id x y w h). train_test_split.txt
is not read: retrieval uses the class split (first half of the class ids train, second half test).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ._text import read_table, require_dir, to_float, to_int
from .records import BBox, Record, split_by_class_halves


def read_cub(root: str | Path, *, crop: bool = False) -> list[Record]:
    """Records of a CUB-200-2011 tree, in images.txt order; crop=True attaches each image's bounding box."""
    root = require_dir(Path(root).expanduser().absolute())
    images_dir = require_dir(root / "images")
    images_txt = root / "images.txt"
    paths = _id_table(images_txt, ("image_id", "path"))
    labels_txt = root / "image_class_labels.txt"
    labels = _id_table(labels_txt, ("image_id", "class_id"))
    names = {class_id: name for class_id, (_, name) in _id_table(root / "classes.txt", ("class_id", "name")).items()}
    boxes = _read_boxes(root / "bounding_boxes.txt") if crop else {}
    entries: list[tuple[Path, int, BBox | None]] = []
    for image_id, (lineno, rel) in paths.items():
        path = images_dir / rel
        if not path.is_file():
            raise DataError(images_txt, f"image {rel!r} not found under {images_dir}", lineno)
        if image_id not in labels:
            raise DataError(labels_txt, f"no class for image_id {image_id} (images.txt:{lineno})")
        label_line, class_text = labels[image_id]
        class_id = to_int(labels_txt, label_line, class_text, "class_id")
        if class_id not in names:
            raise DataError(labels_txt, f"class_id {class_id} is not in classes.txt", label_line)
        if crop and image_id not in boxes:
            raise DataError(root / "bounding_boxes.txt", f"no bounding box for image_id {image_id}")
        entries.append((path, class_id, boxes.get(image_id)))
    if not entries:
        raise DataError(images_txt, "lists no images")
    return split_by_class_halves(entries, names)


def _id_table(path: Path, columns: tuple[str, str]) -> dict[int, tuple[int, str]]:
    """{integer first column: (line number, second column)} of a two-column file; duplicate keys are an error."""
    table: dict[int, tuple[int, str]] = {}
    for lineno, (key_text, value) in read_table(path, columns, last_takes_rest=True):
        key = to_int(path, lineno, key_text, columns[0])
        if key in table:
            raise DataError(path, f"duplicate {columns[0]} {key} (first on line {table[key][0]})", lineno)
        table[key] = (lineno, value)
    return table


def _read_boxes(path: Path) -> dict[int, BBox]:
    """{image_id: (x, y, w, h)} from bounding_boxes.txt."""
    columns = ("image_id", "x", "y", "width", "height")
    boxes: dict[int, BBox] = {}
    for lineno, (key_text, *values) in read_table(path, columns):
        key = to_int(path, lineno, key_text, "image_id")
        x, y, w, h = (to_float(path, lineno, v, name) for v, name in zip(values, columns[1:], strict=True))
        if w <= 0 or h <= 0:
            raise DataError(path, f"bounding box width and height must be positive, got {w} x {h}", lineno)
        boxes[key] = (x, y, w, h)
    return boxes
