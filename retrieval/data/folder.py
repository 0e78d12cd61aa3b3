"""Reader for a folder tree: one sub-folder per class, images at any depth below it.

Hidden files and folders (name starting with '.') are skipped, as are files without an image extension and
class folders that hold no image. The first floor(train_fraction * n) sorted class names are train.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from ._text import require_dir
from .records import BBox, Record, split_by_class_halves

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def read_folder(root: str | Path, *, train_fraction: float = 0.5) -> list[Record]:
    """Records of a class-per-folder tree, sorted by class name then path."""
    root = require_dir(Path(root).expanduser().absolute())
    entries: list[tuple[Path, str, BBox | None]] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries.extend((path, class_dir.name, None) for path in image_files(class_dir))
    n_classes = len({name for _, name, _ in entries})
    if n_classes < 2:
        raise DataError(root, f"needs at least 2 class sub-folders holding images, found {n_classes}")
    return split_by_class_halves(entries, {name: name for _, name, _ in entries}, train_fraction=train_fraction)


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, sorted, skipping hidden files and folders."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, f) for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)
