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


def carve_validation(train: Sequence[Record], fraction: float, *, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, validation): round(fraction * n) of the train classes, at least 2, moved whole to validation.

    The classes are a seeded permutation of the sorted labels, so the split depends only on (classes, fraction,
    seed), never on file order. Validation is class-disjoint from train (and, being carved from train, from
    test), so choosing an epoch on it says how the model does on unseen classes without looking at the test
    split. Returns no validation records when `fraction` is 0 or fewer than 2 classes would be left on either
    side.
    """
    import numpy as np

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    classes = sorted({r.label for r in train})
    n_val = max(2, round(fraction * len(classes))) if fraction > 0 else 0
    if n_val == 0 or len(classes) - n_val < 2:
        return list(train), []
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(classes))
    val_classes = {classes[i] for i in order[:n_val]}
    return [r for r in train if r.label not in val_classes], [r for r in train if r.label in val_classes]
