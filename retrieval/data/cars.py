"""Reader for Cars196 in the metric-learning layout: root/cars_annos.mat + root/car_ims/.

cars_annos.mat holds `annotations`, a struct array with fields relative_im_path ('car_ims/000001.jpg'),
class (1-based) and test, plus `class_names`. Retrieval ignores `test`: the first half of the sorted class
ids (1..98) is train, the rest (99..196) test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ._text import require_dir
from .records import BBox, Record, split_by_class_halves

_REQUIRED_FIELDS = ("relative_im_path", "class")


def read_cars(root: str | Path) -> list[Record]:
    """Records of a Cars196 tree, in annotation order."""
    import scipy.io

    root = require_dir(Path(root).expanduser().absolute())
    mat_path = root / "cars_annos.mat"
    if not mat_path.is_file():
        raise DataError(mat_path, "file not found")
    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True)
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError... on bad files
        raise DataError(mat_path, f"not a readable MATLAB file: {type(exc).__name__}: {exc}") from exc
    if "annotations" not in mat:
        raise DataError(mat_path, "has no 'annotations' variable")
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    missing = [f for f in _REQUIRED_FIELDS if f not in fields]
    if missing:
        raise DataError(mat_path, f"'annotations' lacks the field(s) {', '.join(missing)}")
    names = [str(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    entries: list[tuple[Path, int, BBox | None]] = []
    for i, item in enumerate(annotations, 1):
        rel, class_id = _scalar(item["relative_im_path"]), _scalar(item["class"])
        if not isinstance(rel, str) or not rel:
            raise DataError(mat_path, f"annotation {i}: relative_im_path is not a file name: {rel!r}")
        if not isinstance(class_id, (int, np.integer)) or class_id < 1 or (names and class_id > len(names)):
            raise DataError(mat_path, f"annotation {i} ({rel}): bad class {class_id!r}")
        path = root / rel
        if not path.is_file():
            raise DataError(mat_path, f"annotation {i}: image {rel!r} not found under {root}")
        entries.append((path, int(class_id), None))
    if not entries:
        raise DataError(mat_path, "has no annotations")
    class_names = {c: names[c - 1] if names else f"class_{c:03d}" for _, c, _ in entries}
    return split_by_class_halves(entries, class_names)


def _scalar(value: object) -> object:
    """A MATLAB cell/array holding one value, as a plain Python value (None when empty or several)."""
    array = np.asarray(value)
    return array.item() if array.size == 1 else None
