"""Alpha query expansion (indexer.store.expand) against a direct loop over the stored embeddings: the weights,
padding, the shortlist re-ranked by the expanded query, and an index DB of random vectors searched through
SearchIndex (with a label filter, and smaller than the hits asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.store.expand import Expansion, expand, expanded_ranking, expanded_search
from retrieval.errors import RetrievalError

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ranked(query: np.ndarray, database: np.ndarray, rows: list[int]) -> list[tuple[float, int]]:
    """(cosine, row) of `rows` by loops in float64, best first (ties to the lower row)."""
    sims = [(float(np.dot(query.astype(np.float64), database[j].astype(np.float64))), j) for j in rows]
    return sorted(sims, key=lambda s: (-s[0], s[1]))


def _direct(query: np.ndarray, database: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """One query by loops in float64: its k most similar rows, weighted, normalised."""
    total = query.astype(np.float64).copy()
    for sim, j in _ranked(query, database, list(range(len(database))))[:k]:
        total += max(sim, 0.0) ** alpha * database[j]
    return total / np.linalg.norm(total)


def _direct_search(query: np.ndarray, database: np.ndarray, expansion: Expansion, k: int,
                   rows: list[int] | None = None) -> list[tuple[float, int]]:
    """The shipped rule by loops: the shortlist is the plain top `expansion.width(k)` of `rows` (default all); its
    top expansion.k make the expanded query, which ranks the shortlist; the first k (cosine, row) of that."""
    shortlist = [j for _, j in _ranked(query, database, rows if rows is not None else list(range(len(database))))]
    shortlist = shortlist[: expansion.width(k)]
    total = query.astype(np.float64).copy()
    for sim, j in _ranked(query, database, shortlist)[: expansion.k]:
        total += max(sim, 0.0) ** expansion.alpha * database[j]
    return _ranked(total / np.linalg.norm(total), database, shortlist)[:k]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(db_dir, ids, vectors): 40 random unit vectors in an exact (Flat) index DB."""
    from indexer.store import ann
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store

    db_dir = tmp_path_factory.mktemp("expand") / "db"
    vectors = _unit(np.random.default_rng(0), 40)
    with Store.open(db_dir, readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 32), str(db_dir.parent))
        ids = store.commit_batch([NewItem(f"c{i % 4}/{i}.jpg", f"c{i % 4}", 1, 0, 1, 1, i.to_bytes(16, "little"), v)
                                  for i, v in enumerate(vectors)], [])
        with store.snapshot() as snap:
            ann.refresh(db_dir, snap, "flat")
    return db_dir, np.asarray(ids, dtype=np.int64), vectors


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 0.5])
def test_expand_equals_the_weighted_sum_of_the_hits(alpha):
    rng = np.random.default_rng(1)
    database, queries = _unit(rng, 30), _unit(rng, 5)
    k = 4
    sims = queries @ database.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    got = expand(queries, np.take_along_axis(sims, order, axis=1), database[order], alpha)
    for q in range(len(queries)):
        np.testing.assert_allclose(got[q], _direct(queries[q], database, k, alpha), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_expand_gives_padding_and_negative_hits_no_weight_and_alpha_zero_averages():
    query = np.array([[1.0, 0, 0]], np.float32)
    hits = np.array([[[0, 1.0, 0], [0, 0, 1.0], [9.0, 9, 9]]], np.float32)   # the last one is padding
    scores = np.array([[0.5, -0.2, -np.inf]], np.float32)
    got = expand(query, scores, hits, 2.0)
    expected = np.array([1.0, 0.25, 0.0]) / np.hypot(1.0, 0.25)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    # alpha 0: every real hit counts once, whatever its sign (average query expansion); padding still not
    np.testing.assert_allclose(expand(query, scores, hits, 0.0)[0], np.array([1.0, 1, 1]) / np.sqrt(3), atol=1e-6)


def test_expanded_ranking_reranks_the_shortlist_only_and_keeps_padding():
    rng = np.random.default_rng(5)
    database, queries = _unit(rng, 40), _unit(rng, 7)
    expansion, k = Expansion(3, 0.0, shortlist=5), 4
    sims = queries @ database.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    scores = np.take_along_axis(sims, order, axis=1)
    scores[0, 2:], order[0, 2:] = -np.inf, -1   # a row with only two hits (a tiny DB or a narrow label filter)
    got_scores, got = expanded_ranking(queries, scores, order, database.__getitem__, expansion, k)
    for q in range(1, len(queries)):
        want = _direct_search(queries[q], database, expansion, k)
        assert got[q].tolist() == [j for _, j in want]
        np.testing.assert_allclose(got_scores[q], [s for s, _ in want], atol=1e-5)
    want = _direct_search(queries[0], database, expansion, 2, rows=order[0, :2].tolist())
    assert got[0].tolist() == [j for _, j in want] + [-1, -1] and np.isneginf(got_scores[0, 2:]).all()
    # the shortlist matters: a full second search over the DB ranks some query differently
    full = [[j for _, j in _ranked(_direct(q, database, 3, 0.0), database, list(range(40)))[:k]] for q in queries[1:]]
    assert full != got[1:].tolist()


@pytest.mark.parametrize("shortlist", [6, 200])
def test_expanded_search_through_the_db_equals_the_direct_loop(db, shortlist):
    from indexer.store.search import SearchIndex

    db_dir, ids, vectors = db
    queries = _unit(np.random.default_rng(2), 6)
    expansion = Expansion(5, 3.0, shortlist=shortlist)
    with SearchIndex.open(db_dir, gpu=False) as index:
        scores, got = expanded_search(index, queries, 4, expansion)
        plain = index.search(queries, 4)
        np.testing.assert_array_equal(expanded_search(index, queries, 4, Expansion(0))[1], plain[1])
        labelled = index.ids_with_labels(["c1"])
        _, filtered = expanded_search(index, queries, 4, expansion, only=labelled)
    c1 = [j for j in range(len(vectors)) if j % 4 == 1]
    for q in range(len(queries)):
        want = _direct_search(queries[q], vectors, expansion, 4)
        assert got[q].tolist() == ids[[j for _, j in want]].tolist()
        np.testing.assert_allclose(scores[q], [s for s, _ in want], atol=1e-5)
        in_label = _direct_search(queries[q], vectors, expansion, 4, c1)
        assert filtered[q].tolist() == ids[[j for _, j in in_label]].tolist()


def test_a_db_smaller_than_k_expands_with_what_there_is(tmp_path):
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store
    from indexer.store.search import SearchIndex

    vectors = _unit(np.random.default_rng(3), 2)
    with Store.open(tmp_path / "db", readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 32), str(tmp_path))
        ids = store.commit_batch([NewItem(f"c/{i}.jpg", "c", 1, 0, 1, 1, i.to_bytes(16, "little"), v)
                                  for i, v in enumerate(vectors)], [])
    query = _unit(np.random.default_rng(4), 1)
    with SearchIndex.open(tmp_path / "db", gpu=False) as index:   # no FAISS file: searched exactly from LMDB
        scores, got = expanded_search(index, query, 3, Expansion(5, 3.0))
    expanded = _direct(query[0], vectors, 5, 3.0)
    want = _ranked(expanded, vectors, [0, 1])
    assert got[0].tolist() == [ids[j] for _, j in want] + [-1]
    np.testing.assert_allclose(scores[0, :2], [s for s, _ in want], atol=1e-5)


@pytest.mark.parametrize(("k", "alpha"), [(-1, 3.0), (2, -0.5), (2, float("nan"))])
def test_bad_expansion_settings_are_refused(k, alpha):
    with pytest.raises(RetrievalError, match="expand"):
        Expansion(k, alpha)
