"""Alpha query expansion (indexer.store.expand) against a direct loop over the stored embeddings: the weights,
padding, the own item left out, and an index DB of random vectors searched through SearchIndex."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.store.expand import Expansion, expand, expanded_embeddings, without_own
from retrieval.errors import RetrievalError

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _direct(query: np.ndarray, database: np.ndarray, k: int, alpha: float, leave_out: int | None = None) -> np.ndarray:
    """One query by loops in float64: its k most similar rows (ties to the lower row), weighted, normalised."""
    sims = [(float(np.dot(query, row)), j) for j, row in enumerate(database.astype(np.float64)) if j != leave_out]
    top = sorted(sims, key=lambda s: (-s[0], s[1]))[:k]
    total = query.astype(np.float64).copy()
    for sim, j in top:
        total += max(sim, 0.0) ** alpha * database[j]
    return total / np.linalg.norm(total)


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


def test_without_own_keeps_the_first_k_others():
    ids = np.array([[7, 3, 5], [2, 4, 6], [1, 9, 8]])
    scores = -ids.astype(np.float32)
    kept_scores, kept = without_own(scores, ids, np.array([7, 4, 0]), 2)
    assert kept.tolist() == [[3, 5], [2, 6], [1, 9]]
    assert kept_scores.tolist() == (-kept).tolist()


def test_expanded_embeddings_through_the_db_equal_the_direct_loop(db):
    from indexer.store.search import SearchIndex

    db_dir, _, vectors = db
    queries = _unit(np.random.default_rng(2), 6)
    with SearchIndex.open(db_dir, gpu=False) as index:
        got = expanded_embeddings(index, queries, Expansion(5, 3.0))
        np.testing.assert_array_equal(expanded_embeddings(index, queries, Expansion(0)), queries)
    for q in range(len(queries)):
        np.testing.assert_allclose(got[q], _direct(queries[q], vectors, 5, 3.0), atol=1e-5)


def test_an_items_own_embedding_never_joins_its_expansion(db):
    from indexer.store.search import SearchIndex

    db_dir, ids, vectors = db
    rows = np.array([0, 7, 21, 39])
    with SearchIndex.open(db_dir, gpu=False) as index:
        left_out = expanded_embeddings(index, vectors[rows], Expansion(3, 1.0), own=ids[rows])
        with_self = expanded_embeddings(index, vectors[rows], Expansion(3, 1.0))
    for i, row in enumerate(rows):
        np.testing.assert_allclose(left_out[i], _direct(vectors[row], vectors, 3, 1.0, leave_out=row), atol=1e-5)
        np.testing.assert_allclose(with_self[i], _direct(vectors[row], vectors, 3, 1.0), atol=1e-5)
    assert not np.allclose(left_out, with_self, atol=1e-3)   # so the first check could fail


def test_a_db_smaller_than_k_expands_with_what_there_is(tmp_path):
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store
    from indexer.store.search import SearchIndex

    vectors = _unit(np.random.default_rng(3), 2)
    with Store.open(tmp_path / "db", readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 32), str(tmp_path))
        store.commit_batch([NewItem(f"c/{i}.jpg", "c", 1, 0, 1, 1, i.to_bytes(16, "little"), v)
                            for i, v in enumerate(vectors)], [])
    query = _unit(np.random.default_rng(4), 1)
    with SearchIndex.open(tmp_path / "db", gpu=False) as index:   # no FAISS file: searched exactly from LMDB
        got = expanded_embeddings(index, query, Expansion(5, 3.0))
    np.testing.assert_allclose(got[0], _direct(query[0], vectors, 5, 3.0), atol=1e-5)


@pytest.mark.parametrize(("k", "alpha"), [(-1, 3.0), (2, -0.5), (2, float("nan"))])
def test_bad_expansion_settings_are_refused(k, alpha):
    with pytest.raises(RetrievalError, match="expand"):
        Expansion(k, alpha)
