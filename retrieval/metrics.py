"""Retrieval metrics from exact inner-product kNN: Recall@K, MAP@R and R-Precision.

One path for every figure the project reports: `rank_leave_one_out` ranks (exact kNN) and `ranking_metrics`
scores a ranking; `finetune` (each epoch), `eval --dataset` and `eval --db` (exact, and FAISS's own ranking
when the index is approximate) all go through these two functions.

Definitions follow Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020). Every labelled item is a
query against all the others (leave-one-out); R = the number of *other* items with the query's label.
Unlabelled items (label < 0) stay in the database as distractors and never count as a hit.
- Recall@K: share of queries with at least one same-label item among their K nearest neighbours.
  A query whose class has no other item can never hit: it counts as a miss.
- R-Precision: same-label share of the R nearest neighbours.
- MAP@R: (1/R) * sum over ranks i <= R of precision@i at the ranks i that hold a same-label item.
  R-Precision and MAP@R average over queries with R >= 1 only (NaN when there are none).

Ties: neighbours are ordered by score (descending), then by lower database index; deterministic and
independent of the block size, neither optimistic nor pessimistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Metrics = dict[str, float]  # "recall@K" per K, "map@r", "r_precision", "n_queries", "n_classes", ...


def knn_search(queries: np.ndarray, database: np.ndarray, k: int, *, exclude_self: bool = False,
               block: int = 4096, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores (Q, k) float32, indices (Q, k) int64), best first.

    Works tile by tile (block x block scores) and keeps a few top-k candidate sets per query, so memory is
    O(Q*k + block**2). With `exclude_self`, query i is database row i and never its own neighbour. Rows with
    fewer than k candidates are padded with score -inf and index -1. Passing the same array as queries and
    database computes each tile once and uses it for both sides.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    symmetric = queries is database
    q = _as_tensor(queries, device)
    d = q if symmetric else _as_tensor(database, device)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, the database {d.shape[1]}")
    if exclude_self and len(q) != len(d):
        raise ValueError("exclude_self needs query i to be database row i (same number of rows)")
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    indices = np.full((len(q), k), -1, dtype=np.int64)
    pools = {q0: _Candidates(k) for q0 in range(0, len(q), block)}
    for q0 in range(0, len(q), block):
        for d0 in range(q0 if symmetric else 0, len(d), block):
            tile = q[q0:q0 + block] @ d[d0:d0 + block].T
            if exclude_self:
                _mask_self(tile, q0, d0)
            pools[q0].add(*_top_k(tile, k), offset=d0)
            if symmetric and d0 != q0:   # the tile's transpose is the later block's scores against this one
                pools[d0].add(*_top_k(tile.T.contiguous(), k), offset=q0)
        block_scores, block_indices = pools.pop(q0).result()
        width = block_scores.shape[1]
        scores[q0:q0 + block, :width] = block_scores.cpu().numpy()
        indices[q0:q0 + block, :width] = block_indices.cpu().numpy()
    indices[scores == -np.inf] = -1
    return scores, indices


def neighbour_width(labels: np.ndarray, ks: Sequence[int], top: int = 0) -> int:
    """Neighbours per query needed for Recall@max(K), MAP@R (R = largest class - 1) and `top` shown results."""
    labels = np.asarray(labels)
    labelled = labels[labels >= 0]
    largest_class = int(np.bincount(labelled).max(initial=1)) if len(labelled) else 1
    return max(max(ks), largest_class - 1, top)


def rank_leave_one_out(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], *, top: int = 0,
                       block: int = 4096,
                       device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact kNN of every labelled item against all the others: (queries, scores, neighbours).

    `queries` are the row numbers of the labelled items (label >= 0); `scores` and `neighbours` (row numbers,
    -1 past the end) have one row per query and `neighbour_width(labels, ks, top)` columns, best first.
    """
    width = neighbour_width(labels, ks, top)  # knn_search pads with -1 when fewer items exist
    scores, neighbours = knn_search(embeddings, embeddings, width, exclude_self=True, block=block, device=device)
    queries = np.flatnonzero(np.asarray(labels) >= 0)
    return queries, scores[queries], neighbours[queries]


