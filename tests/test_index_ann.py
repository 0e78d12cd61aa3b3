"""indexer.store.ann at scale, checked against exact search: the choice of `auto`, a bounded training sample,
updates that leave a large file lagging (searched around in bounded chunks), drift, IVF-PQ re-ranking."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.store import ann
from indexer.store.layout import EncoderInfo, NewItem, path_key
from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from tests.index_support import assert_ann_matches_lmdb

DIM = 32
GIB = 1 << 30


def _vectors(n: int, seed: int, centres: int = 20, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around `centres` random centres (closer to real embeddings than uniform noise)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, DIM), dtype=np.float32)
    x = centre[rng.integers(centres, size=n)] + spread * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add(store: Store, vectors: np.ndarray, start: int) -> None:
    items = [NewItem(f"c/{i:06d}.jpg", "c", 1, 0, 1, 1, i.to_bytes(16, "little"), v)
             for i, v in zip(range(start, start + len(vectors)), vectors, strict=True)]
    for at in range(0, len(items), 1000):
        store.commit_batch(items[at:at + 1000], [])


def _db(tmp_path, n: int, seed: int = 0) -> Store:
    store = Store.open(tmp_path / "db", readonly=False)
    store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 32), str(tmp_path))
    _add(store, _vectors(n, seed), 0)
    return store


def _refresh(store: Store, kind: str) -> ann.Refresh:
    with store.snapshot() as snap:
        return ann.refresh(store.db_dir, snap, kind)


def _exact(db, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        scores = queries @ snap.vectors(ids).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), ids[top]


def test_auto_chooses_by_size_and_memory():
    assert ann.choose_factory("auto", 100_000, 512, memory=24 * GIB) == "Flat"
    assert ann.choose_factory("auto", 1_000_000, 512, memory=24 * GIB) == "IVF2048,Flat"
    # 100M x 512: 205 GB of vectors; PQ codes of 64 B would be 7.2 GB with ids, over a quarter of 24 GiB
    assert ann.choose_factory("auto", 100_000_000, 512, memory=24 * GIB).endswith(",PQ32x8")
    assert ann.choose_factory("auto", 100_000_000, 512, memory=64 * GIB).endswith(",PQ64x8")
    assert ann.choose_factory("auto", 100_000_000, 512, memory=1024 * GIB).endswith(",Flat")
    nlist = int(ann.choose_factory("auto", 100_000_000, 512, memory=24 * GIB)[3:].split(",")[0])
    assert nlist * 39 <= ann.TRAIN_BYTES // (4 * 512)  # every list gets enough of the bounded sample


def test_training_reads_a_bounded_sample_and_adds_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "TRAIN_BYTES", 20_000 * 4 * DIM)
    store = _db(tmp_path, 30_000)
    reads = []
    with store.snapshot() as snap:
        vectors = snap.vectors
        snap.vectors = lambda ids: reads.append(len(ids)) or vectors(ids)
        index = ann.build_index("IVF512,Flat", snap)  # would like 64 x 512 = 32,768 training vectors
    store.close()
    assert reads[0] == 20_000 and max(reads[1:]) <= 16_384 and sum(reads[1:]) == 30_000  # sample, then chunks
    queries = _vectors(50, seed=9)
    _, truth = _exact(tmp_path / "db", queries, 10)
    _, found = ann.search(index, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]) >= 0.9


def test_small_changes_leave_a_large_file_lagging_and_search_stays_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "MERGE_MIN_BYTES", 0)  # as if the file were large
    monkeypatch.setattr(ann, "EXACT_CHUNK", 7)      # several chunks even for a small lag
    store = _db(tmp_path, 2000)
    assert _refresh(store, "flat").action == "rebuilt"
    written = (tmp_path / "db" / ann.ANN_FILE).stat().st_mtime_ns
    _add(store, _vectors(40, seed=1), 2000)
    store.remove_paths([path_key(f"c/{i:06d}.jpg") for i in range(0, 400, 20)])
    assert _refresh(store, "flat") == ann.Refresh("lagging", "Flat", 2000, None, added=40, removed=20)
    assert (tmp_path / "db" / ann.ANN_FILE).stat().st_mtime_ns == written
    store.close()
    queries = _vectors(20, seed=2)
    with SearchIndex.open(tmp_path / "db") as index:
        assert index.lagging
        scores, ids = index.search(queries, 10)
    truth_scores, truth_ids = _exact(tmp_path / "db", queries, 10)
    np.testing.assert_array_equal(ids, truth_ids)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)

    store = Store.open(tmp_path / "db", readonly=False)
    _add(store, _vectors(100, seed=3), 2040)  # 160 changes: past 5% of 2000, merged in once
    done = _refresh(store, "flat")
    assert (done.action, done.added, done.removed) == ("synced", 140, 20)
    store.close()
    assert_ann_matches_lmdb(tmp_path / "db")


def test_lists_that_drift_are_rebuilt(tmp_path):
    store = _db(tmp_path, 3000)
    built = _refresh(store, "ivf-flat")
    assert built.action == "rebuilt"
    assert _refresh(store, "ivf-flat").action == "unchanged"
    _add(store, _vectors(500, seed=4, centres=20), 3000)  # like the training sample: lists stay even
    assert _refresh(store, "ivf-flat").action == "synced"
    _add(store, _vectors(3000, seed=5, centres=1, spread=0.05), 3500)  # one new kind of content
    again = _refresh(store, "ivf-flat")
    store.close()
    assert again.action == "rebuilt" and again.reason.startswith("IVF lists drifted"), again
    assert_ann_matches_lmdb(tmp_path / "db")


def test_ivf_pq_results_are_re_ranked_with_exact_embeddings(tmp_path):
    store = _db(tmp_path, 6000)
    assert _refresh(store, "ivf-pq").factory.startswith("IVF")
    store.close()
    queries = _vectors(50, seed=6)
    truth_scores, truth = _exact(tmp_path / "db", queries, 10)
    faiss_only = ann.load_ann(tmp_path / "db")
    _, raw = ann.search(faiss_only, queries, 10)
    _, candidates = ann.search(faiss_only, queries, 10 * ann.REFINE_FACTOR)
    with SearchIndex.open(tmp_path / "db") as index:
        scores, found = index.search(queries, 10)
        exact = np.einsum("qd,qcd->qc", queries, index.vectors(candidates.clip(min=0).ravel()).reshape(50, -1, DIM))
    exact = np.where(candidates >= 0, exact, -np.inf)  # (an IVF search can return fewer than asked: -1)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :10]  # the candidates re-ranked by hand
    np.testing.assert_array_equal(found, np.take_along_axis(candidates, best, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(exact, best, axis=1), atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    raw_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, raw, strict=True)])
    assert recall > raw_recall + 0.2, (recall, raw_recall)  # PQ4 codes of 32-d vectors are coarse


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_exact_search_in_chunks_equals_one_pass(chunk):
    rng = np.random.default_rng(7)
    base = _vectors(300, seed=8)
    ids = np.sort(rng.choice(10_000, 300, replace=False))
    lookup = dict(zip(ids.tolist(), base, strict=True))
    queries = _vectors(5, seed=9)
    scores, found = ann.exact_search(queries, 12, ids, lambda part: np.stack([lookup[i] for i in part]), chunk=chunk)
    full = queries @ base.T
    top = np.argsort(-full, axis=1, kind="stable")[:, :12]
    np.testing.assert_array_equal(found, ids[top])
    np.testing.assert_allclose(scores, np.take_along_axis(full, top, axis=1), atol=1e-6)
    empty_scores, empty_ids = ann.exact_search(queries, 3, np.empty(0, np.int64), lambda part: base[:0])
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all()


def _add_labelled(store: Store, vectors: np.ndarray, start: int, rare_every: int) -> None:
    numbered = zip(range(start, start + len(vectors)), vectors, strict=True)
    items = [NewItem(f"c/{i:06d}.jpg", "rare" if i % rare_every == 0 else "common", 1, 0, 1, 1,
                     i.to_bytes(16, "little"), v) for i, v in numbered]
    store.commit_batch(items, [])


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "hnsw"])
@pytest.mark.parametrize("few", [True, False])  # few: the label's ids searched exactly; else FAISS + ID selector
def test_a_rare_label_gets_k_of_its_items_as_brute_force_ranks_them(tmp_path, monkeypatch, kind, few):
    """A label on 1% of the items, with FAISS lagging LMDB by 100 items: k results, all of that label, equal to
    brute force over its items (exact: for few ids, for Flat, and for rows an approximate index left short)."""
    monkeypatch.setattr(ann, "MERGE_MIN_BYTES", 0)
    if not few:
        monkeypatch.setattr(ann, "EXACT_CHUNK", 7)
    store = Store.open(tmp_path / "db", readonly=False)
    store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 32), str(tmp_path))
    _add_labelled(store, _vectors(6000, seed=4), 0, rare_every=100)
    _refresh(store, kind)
    _add_labelled(store, _vectors(100, seed=5), 6000, rare_every=100)  # one more rare item: 6000
    assert _refresh(store, kind).action == "lagging"
    store.close()
    queries, k = _vectors(30, seed=6), 10
    with SearchIndex.open(tmp_path / "db") as index:
        assert index.lagging
        rare = index.ids_with_labels(["rare"])
        assert len(rare) == 61 and index.label_counts() == {"rare": 61, "common": 6039}
        assert index.ids_with_labels(["rare", "common", "nope"]).tolist() == index.ids().tolist()
        assert len(index.ids_with_labels(["nope"])) == 0
        scores, ids = index.search(queries, k, only=rare)
        truth = queries @ index.vectors(rare).T
    assert np.isin(ids, rare).all()  # k of them in every row, none from another label
    top = np.argsort(-truth, axis=1, kind="stable")[:, :k]
    if few or kind == "flat":
        np.testing.assert_array_equal(ids, rare[top])
        np.testing.assert_allclose(scores, np.take_along_axis(truth, top, axis=1), atol=1e-5)
    else:  # approximate index: its own ranking, but full rows
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, rare[top], strict=True)])
        assert recall >= 0.5, recall
