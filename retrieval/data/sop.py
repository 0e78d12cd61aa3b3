"""Reader for Stanford Online Products: root/Ebay_train.txt and root/Ebay_test.txt.

Each file starts with the header `image_id class_id super_class_id path`; paths are relative to root.
The split comes from the files; a class listed in both is an error. Labels are dense over both files,
in order of class id.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ._text import read_table, require_dir, to_int
from .records import Record

HEADER = ("image_id", "class_id", "super_class_id", "path")
SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def read_sop(root: str | Path) -> list[Record]:
    """Records of an SOP tree: train file first, then test, each in file order."""
    root = require_dir(Path(root).expanduser().absolute())
    rows: list[tuple[Path, int, str, str]] = []  # path, class id, class name, split
    class_split: dict[int, str] = {}
    for split, filename in SPLIT_FILES.items():
        index_path = root / filename
        table = read_table(index_path, HEADER, last_takes_rest=True)
        if not table or tuple(table[0][1]) != HEADER:
            first_line = table[0][0] if table else None
            raise DataError(index_path, f"first line must be the header {' '.join(HEADER)!r}", first_line)
        for lineno, (*numbers, rel) in table[1:]:
            ids = [to_int(index_path, lineno, v, f) for v, f in zip(numbers, HEADER[:-1], strict=True)]  # all ints
            class_id = ids[1]
            if class_split.setdefault(class_id, split) != split:
                other = SPLIT_FILES[class_split[class_id]]
                raise DataError(index_path, f"class_id {class_id} is also in {other}", lineno)
            path = root / rel
            if not path.is_file():
                raise DataError(index_path, f"image {rel!r} not found under {root}", lineno)
            rows.append((path, class_id, f"{Path(rel).parts[0]}/{class_id}", split))
        if not table[1:]:
            raise DataError(index_path, "lists no images")
    label_of = {class_id: i for i, class_id in enumerate(sorted(class_split))}
    return [Record(path, label_of[class_id], name, split) for path, class_id, name, split in rows]
