"""Blocked exact kNN and Recall@K / MAP@R / R-Precision against brute-force Python loops.

Embeddings are small integers, so every inner product is exact in float32 and ties are real ties: the
loops rank by (score descending, index ascending), the documented tie rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval.metrics import knn_search, neighbour_width, rank_leave_one_out, ranking_metrics


def _leave_one_out(embeddings, labels, ks=(1, 2, 4, 8), **kw) -> dict:
    """The path finetune and eval share: rank, then score the ranking."""
    queries, _, neighbours = rank_leave_one_out(embeddings, labels, ks, **kw)
    return ranking_metrics(labels, queries, neighbours, ks)


def _integer_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-2, 3, size=(n, dim)).astype(np.float32)


def _labels_with_singletons(n: int, seed: int) -> np.ndarray:
    """Classes of varied size, including several with a single member."""
    labels = np.random.default_rng(seed).integers(0, n // 4, size=n)
    labels[:3] = [1000, 1001, 1002]
    return labels


def _brute_ranking(queries, database, exclude_self: bool) -> list[list[tuple[float, int]]]:
    rankings = []
    for i, q in enumerate(queries):
        pairs = [(float(sum(float(a) * float(b) for a, b in zip(q, d, strict=True))), j)
                 for j, d in enumerate(database) if not (exclude_self and i == j)]
        rankings.append(sorted(pairs, key=lambda p: (-p[0], p[1])))
    return rankings


def _brute_metrics(embeddings, labels, ks) -> dict:
    """Every labelled item (label >= 0) queries all the others; unlabelled ones are distractors only."""
    rankings = _brute_ranking(embeddings, embeddings, exclude_self=True)
    recalls = {k: 0 for k in ks}
    average_precisions, r_precisions = [], []
    for i, ranking in enumerate(rankings):
        if labels[i] < 0:
            continue
        same = [labels[j] == labels[i] for _, j in ranking]
        for k in ks:
            recalls[k] += any(same[:k])
        r = sum(same)
        if r == 0:
            continue
        hits, precision_sum = 0, 0.0
        for rank in range(1, r + 1):
            if same[rank - 1]:
                hits += 1
                precision_sum += hits / rank
        average_precisions.append(precision_sum / r)
        r_precisions.append(hits / r)
    n = int((labels >= 0).sum())
    out = {f"recall@{k}": recalls[k] / n for k in ks}
    out["map@r"] = sum(average_precisions) / len(average_precisions)
    out["r_precision"] = sum(r_precisions) / len(r_precisions)
    out["n_queries"] = n
    out["n_classes"] = len(set(labels[labels >= 0].tolist()))
    out["n_queries_without_positives"] = n - len(average_precisions)
    return out


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("block", [4, 7, 100])   # 4: many tiles per row, so candidate sets are folded
@pytest.mark.parametrize("k", [1, 5, 60])          # 60 > 57 candidates: padded with -1 / -inf
def test_self_search_matches_brute_force_including_ties(block, k, exclude_self):
    x = _integer_embeddings(57, 4, seed=1)   # 5^4 vectors, 57 draws: many equal scores
    scores, indices = knn_search(x, x, k, exclude_self=exclude_self, block=block)
    for i, ranking in enumerate(_brute_ranking(x, x, exclude_self=exclude_self)):
        expected = ranking[:k] + [(-math.inf, -1)] * (k - len(ranking[:k]))
        assert indices[i].tolist() == [j for _, j in expected]
        assert scores[i].tolist() == [s for s, _ in expected]
    assert scores.dtype == np.float32 and indices.dtype == np.int64


@pytest.mark.parametrize("block", [3, 64])
def test_query_database_search_matches_brute_force(block):
    queries, database = _integer_embeddings(11, 3, seed=2), _integer_embeddings(23, 3, seed=3)
    scores, indices = knn_search(queries, database, 6, block=block)
    for i, ranking in enumerate(_brute_ranking(queries, database, exclude_self=False)):
        assert [(float(s), int(j)) for s, j in zip(scores[i], indices[i], strict=True)] == ranking[:6]


def test_symmetric_shortcut_equals_the_general_path():
    x = _integer_embeddings(40, 5, seed=4)
    same = knn_search(x, x, 9, exclude_self=True, block=6)
    copy = knn_search(x, x.copy(), 9, exclude_self=True, block=6)
    np.testing.assert_array_equal(same[1], copy[1])
    np.testing.assert_array_equal(same[0], copy[0])


@pytest.mark.parametrize("block", [5, 4096])
def test_leave_one_out_metrics_match_brute_force(block):
    x = _integer_embeddings(48, 3, seed=5)
    labels = _labels_with_singletons(48, seed=6)
    got = _leave_one_out(x, labels, ks=(1, 2, 4, 8), block=block)
    expected = _brute_metrics(x, labels, (1, 2, 4, 8))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["n_queries_without_positives"] >= 3


def test_unlabelled_items_are_distractors_never_queries():
    x = _integer_embeddings(40, 3, seed=9)
    labels = _labels_with_singletons(40, seed=10)
    labels[5:15] = -1
    queries, scores, neighbours = rank_leave_one_out(x, labels, (1, 4), top=7, block=6)
    assert queries.tolist() == [i for i in range(40) if labels[i] >= 0]
    assert neighbours.shape == scores.shape == (30, neighbour_width(labels, (1, 4), top=7))
    assert (neighbours >= 0).all() and any(labels[j] < 0 for j in neighbours.ravel())  # distractors are ranked
    got = ranking_metrics(labels, queries, neighbours, (1, 4))
    expected = _brute_metrics(x, labels, (1, 4))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_a_wider_ranking_gives_the_same_figures():
    """finetune ranks only as wide as the metrics need, eval adds the report's sample columns: same numbers."""
    x = np.random.default_rng(11).normal(size=(60, 8)).astype(np.float32)
    labels = np.random.default_rng(12).integers(0, 9, size=60)
    narrow = _leave_one_out(x, labels, ks=(1, 2))
    wide = _leave_one_out(x, labels, ks=(1, 2), top=50)
    assert narrow == wide