def ranking_metrics(labels: np.ndarray, queries: np.ndarray, neighbours: np.ndarray, ks: Sequence[int]) -> Metrics:
    """Recall@K, MAP@R and R-Precision of ranked `neighbours` (row numbers into `labels`, -1 = none) of `queries`.

    Any ranking works (exact or FAISS's); it must be `neighbour_width` wide so that Recall@max(K) and MAP@R
    see all they need.
    """
    labels = np.asarray(labels)
    query_labels = labels[queries]
    neighbour_labels = np.where(neighbours >= 0, labels[np.maximum(neighbours, 0)], -1)  # -1 never hits
    relevant = np.bincount(labels[labels >= 0], minlength=int(labels.max(initial=0)) + 1)[query_labels] - 1
    width = neighbour_labels.shape[1]
    if max(ks) > width or relevant.max(initial=0) > width:
        raise ValueError(f"{width} neighbours per query do not cover K={max(ks)} and R={relevant.max(initial=0)}")
    hits = neighbour_labels == query_labels[:, None]
    metrics: Metrics = {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    has_positives = relevant > 0
    metrics["map@r"], metrics["r_precision"] = _map_at_r(hits[has_positives], relevant[has_positives])
    metrics["n_queries"] = len(query_labels)
    metrics["n_classes"] = len(np.unique(query_labels))
    metrics["n_queries_without_positives"] = int((~has_positives).sum())
    return metrics


def _map_at_r(hits: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """Mean MAP@R and R-Precision of queries with R >= 1 (NaN when there are none)."""
    if r.size == 0:
        return float("nan"), float("nan")
    rank = np.arange(1, r.max() + 1)
    within_r = hits[:, : len(rank)] & (rank[None, :] <= r[:, None])
    precision_at_rank = np.cumsum(within_r, axis=1, dtype=np.float32) / rank.astype(np.float32)
    map_r = (precision_at_rank * within_r).sum(axis=1) / r
    return float(map_r.mean()), float((within_r.sum(axis=1) / r).mean())


def _as_tensor(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)).to(device)
    if tensor.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError("embeddings contain NaN or infinity")
    return tensor


def _mask_self(tile: torch.Tensor, q0: int, d0: int) -> None:
    """Set score(i, i) to -inf where the tile covers the diagonal."""
    start, stop = max(q0, d0), min(q0 + tile.shape[0], d0 + tile.shape[1])
    if start < stop:
        rows = torch.arange(start, stop, device=tile.device)
        tile[rows - q0, rows - d0] = -torch.inf


class _Candidates:
    """Top-k candidate sets of one block of queries, folded into one set every few tiles."""

    def __init__(self, k: int, fold_every: int = 8):
        self.k = k
        self.fold_every = fold_every
        self.scores: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, columns: torch.Tensor, *, offset: int) -> None:
        self.scores.append(scores)
        self.indices.append(columns + offset)
        if len(self.scores) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        scores, indices = _top_k(torch.cat(self.scores, dim=1), self.k, torch.cat(self.indices, dim=1))
        self.scores, self.indices = [scores], [indices]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k, ordered by score (descending) then index (ascending)."""
        self._fold()
        scores, indices = self.scores[0], self.indices[0]
        order = _rank_order(scores, indices)
        return scores.gather(1, order), indices.gather(1, order)


def _top_k(scores: torch.Tensor, k: int, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score desc, then index asc) of each row, in no particular order: (scores, indices).

    `indices` default to the column numbers. torch.topk alone may cut a tie anywhere; a tie crosses the
    cut exactly when the (k+1)-th score equals the k-th, and only those rows are sorted exactly.
    """
    if indices is None:
        indices = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    if scores.shape[1] <= k:
        return scores, indices
    top, positions = scores.topk(k + 1, dim=1)
    positions = positions[:, :k]
    tied = (top[:, k] == top[:, k - 1]).nonzero().squeeze(1)
    if len(tied):
        positions[tied] = _rank_order(scores[tied], indices[tied])[:, :k]
    return scores.gather(1, positions), indices.gather(1, positions)


def _rank_order(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Column positions of each row sorted by score (descending), equal scores by index (ascending)."""
    by_index = indices.argsort(dim=1)
    by_score = scores.gather(1, by_index).sort(dim=1, descending=True, stable=True).indices
    return by_index.gather(1, by_score)
