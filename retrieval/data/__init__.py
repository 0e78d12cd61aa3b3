"""Data layer, the "files" and "decode" end of files -> decode -> encode -> LMDB -> FAISS -> search -> query /
eval / serve: one reader per on-disk format, all returning `Record`s with a class-disjoint split; safe decoding
(`decode`), the P x K sampler and the generated bird set."""

from __future__ import annotations

from pathlib import Path

from ..errors import RetrievalError
from .records import Record

DATASETS = ("cub", "cars", "sop", "folder")
SPLITS = ("train", "test")


def load_records(dataset: str, root: str | Path, *, crop: bool = False, train_fraction: float = 0.5) -> list[Record]:
    """Records of `dataset` at `root`. crop (bounding boxes) is CUB-only; train_fraction is folder-only."""
    if dataset not in DATASETS:
        raise RetrievalError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if crop and dataset != "cub":
        raise RetrievalError(f"--crop needs bounding boxes, which only the cub format has (not {dataset})")
    if dataset == "cub":
        from .cub import read_cub

        return read_cub(root, crop=crop)
    if dataset == "cars":
        from .cars import read_cars

        return read_cars(root)
    if dataset == "sop":
        from .sop import read_sop

        return read_sop(root)
    from .folder import read_folder

    return read_folder(root, train_fraction=train_fraction)


def split_records(records: list[Record], split: str) -> list[Record]:
    """The records of one split ("train" or "test"), order kept."""
    if split not in SPLITS:
        raise RetrievalError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [r for r in records if r.split == split]
