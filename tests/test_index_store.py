"""indexer.store.lmdb_store: LMDB records, embedding chunks, ids digest, map growth, writer lock, encoder binding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from indexer.store.layout import EncoderInfo, Failure, NewItem, ids_digest
from indexer.store.lmdb_store import Store
from retrieval.errors import IndexStoreError

ENC = EncoderInfo("tiny", "a" * 64, 4, 32)


def _item(rel: str, seed: int, dim: int = 4, content: bytes | None = None) -> NewItem:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim).astype(np.float32)
    label = rel.partition("/")[0]
    return NewItem(rel, label, 100 + seed, 7 + seed, 32, 24, content or rng.bytes(16), v / np.linalg.norm(v))


def _writer(db, **kw) -> Store:
    store = Store.open(db, readonly=False, **kw)
    store.begin_run(ENC, "/images")
    return store


def test_items_and_embeddings_round_trip_across_chunks(tmp_path):
    items = [_item(f"c{i % 3}/{i}.jpg", i) for i in range(600)]  # many chunks, batches not aligned to them
    with _writer(tmp_path) as store:
        ids = [i for start in range(0, 600, 64) for i in store.commit_batch(items[start:start + 64], [])]
    assert ids == list(range(600))
    with Store.open(tmp_path) as store, store.snapshot() as snap:
        assert snap.count() == 600
        np.testing.assert_array_equal(snap.ids(), np.arange(600))
        order = [599, 3, 64, 63, 0, 300]
        np.testing.assert_array_equal(snap.vectors(order), np.stack([items[i].embedding for i in order]))
        got = snap.items([5, 10_000, -1])
        assert got[1] is None and got[2] is None
        assert (got[0].relpath, got[0].label, got[0].size, got[0].mtime_ns, got[0].content_hash) == (
            "c2/5.jpg", "c2", 105, 12, items[5].content_hash)
        assert snap.header.ids_digest == ids_digest(snap.ids())
        streamed = np.concatenate([v for _, v in snap.iter_vectors(batch=100)])
        np.testing.assert_array_equal(streamed, np.stack([x.embedding for x in items]))


def test_one_row_reads_equal_the_chunk_reads_in_dense_and_masked_chunks(tmp_path):
    items = [_item(f"c/{i}.jpg", i) for i in range(300)]
    with _writer(tmp_path) as store:
        store.commit_batch(items, [])
        # two thirds of chunks 2-4 removed: those chunks are rewritten masked (live rows only)
        store.remove_paths([f"c/{i}.jpg".encode() for i in range(128, 300) if i % 3])
    kept = [i for i in range(300) if i < 128 or i % 3 == 0]
    expected = {i: items[i].embedding for i in kept}
    with Store.open(tmp_path) as store, store.snapshot() as snap:
        rng = np.random.default_rng(0)
        for _ in range(20):
            ids = rng.choice(kept, 6, replace=False)   # mostly one id per chunk: the one-row path
            np.testing.assert_array_equal(snap.vectors(ids), np.stack([expected[i] for i in ids]))
        np.testing.assert_array_equal(snap.vectors(kept), np.stack([expected[i] for i in kept]))  # whole chunks
        for gone in (130, 182, 299 + 64):   # removed from a masked chunk, and past the end
            with pytest.raises(IndexStoreError, match=f"item {gone} is missing"):
                snap.vectors([5, gone])


def test_replacing_and_removing_paths_keeps_ids_digest_hashes_and_chunks_right(tmp_path):
    same = b"s" * 16
    with _writer(tmp_path) as store:
        store.commit_batch([_item("a/1.jpg", 1, content=same), _item("a/2.jpg", 2, content=same),
                            _item("b/3.jpg", 3)], [])
        new_ids = store.commit_batch([_item("b/3.jpg", 30)], [Failure("a/2.jpg", "truncated", 1, 2, 3)])
        assert new_ids == [3]  # a changed file gets a new id; ids are never reused
        assert store.remove_paths([b"a/1.jpg", b"not/there.jpg"]) == 1
        with store.snapshot() as snap:
            assert snap.ids().tolist() == [3]
            assert snap.header.ids_digest == ids_digest(np.array([3]))
            assert snap.find_hashes([same]) == {}  # both holders of that content are gone
            assert [(f.relpath, f.reason) for f in snap.failures()] == [("a/2.jpg", "truncated")]
            assert snap.path_state("b/3.jpg").id == 3
        store.remove_paths([b"b/3.jpg"])
        with store.snapshot() as snap:
            assert snap.count() == 0 and snap.header.ids_digest == 0
            assert snap._txn.stat(snap._dbs["vectors"])["entries"] == 0  # the emptied chunk is freed
        store.commit_batch([_item("c/4.jpg", 4)], [])
        with store.snapshot() as snap:
            np.testing.assert_array_equal(snap.vectors([4])[0], _item("c/4.jpg", 4).embedding)


def test_hash_lookup_survives_removal_of_one_duplicate(tmp_path):
    same = b"d" * 16
    with _writer(tmp_path) as store:
        store.commit_batch([_item("x/1.jpg", 1, content=same), _item("x/2.jpg", 2, content=same)], [])
        store.remove_paths([b"x/1.jpg"])
        with store.snapshot() as snap:
            assert snap.find_hashes([same, b"n" * 16]) == {same: 1}


def test_map_grows_when_full(tmp_path):
    enc = EncoderInfo("tiny", "a" * 64, 256, 32)
    with Store.open(tmp_path, readonly=False, map_size=256 * 1024) as store:
        store.begin_run(enc, "/images")
        items = [_item(f"c/{i}.jpg", i, dim=256) for i in range(1500)]  # about 1.6 MB of embeddings
        for start in range(0, 1500, 100):
            store.commit_batch(items[start:start + 100], [])
        assert store._env.info()["map_size"] > 256 * 1024
    with Store.open(tmp_path) as store, store.snapshot() as snap:
        assert snap.count() == 1500
        np.testing.assert_array_equal(snap.vectors([1499])[0], items[1499].embedding)


def test_second_writer_gets_locked_error(tmp_path):
    with _writer(tmp_path) as store:
        store.commit_batch([_item("a/1.jpg", 1)], [])
        with pytest.raises(IndexStoreError, match="locked"):
            Store.open(tmp_path, readonly=False)
    Store.open(tmp_path, readonly=False).close()  # released with the first writer


def test_a_forked_child_does_not_hold_the_writer_lock(tmp_path):
    """Decode workers are forked by the writer: the lock must not live on in them once the writer is gone."""
    import signal
    import subprocess
    import sys

    store = _writer(tmp_path)
    child = os.fork()
    if child == 0:  # as a decode worker would: alive, holding every inherited descriptor
        signal.pause()
        os._exit(0)
    try:
        probe = [sys.executable, "-c", "import sys; from indexer.store.lmdb_store import Store; "
                 "Store.open(sys.argv[1], readonly=False).close()", str(tmp_path)]
        held = subprocess.run(probe, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert held.returncode != 0 and f"locked: another index run (pid {os.getpid()})" in held.stderr
        store.close()  # the writer is done (or dead); its forked child lives on
        free = subprocess.run(probe, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert free.returncode == 0, free.stderr
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_reader_on_missing_db_says_how_to_create_it(tmp_path):
    with pytest.raises(IndexStoreError, match="python cli.py index"):
        Store.open(tmp_path / "nope")


def test_encoder_binding_never_empties_a_db(tmp_path):
    other = EncoderInfo("other", "b" * 64, 4, 32)
    with _writer(tmp_path) as store:
        store.commit_batch([_item("a/1.jpg", 1)], [])
        with pytest.raises(IndexStoreError, match="builds a new generation"):
            store.begin_run(other, "/images")
        with store.snapshot() as snap:
            assert snap.count() == 1 and snap.header.encoder == ENC
        store.remove_paths([b"a/1.jpg"])
        assert store.begin_run(other, "/images").encoder == other  # an empty DB simply takes the new encoder


def test_a_new_db_numbers_its_items_from_first_id(tmp_path):
    with Store.open(tmp_path / "db", readonly=False) as store:
        store.begin_run(ENC, "/images", first_id=1 << 40)
        ids = store.commit_batch([_item("a/1.jpg", 1), _item("a/2.jpg", 2)], [])
        assert ids == [1 << 40, (1 << 40) + 1]
        with store.snapshot() as snap:
            assert snap.vectors(ids).shape == (2, ENC.dim)


def test_a_transient_failure_keeps_the_item_a_permanent_one_replaces_it(tmp_path):
    with _writer(tmp_path) as store:
        store.commit_batch([_item("a/1.jpg", 1), _item("a/2.jpg", 2)], [])
        store.commit_batch([], [Failure("a/1.jpg", "cannot read file: Input/output error", 1, 1, 1, transient=True),
                                Failure("a/2.jpg", "cannot decode: truncated", 1, 1, 1)])
        with store.snapshot() as snap:
            assert [it.relpath for it in snap.items(snap.ids())] == ["a/1.jpg"]  # the old embedding stays
            assert {(f.relpath, f.transient) for f in snap.failures()} == {("a/1.jpg", True), ("a/2.jpg", False)}
