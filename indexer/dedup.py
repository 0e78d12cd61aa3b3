"""`dedup`: groups of near-duplicate images (re-saved, resized, cropped, mirrored copies) in an index DB.

No embedding threshold alone separates copies from distinct photos of one subject (measured with lite0 on
Caltech-101, see docs/collection-tools.md), so it is two steps:

1. candidates: every item's `neighbours` nearest items by the DB's own search (SearchIndex.search, FAISS +
   LMDB), a `batch` of items at a time, kept when their cosine is >= `threshold`: memory grows with the
   candidate pairs, never with N x N;
2. verification: both files decoded as small colour thumbnails, aligned (one image against every 90-100% crop
   box of the other, and against the other's mirror image), and compared value by value; a pair is a duplicate
   when its difference (pixel_differences) is <= `max_diff`. A perceptual hash (imagehash.phash) was measured
   first: 10% crops moved it by up to 26 of 64 bits while distinct photos on a plain sky came within 4 bits;
   and a correlation of the aligned thumbnails left studio shots of one motorbike model in two colours at 0.99,
   as close as copies (docs/collection-tools.md).

Groups are the connected components of the verified pairs, largest first. Each group's first member is its
lowest id (the first indexed); every member's score is its cosine to that first member.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.data.walk import printable
from retrieval.errors import IndexStoreError, RetrievalError

if TYPE_CHECKING:
    from .store.search import SearchIndex

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.70
DEFAULT_MAX_DIFF = 0.35
UNREADABLE = float("inf")  # the difference of a pair whose file cannot be decoded now: never a duplicate
THUMB = 16  # side of the colour thumbnails compared
_BASE = 96  # side of the greyscale image the crop boxes are cut from
_DRAFT = 96  # JPEG draft size of the decode
_CACHE = 512  # images whose thumbnails are kept (about 330 KB each)


@dataclass(frozen=True)
class DedupConfig:
    db: Path
    threshold: float = DEFAULT_THRESHOLD  # cosine of a candidate pair
    max_diff: float = DEFAULT_MAX_DIFF  # difference of the aligned thumbnails of a duplicate pair (pixel_differences)
    neighbours: int = 16  # nearest items looked at per item
    batch: int = 4096  # items searched at a time
    html: Path | None = None  # a folder for the thumbnail report
    progress: bool = False


@dataclass(frozen=True)
class Pairs:
    """Candidate pairs, a < b (ids), each once, with their cosine."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    def subset(self, keep: np.ndarray) -> Pairs:
        return Pairs(self.a[keep], self.b[keep], self.score[keep])


@dataclass(frozen=True)
class Member:
    id: int
    path: str  # absolute: the indexed folder joined with the stored path
    label: str
    score: float  # cosine to the group's first member (1.0 for it)


@dataclass(frozen=True)
class DedupResult:
    items: int
    candidates: int  # pairs above the cosine threshold
    duplicates: int  # of them, pairs the perceptual check confirmed
    unchecked: int  # candidate pairs with a file that could not be decoded now (not called duplicates)
    threshold: float
    max_diff: float
    groups: tuple[tuple[Member, ...], ...]
    html: Path | None = None

    def to_json(self) -> dict:
        """The `dedup --json` shape: {"groups": [{"members": [{"path", "id", "label", "score"}]}], counts...}."""
        return {
            "items": self.items, "candidates": self.candidates, "duplicates": self.duplicates,
            "unchecked": self.unchecked, "threshold": self.threshold, "max_diff": self.max_diff,
            "groups": [{"members": [{"path": printable(m.path), "id": m.id, "label": printable(m.label),
                                     "score": m.score} for m in group]} for group in self.groups],
        }


