"""The record every reader returns, and the class-disjoint retrieval split shared by all readers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

BBox = tuple[float, float, float, float]
ClassKey = TypeVar("ClassKey", int, str)  # how a reader names a class: a numeric id or a folder name


@dataclass(frozen=True)
class Record:
    """One image of a data set."""

    path: Path  # absolute image path
    label: int  # class id, 0-based, dense over the whole data set (train + test)
    class_name: str
    split: str  # "train" | "test"
    bbox: BBox | None = None  # x, y, w, h in pixels (after EXIF orientation), for cropping


def train_class_count(n_classes: int, fraction: float = 0.5) -> int:
    """How many of `n_classes` (sorted) classes go to train: floor(fraction * n), at least 1 on each side.

    With the default 0.5 this is n // 2 (CUB 100/100, Cars 98/98, 41 classes -> 20/21).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"train fraction must lie strictly between 0 and 1, got {fraction}")
    if n_classes < 2:
        raise ValueError(f"a train/test split needs at least 2 classes, got {n_classes}")
    return min(n_classes - 1, max(1, math.floor(n_classes * fraction + 1e-9)))


def split_by_class_halves(
    entries: Sequence[tuple[Path, ClassKey, BBox | None]],
    class_names: Mapping[ClassKey, str],
    *,
    train_fraction: float = 0.5,
) -> list[Record]:
    """Records from (path, class key, bbox) entries: labels follow the sorted class keys and the first
    `train_class_count` classes are train, the rest test, so no class is in both splits."""
    keys = sorted({key for _, key, _ in entries})
    label_of = {key: i for i, key in enumerate(keys)}
    n_train = train_class_count(len(keys), train_fraction)
    return [
        Record(path, label_of[key], class_names[key], "train" if label_of[key] < n_train else "test", bbox)
        for path, key, bbox in entries
    ]
