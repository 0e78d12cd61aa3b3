"""Collapse near-duplicates in one ranked result list (`query --dedup T`, `/api/search?dedup=T`).

As clip-retrieval's `deduplicate`: results whose embeddings' cosine is >= T are linked, and of each connected
group only the best-ranked result is kept. Off by default; callers fetch FETCH_FACTOR x k results first so that
k remain after collapsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .read import Hit

if TYPE_CHECKING:
    from .search import SearchIndex

FETCH_FACTOR = 4


def keep_distinct(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Ascending indices of the rows to keep: rows are results ranked best first (one query's, so the (n, n)
    similarity matrix is small); of each group connected by cosine >= threshold, the first row."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    if len(vectors) == 0:
        return np.empty(0, dtype=np.int64)
    linked = (vectors @ vectors.T) >= threshold
    _, labels = connected_components(csr_matrix(linked), directed=False)
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)


def collapse_hits(index: SearchIndex, hits: Sequence[Hit], threshold: float) -> tuple[Hit, ...]:
    """`hits` without the near-duplicates of better-ranked ones (their stored embeddings' cosine >= threshold),
    ranks renumbered from 1; a hit whose item is no longer in the index's snapshot is dropped."""
    present = [h for h, item in zip(hits, index.items([h.id for h in hits]), strict=True) if item is not None]
    keep = keep_distinct(index.vectors([h.id for h in present]), threshold)
    return tuple(replace(present[i], rank=rank) for rank, i in enumerate(keep, start=1))
