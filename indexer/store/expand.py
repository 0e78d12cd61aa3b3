"""Alpha query expansion (aQE): search again with the query plus its top hits' stored embeddings.

    q' = normalise(q + sum_i w_i v_i),   w_i = max(s_i, 0) ** alpha   over the top-k hits (s_i their cosine)

(Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2019; alpha = 0 is
average query expansion). The hits' embeddings are the DB's own stored ones, so the second search costs one
more FAISS call and k LMDB reads per query, never another encoder pass. `query`, `eval --db` and `serve` expand
through `expanded_embeddings`; `eval --db` passes each query's own id so it never expands with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.eval_config import DEFAULT_EXPAND_ALPHA

if TYPE_CHECKING:
    from .search import SearchIndex


@dataclass(frozen=True)
class Expansion:
    """How many top hits join the query (0: no expansion) and the exponent of their cosine weights."""

    k: int = 0
    alpha: float = DEFAULT_EXPAND_ALPHA

    def __post_init__(self) -> None:
        if self.k < 0:
            raise RetrievalError(f"--expand must be 0 (off) or a positive number of hits, not {self.k}")
        if not self.alpha >= 0:
            raise RetrievalError(f"--expand-alpha must be 0 or more, not {self.alpha}")

    def to_json(self) -> dict[str, float]:
        return {"k": self.k, "alpha": self.alpha}


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


def without_own(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` columns of each row that are not the row's own id (rows searched with k + 1 columns)."""
    keep = ids != np.asarray(own)[:, None]
    keep[keep.all(axis=1), -1] = False  # own id not among the results: drop the extra last one instead
    rows = len(ids)
    return scores[keep].reshape(rows, -1)[:, :k], ids[keep].reshape(rows, -1)[:, :k]


def expanded_embeddings(index: SearchIndex, queries: np.ndarray, expansion: Expansion,
                     own: np.ndarray | None = None) -> np.ndarray:
    """The aQE query vectors of `queries` (Q, d) over the DB; `own` (Q,) ids never join their own row's sum
    (eval --db: a query that is an indexed item). Expansion k = 0 returns the queries as they are."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if expansion.k == 0 or len(queries) == 0:
        return queries
    scores, ids = index.search(queries, expansion.k + (own is not None))
    if own is not None:
        scores, ids = without_own(scores, ids, own, expansion.k)
    found = ids >= 0
    vectors = np.zeros((*ids.shape, queries.shape[1]), dtype=np.float32)
    vectors[found] = index.vectors(ids[found])
    return expand(queries, np.where(found, scores, -np.inf), vectors, expansion.alpha)
