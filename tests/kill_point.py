"""Run `cli.py ARGS...` with SIGKILL armed at one named moment of an index run (used by test_index_crash.py).

    python tests/kill_point.py POINT index FOLDER --db DB ...

POINT:
  begin_run    inside begin_run's transaction, after the header is written, before the commit
  removals     inside remove_paths' transaction, after the items are deleted, before the commit
  removals_2nd the same in the second removal transaction, removals committed 4 at a time
  ann_renames  after ann.faiss is renamed into place, before ann.json is
  map_resize   at the 2nd "LMDB map full" (the DB starts with a 48 KiB map), before the map grows
  switch_before  the switch to a new generation: generations.json's new version written and fsync'd, not renamed
  switch_after   the same, just after the rename (before the folder's fsync and the pruning of old generations)
The process kills itself with SIGKILL, as `kill -9` would: no cleanup runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    from indexer.store import lmdb_store as store

    if point == "begin_run":
        real_begin = store.Store.begin_run

        def begin_run(self, *args, **kwargs):
            real_write = store._write_header

            def write_then_die(txn, dbs, header):
                real_write(txn, dbs, header)
                _die()

            store._write_header = write_then_die
            return real_begin(self, *args, **kwargs)

        store.Store.begin_run = begin_run
    elif point in ("removals", "removals_2nd"):
        from indexer.build import pipeline

        nth = 1 if point == "removals" else 2
        pipeline.REMOVE_BATCH = 4 if nth == 2 else pipeline.REMOVE_BATCH
        real_remove, real_update = store.Store.remove_paths, store.Store._update_header
        calls = []

        def remove_paths(self, keys):
            calls.append(len(keys))
            self._dying = len(calls) == nth
            return real_remove(self, keys)

        def update_header(self, txn, added, removed, **changes):
            header = real_update(self, txn, added, removed, **changes)
            if getattr(self, "_dying", False):
                assert len(removed) > 0
                _die()
            return header

        store.Store.remove_paths, store.Store._update_header = remove_paths, update_header
    elif point == "ann_renames":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if str(dst).endswith("ann.faiss"):
                _die()

        os.replace = replace
    elif point == "map_resize":
        real_open = store.Store.open.__func__
        store.Store.open = classmethod(lambda cls, db_dir, **kw: real_open(cls, db_dir, **{**kw, "map_size": 48 << 10}))
        real_log, seen = store.log, []

        class DyingLog:
            def __getattr__(self, name):
                return getattr(real_log, name)

            def info(self, msg, *args):
                if msg.startswith("LMDB map full"):
                    seen.append(1)
                    if len(seen) == 2:
                        _die()
                real_log.info(msg, *args)

        store.log = DyingLog()
    elif point in ("switch_before", "switch_after"):
        import json

        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            switching = False
            if str(dst).endswith("generations.json"):
                old = json.loads(Path(dst).read_text())["live"] if Path(dst).exists() else 1
                switching = json.loads(Path(src).read_text())["live"] != old
            if switching and point == "switch_before":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if switching:
                _die()

        os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1])
    import cli

    cli.cli(sys.argv[2:], prog_name="cli.py")