def run_dedup(cfg: DedupConfig) -> DedupResult:
    """Find the near-duplicate groups of cfg.db; IndexStoreError for a missing or empty DB."""
    from .store.search import SearchIndex

    if not -1.0 <= cfg.threshold <= 1.0:
        raise RetrievalError(f"--threshold is a cosine in [-1, 1], got {cfg.threshold}")
    if not cfg.max_diff >= 0:
        raise RetrievalError(f"--max-diff must be >= 0, got {cfg.max_diff}")
    if cfg.neighbours < 1:
        raise RetrievalError(f"--neighbours must be at least 1, got {cfg.neighbours}")
    if cfg.html is not None and cfg.html.exists() and not (cfg.html.is_dir() and not any(cfg.html.iterdir())):
        raise RetrievalError(f"{cfg.html} already exists: write the report into a new folder")
    with SearchIndex.open(cfg.db, gpu=False) as index:
        if len(index) == 0:
            raise IndexStoreError(f"the index DB at {cfg.db} is empty: index a folder into it first")
        pairs = candidate_pairs(index, cfg.threshold, cfg.neighbours, cfg.batch, progress=cfg.progress)
        differences = pixel_differences(index, pairs, progress=cfg.progress)
        verified = pairs.subset(differences <= cfg.max_diff)
        groups = describe(index, components(verified))
        result = DedupResult(len(index), len(pairs), len(verified), int(np.sum(differences == UNREADABLE)),
                             cfg.threshold, cfg.max_diff, groups)
    if cfg.html is not None:
        result = replace(result, html=write_dedup_html(result, cfg.html))
    return result


def candidate_pairs(index: SearchIndex, threshold: float, neighbours: int, batch: int = 4096, *,
                    progress: bool = False) -> Pairs:
    """Pairs of items whose cosine is >= threshold among each item's `neighbours` nearest, each pair once."""
    from tqdm import tqdm

    found_a, found_b, found_s = [], [], []
    with tqdm(total=len(index), unit="item", desc="candidates", disable=not progress) as bar:
        for items, vectors in index.iter_batches(batch):
            ids = np.array([it.id for it in items], dtype=np.int64)
            scores, hits = index.search(vectors, neighbours + 1)  # + 1: the item itself
            keep = (hits >= 0) & (hits != ids[:, None]) & (scores >= threshold)
            rows = np.broadcast_to(ids[:, None], hits.shape)[keep]
            found_a.append(np.minimum(rows, hits[keep]))
            found_b.append(np.maximum(rows, hits[keep]))
            found_s.append(scores[keep])
            bar.update(len(items))
    a, b, s = (np.concatenate(x) if x else np.empty(0) for x in (found_a, found_b, found_s))
    order = np.lexsort((b, a))
    a, b, s = a[order].astype(np.int64), b[order].astype(np.int64), s[order].astype(np.float32)
    first = np.ones(len(a), dtype=bool)  # a pair is found from both ends: keep one
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Pairs(a[first], b[first], s[first])


def pixel_differences(index: SearchIndex, pairs: Pairs, *, progress: bool = False) -> np.ndarray:
    """Per pair, how far the two images' pixels are apart after the best alignment (UNREADABLE, +inf, where a
    file cannot be decoded now): the alignment is the crop box of one image (ALIGN_BOXES, either way round, or
    the mirror image) whose thumbnail correlates best with the other's whole frame; the distance is the 99th
    percentile of the absolute differences of the two standardised thumbnails' values, so that a local change
    (another colour of the same motorbike, a face turned) counts where a correlation would average it away."""
    from tqdm import tqdm

    cache: dict[int, np.ndarray | None] = {}
    out = np.empty(len(pairs), dtype=np.float32)
    for row, (a, b) in enumerate(tqdm(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True), total=len(pairs),
                                      unit="pair", desc="verify", disable=not progress)):
        if a not in cache and len(cache) >= _CACHE:  # pairs come sorted by a: its boxes stay while it is used
            cache.clear()
        first, second = (cache[i] if i in cache else cache.setdefault(i, _boxes(index, i)) for i in (a, b))
        if first is None or second is None:
            out[row] = UNREADABLE
            continue
        one, other = first @ second[0], second @ first[0]
        aligned, whole = (first[one.argmax()], second[0]) if one.max() >= other.max() else (second[other.argmax()],
                                                                                          first[0])
        out[row] = np.percentile(np.abs(aligned - whole), 99) * np.sqrt(aligned.size)  # in standard deviations
    return out


