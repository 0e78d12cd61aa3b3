"""Is a faster engine good enough? Agreement of its rankings with fp32's on a held sample of the collection.

    verdict = agreement(fp32_embeddings, candidate_embeddings, labels)   # labels optional (-1: none)
    verdict.passed, verdict.to_json()

What users see is the ranking, so the gate compares rankings, not single vectors: every sample image queries
the rest of the sample, and the mean share of the top-10 neighbours the candidate has in common with fp32 is
the overlap. Where at least two classes have two or more labelled images, Recall@1 and MAP@R of both (the
project's retrieval.metrics, leave-one-out) are compared too, and then they decide: a reordering among
equally good neighbours lowers the overlap without costing the user anything (bf16 on lite0: overlap 0.95,
Recall@1 unchanged). Thresholds and the figures behind them: docs/engines.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TOP_K = 10
MIN_OVERLAP = 0.90  # without labels: mean top-10 overlap with fp32
MIN_OVERLAP_LABELLED = 0.75  # with labels: a floor only, the metric deltas below decide
MAX_RECALL_DROP = 0.005  # Recall@1 (fp32 - candidate) on the sample
MAX_MAP_DROP = 0.01  # MAP@R (fp32 - candidate) on the sample


@dataclass(frozen=True)
class Agreement:
    """The gate's figures for one candidate (recall/map None when the sample has too few labels)."""

    images: int
    overlap: float  # mean top-10 overlap with fp32's neighbours
    recall_at_1: float | None = None  # the candidate's, on the sample
    recall_at_1_fp32: float | None = None
    map_at_r: float | None = None
    map_at_r_fp32: float | None = None
    passed: bool = False
    rule: str = ""  # the thresholds applied, for the record

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def agreement(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
    """Compare the candidate's embeddings of the sample with fp32's (same rows, same order)."""
    from retrieval.metrics import knn_search

    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    k = min(TOP_K, len(reference) - 1)
    if k < 1:
        return Agreement(len(reference), 1.0, passed=True, rule="fewer than 2 images: nothing to compare")
    _, ref_nn = knn_search(reference, reference, k, exclude_self=True)
    _, cand_nn = knn_search(candidate, candidate, k, exclude_self=True)
    overlap = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ref_nn, cand_nn, strict=True)]))
    metrics = _labelled_metrics(reference, candidate, labels)
    if metrics is None:
        return Agreement(len(reference), overlap, passed=overlap >= MIN_OVERLAP,
                         rule=f"top-{TOP_K} overlap >= {MIN_OVERLAP}")
    (r1_ref, map_ref), (r1, map_r) = metrics
    passed = overlap >= MIN_OVERLAP_LABELLED and r1_ref - r1 <= MAX_RECALL_DROP and map_ref - map_r <= MAX_MAP_DROP
    return Agreement(len(reference), overlap, r1, r1_ref, map_r, map_ref, passed,
                     f"Recall@1 drop <= {MAX_RECALL_DROP}, MAP@R drop <= {MAX_MAP_DROP}, "
                     f"top-{TOP_K} overlap >= {MIN_OVERLAP_LABELLED}")


def _labelled_metrics(reference: np.ndarray, candidate: np.ndarray,
                      labels: np.ndarray | None) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """((Recall@1, MAP@R) of fp32, of the candidate), or None unless two classes have two labelled images."""
    from retrieval.metrics import rank_leave_one_out, ranking_metrics

    if labels is None:
        return None
    labels = np.asarray(labels)
    if (np.bincount(labels[labels >= 0]) >= 2).sum() < 2:
        return None
    out = []
    for embeddings in (reference, candidate):
        queries, _, neighbours = rank_leave_one_out(embeddings, labels, (1,))
        metrics = ranking_metrics(labels, queries, neighbours, (1,))
        out.append((metrics["recall@1"], metrics["map@r"]))
    return out[0], out[1]
