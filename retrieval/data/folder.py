"""Reader for a folder tree: one sub-folder per class, images at any depth below it.

Walked by retrieval.data.walk (the indexer's walker too: hidden entries skipped, links followed once, sorted);
files without an image extension, files directly in the root and class folders that hold no image are skipped,
and what cannot be reached is logged. The first floor(train_fraction * n) sorted class names are train.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from ._text import require_dir
from .records import BBox, Record, split_by_class_halves
from .walk import walk

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def read_folder(root: str | Path, *, train_fraction: float = 0.5) -> list[Record]:
    """Records of a class-per-folder tree, sorted by class name then path."""
    root = require_dir(Path(root).expanduser().absolute())
    entries: list[tuple[Path, str, BBox | None]] = []
    for path in image_files(root):
        parts = path.relative_to(root).parts
        if len(parts) > 1:
            entries.append((path, parts[0], None))
    entries.sort(key=lambda e: e[1])  # stable: by class name, then path order
    n_classes = len({name for _, name, _ in entries})
    if n_classes < 2:
        raise DataError(root, f"needs at least 2 class sub-folders holding images, found {n_classes}")
    return split_by_class_halves(entries, {name: name for _, name, _ in entries}, train_fraction=train_fraction)


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, in sorted path order (see retrieval.data.walk); folders or
    links that cannot be reached are logged as warnings and skipped."""
    found = []
    for entry in walk(folder):
        if entry.problem is not None:
            log.warning("skipping %s: %s", Path(folder, entry.relpath), entry.problem)
        elif entry.suffix in IMAGE_EXTENSIONS:
            found.append(Path(folder, entry.relpath))
    return found
