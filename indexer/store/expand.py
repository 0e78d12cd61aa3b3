"""Alpha query expansion (aQE): the query plus its top hits' stored embeddings re-ranks the first search's shortlist.

    q' = normalise(q + sum_i w_i v_i),   w_i = max(s_i, 0) ** alpha   over the top-k hits (s_i their cosine)

(Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2019; alpha = 0 is
average query expansion). The first search fetches a shortlist of max(results asked, `shortlist`) hits; the
expanded query q' ranks that shortlist again from the DB's own stored embeddings. So expansion costs no second
search over the DB (a 100k-item Flat search is most of a query's search time) and no encoder pass: only the
shortlist's LMDB reads and a (shortlist x dim) product. An item outside the first search's shortlist can no
longer be found; docs/ranking-levers.md measures what the shortlist costs against a second full search.
`query`, `serve` (`expanded_search`) and `eval --db` (`expanded_ranking` over its leave-one-out rankings, so a
query never expands with itself) share `expanded_ranking`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.eval_config import DEFAULT_EXPAND_ALPHA

if TYPE_CHECKING:
    from .search import SearchIndex

DEFAULT_SHORTLIST = 200  # first-search hits the expanded query re-ranks; docs/ranking-levers.md measures it
CHUNK = 256  # queries re-ranked at a time (eval --db re-ranks every labelled item)


@dataclass(frozen=True)
class Expansion:
    """How many top hits join the query (0: no expansion), the exponent of their cosine weights, and how many
    first-search hits the expanded query re-ranks (`width`: at least the results asked and the k hits)."""

    k: int = 0
    alpha: float = DEFAULT_EXPAND_ALPHA
    shortlist: int = DEFAULT_SHORTLIST

    def width(self, k: int) -> int:
        """Hits the first search fetches when `k` results are asked."""
        return max(k, self.k, self.shortlist)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise RetrievalError(f"--expand must be 0 (off) or a positive number of hits, not {self.k}")
        if not self.alpha >= 0:
            raise RetrievalError(f"--expand-alpha must be 0 or more, not {self.alpha}")


def expand(queries: np.ndarray, scores: np.ndarray, hit_vectors: np.ndarray, alpha: float) -> np.ndarray:
    """(Q, d) unit vectors: each query plus its hits weighted by max(cosine, 0) ** alpha, renormalised.

    `scores` (Q, k) are the hits' cosines, best first, -inf for padding (a hit that does not exist: weight 0);
    `hit_vectors` (Q, k, d) their stored embeddings (anything for padding). A query whose sum is zero (only
    possible for a zero query) comes back unchanged.
    """
    queries = np.asarray(queries, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    real = np.isfinite(scores)
    weights = np.where(real, np.power(np.maximum(np.where(real, scores, 0), 0), alpha), 0).astype(np.float32)
    summed = queries + np.einsum("qk,qkd->qd", weights, np.asarray(hit_vectors, dtype=np.float32))
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.where(norms > 0, summed / np.where(norms > 0, norms, 1), queries).astype(np.float32)


def expanded_ranking(queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                     vectors_of: Callable[[np.ndarray], np.ndarray], expansion: Expansion,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of each query's shortlist re-ranked by its expanded query; padded with (-inf, -1).

    `scores`, `ids` (Q, W): the first search's shortlist, best first, padded with (-inf, -1); its top
    `expansion.k` make the expanded query. `vectors_of` maps ids (item ids or row numbers) to their stored
    embeddings. Works CHUNK queries at a time, so memory stays at CHUNK x W x dim floats."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), CHUNK):
        rows = slice(start, start + CHUNK)
        found = ids[rows] >= 0
        vectors = np.zeros((*found.shape, queries.shape[1]), dtype=np.float32)
        vectors[found] = vectors_of(ids[rows][found])
        first = np.where(found, scores[rows], -np.inf)
        q = expand(queries[rows], first[:, : expansion.k], vectors[:, : expansion.k], expansion.alpha)
        again = np.where(found, np.einsum("qd,qwd->qw", q, vectors), -np.inf)
        order = np.argsort(-again, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(again, order, axis=1)
        width = best.shape[1]
        out_scores[rows, :width] = best
        out_ids[rows, :width] = np.where(np.isfinite(best), np.take_along_axis(ids[rows], order, axis=1), -1)
    return out_scores, out_ids


def expanded_search(index: SearchIndex, queries: np.ndarray, k: int, expansion: Expansion, *,
                    only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of `queries` (Q, d) over the DB as SearchIndex.search returns them, expanded when
    `expansion.k` > 0: one search for the shortlist (restricted to `only`, as the results are), then the
    re-ranking of `expanded_ranking`."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if expansion.k == 0:
        return index.search(queries, k, only=only)
    scores, ids = index.search(queries, expansion.width(k), only=only)
    return expanded_ranking(queries, scores, ids, index.vectors, expansion, k)
