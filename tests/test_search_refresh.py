"""Long-lived readers: a resident SearchIndex that refreshes sees each writer run's items and keeps data.mdb
from growing run after run (a held snapshot makes it grow every run), and a reader killed with -9 loses its
LMDB reader slot when the next writer starts. Writers are real processes using the store API."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from tests.index_support import REPO

N_ITEMS, DIM = 384, 64
# One "index run": every path gets new content (so its old item, record and vectors are freed and replaced).
WRITER = f"""
import sys
import numpy as np
from indexer.store.layout import EncoderInfo, NewItem
from indexer.store.lmdb_store import Store

db, run = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(run)
with Store.open(db, readonly=False) as store:
    store.begin_run(EncoderInfo("synthetic", "f" * 64, {DIM}, 32), "/nonexistent")
    for start in range(0, {N_ITEMS}, 64):
        vectors = rng.standard_normal((64, {DIM})).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.commit_batch([NewItem(f"c{{i % 4}}/img{{i}}.jpg", f"c{{i % 4}}", 1000, run, 32, 32, rng.bytes(16), v)
                            for i, v in zip(range(start, start + 64), vectors)], [])
    print(store.disk_bytes())
"""


def _write_run(db, run: int) -> int:
    """One writer run in a fresh process; returns the LMDB bytes in use after it."""
    out = subprocess.run([sys.executable, "-c", WRITER, str(db), str(run)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def _runs_with_a_resident_reader(db, runs: int, *, refresh: bool) -> list[int]:
    _write_run(db, 0)
    sizes = []
    with SearchIndex.open(db, gpu=False) as index:
        for run in range(1, runs + 1):
            sizes.append(_write_run(db, run))
            if refresh:
                generation = index.generation
                assert index.refresh() is True and index.generation > generation
                assert index.refresh() is False  # nothing changed since: only the transaction is renewed
                items = list(index.iter_items())
                assert len(items) == N_ITEMS and {item.mtime_ns for item in items} == {run}  # this run's items
                ids = index.ids()[[0, -1]]
                _, found = index.search(index.vectors(ids), 1)
                assert found[:, 0].tolist() == ids.tolist()
            else:
                assert {item.mtime_ns for item in index.iter_items()} == {0}  # still the first state
    return sizes


@pytest.mark.slow
def test_a_refreshing_resident_reader_sees_new_runs_and_keeps_the_file_from_growing(tmp_path):
    runs = 6
    held = _runs_with_a_resident_reader(tmp_path / "held", runs, refresh=False)
    fresh = _runs_with_a_resident_reader(tmp_path / "fresh", runs, refresh=True)
    held_growth = [b - a for a, b in zip(held, held[1:], strict=False)]
    assert min(held_growth) > 0, held  # a held snapshot: every run needs new pages
    assert fresh[-1] == fresh[-2] == fresh[-3], fresh  # refreshed: freed pages are reused, the file stops growing
    assert held[-1] > 2 * fresh[-1], (held, fresh)


def _reader_pids(store: Store) -> set[int]:
    table = store._env.readers()  # LMDB's reader table: "pid thread txnid" per slot
    return {int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+[0-9a-fx]+\s+\d+", table, re.MULTILINE)}


@pytest.mark.slow
def test_a_killed_readers_slot_is_freed_when_the_next_writer_starts(tmp_path):
    db = tmp_path / "db"
    _write_run(db, 0)
    reader_code = ("import sys, time\nfrom indexer.store.search import SearchIndex\n"
                   "index = SearchIndex.open(sys.argv[1])\n"
                   "print('ready', flush=True)\ntime.sleep(120)\n")
    # This process keeps the environment open, so the lock table is not simply reset by the next opener.
    with Store.open(db) as store:
        reader = subprocess.Popen([sys.executable, "-c", reader_code, str(db)], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            assert reader.pid in _reader_pids(store)
        finally:
            reader.kill()
            reader.wait(30)
        assert reader.pid in _reader_pids(store)  # the dead reader's slot would pin its pages forever
        _write_run(db, 1)
        assert reader.pid not in _reader_pids(store)