def test_metrics_by_hand():
    """Items 0-2 query; items 3-7 are the rest of the database (item 7 unlabelled: a distractor).
    Query 0 (class 7, R = 2): hits at ranks 1 and 3 -> MAP@R = (1/1 + 0) / 2, R-Precision 1/2.
    Query 1 (class 8, R = 1): first hit at rank 2 -> MAP@R 0, R-Precision 0, Recall@1 0, Recall@2 1.
    Query 2 (class 9, R = 0): a miss for Recall@K (the distractor and padding never hit), left out of MAP@R."""
    labels = np.array([7, 8, 9, 7, 5, 8, 7, -1])
    #                      ranks 1, 2, 3 (row numbers into labels; -1: no result)
    neighbours = np.array([[3, 4, 6], [4, 5, 7], [7, 4, -1]])
    got = ranking_metrics(labels, np.array([0, 1, 2]), neighbours, ks=(1, 2))
    assert got["recall@1"] == pytest.approx(1 / 3) and got["recall@2"] == pytest.approx(2 / 3)
    assert got["map@r"] == pytest.approx(0.25) and got["r_precision"] == pytest.approx(0.25)
    assert (got["n_queries"], got["n_classes"], got["n_queries_without_positives"]) == (3, 3, 1)


def test_only_singletons_gives_zero_recall_and_undefined_map():
    x = _integer_embeddings(5, 3, seed=7)
    got = _leave_one_out(x, np.arange(5))
    assert got["recall@1"] == got["recall@8"] == 0.0
    assert math.isnan(got["map@r"]) and math.isnan(got["r_precision"])


def test_a_perfect_embedding_scores_one():
    labels = np.repeat(np.arange(6), 4)
    x = np.eye(6, dtype=np.float32)[labels]   # same class: score 1, other class: 0
    got = _leave_one_out(x, labels)
    assert all(got[key] == 1.0 for key in ("recall@1", "recall@8", "map@r", "r_precision"))


def test_invalid_inputs():
    x = _integer_embeddings(6, 3, seed=8)
    with pytest.raises(ValueError, match="same number of rows"):
        knn_search(x, x[:4], 2, exclude_self=True)
    with pytest.raises(ValueError, match="NaN"):
        knn_search(np.full((2, 3), np.nan, dtype=np.float32), x, 2)
    with pytest.raises(ValueError, match="do not cover"):
        ranking_metrics(np.array([0, 0]), np.array([0, 1]), np.array([[1], [0]]), ks=(1, 2))