def _boxes(index: SearchIndex, item_id: int) -> np.ndarray | None:
    """(len(ALIGN_BOXES) + 1, THUMB * THUMB * 3) unit-norm, zero-mean colour thumbnails of an item's image: each
    crop box, then the mirror image; None if the file does not decode now (logged). In colour, since studio
    shots of one model in two colours agree in grey."""
    from PIL import Image

    from retrieval.data.decode import load_image
    from retrieval.errors import DecodeError

    item = index.items([item_id])[0]
    assert item is not None  # ids of pairs read from this snapshot
    try:
        image = load_image(index.root / item.relpath, draft_size=_DRAFT).image.convert("RGB")
    except DecodeError as exc:
        log.warning("dedup cannot check %s: %s", printable(item.relpath), exc.reason)
        return None
    base = image.resize((_BASE, _BASE), Image.Resampling.BILINEAR)
    size = (THUMB, THUMB)
    thumbs = [np.asarray(base.resize(size, Image.Resampling.BILINEAR, box=(_BASE * x0, _BASE * y0, _BASE * x1,
                                                                          _BASE * y1)), dtype=np.float32)
              for x0, y0, x1, y1 in ALIGN_BOXES]
    thumbs.append(thumbs[0][:, ::-1])
    flat = np.stack(thumbs).reshape(len(thumbs), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def _align_boxes() -> tuple[tuple[float, float, float, float], ...]:
    """The whole frame, then boxes keeping 95% and 90% of each side at every position on a 1.25% grid: a crop of
    up to 10% of the other image is matched within 0.625% of its position."""
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for keep, steps in ((0.95, 5), (0.90, 9)):
        offsets = np.linspace(0.0, 1.0 - keep, steps).tolist()
        boxes += [(x, y, x + keep, y + keep) for x in offsets for y in offsets]
    return tuple(boxes)


ALIGN_BOXES = _align_boxes()


def components(pairs: Pairs) -> list[np.ndarray]:
    """Connected components (sorted ids) of the graph whose edges are `pairs`, largest first, then by first id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return []
    ids = np.unique(np.concatenate([pairs.a, pairs.b]))
    a, b = np.searchsorted(ids, pairs.a), np.searchsorted(ids, pairs.b)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    groups = [ids[labels == c] for c in np.unique(labels)]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def describe(index: SearchIndex, groups: Sequence[np.ndarray]) -> tuple[tuple[Member, ...], ...]:
    """Members with paths, labels and their cosine to the group's first (lowest) id, best first after it."""
    out = []
    for ids in groups:
        vectors = index.vectors(ids)
        scores = vectors @ vectors[0]
        order = np.concatenate([[0], 1 + np.argsort(-scores[1:], kind="stable")])
        items = index.items(ids[order])
        out.append(tuple(Member(it.id, str(index.root / it.relpath), it.label, float(scores[i]))
                         for it, i in zip(items, order, strict=True) if it is not None))
    return tuple(out)


def write_dedup_html(result: DedupResult, folder: Path) -> Path:
    """FOLDER/index.html: one row of thumbnails per group (thumbnails in FOLDER/index_thumbs/); the folder
    appears complete or not at all."""
    from retrieval.files import atomic_dir
    from retrieval.report import Cell, Row, write_query_page

    rows = [Row(group[0].path, group[0].label,
                tuple(Cell(rank, m.path, m.label, m.score, None) for rank, m in enumerate(group[1:], start=2)))
            for group in result.groups]
    with atomic_dir(folder) as tmp:
        write_query_page(rows, tmp / "index.html", title=f"Near-duplicate groups ({len(rows)})", lead="kept")
    return folder / "index.html"
