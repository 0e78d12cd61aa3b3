"""Real processes: `index` killed with SIGKILL and run again; queries and a second `index` during a run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from indexer.build.pipeline import IndexConfig, run_index
from indexer.store.layout import ids_digest
from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from tests.index_support import (
    assert_ann_matches_lmdb,
    assert_same_state,
    cli_index,
    db_state,
    full_state,
    kill_at,
    make_folder,
    save_run,
    wait_for_items,
    write_image,
)

ARGS = ("--batch-size", "2", "--workers", "0")  # many small commits: many moments to be killed in

pytestmark = [pytest.mark.usefixtures("single_thread_torch"), pytest.mark.slow]


def _reference(folder: Path, db: Path, model: Path) -> dict:
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(model), batch_size=4, workers=0))
    return db_state(db)


def _assert_consistent(db: Path) -> None:
    """What a crash must never leave: an item without its path, hash or embedding, or a wrong ids digest."""
    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        assert snap.header.ids_digest == ids_digest(ids)
        paths = dict(snap.paths())
        assert sorted(p.id for p in paths.values()) == ids.tolist()
        items = snap.items(ids)
        assert all(paths[it.relpath.encode()].id == it.id for it in items)
        assert all(snap.find_hashes([it.content_hash]) for it in items)
        assert np.isfinite(snap.vectors(ids)).all()


def _assert_search_matches_snapshot(db: Path) -> int:
    """Search results equal exact search over the LMDB snapshot, whatever state FAISS is in."""
    with SearchIndex.open(db) as index:
        ids = index.ids()
        vectors = index.vectors(ids)
        queries = np.random.default_rng(0).standard_normal((5, vectors.shape[1])).astype(np.float32)
        _, found = index.search(queries, 3)
        np.testing.assert_array_equal(found, ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :3]])
        return len(index)


def test_killed_at_several_points_then_resumed_equals_a_fresh_index(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=40)
    (folder / "class0/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    reference = _reference(folder, tmp_path / "reference", tiny_run_dir)
    seen = []
    for target in (1, 50, 110):  # after the first commit, early, late; with a decode worker process
        seen.append(kill_at(db, cli_index(folder, db, tiny_run_dir, *ARGS, "--workers", "1", wait=False), target))
        _assert_consistent(db)
        assert len(db_state(db)) >= seen[-1]
    before = len(db_state(db))
    done = cli_index(folder, db, tiny_run_dir, *ARGS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    counts = (summary["indexed"], summary["unchanged"], summary["total"], summary["failed"])
    assert counts == (160 - before, before, 160, 1)
    assert_same_state(db_state(db), reference)  # every image exactly once, same records and embeddings
    assert_ann_matches_lmdb(db)


def test_killed_incremental_run_is_searchable_then_resumes(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=4, per_class=30)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), batch_size=4, workers=0))
    for rel in rels[:10]:
        (folder / rel).unlink()
    for i, rel in enumerate(rels[10:20]):
        write_image(folder / rel, 7000 + i)
    for i in range(40):
        write_image(folder / f"class{i % 4}/new{i:02d}.jpg", 8000 + i)
    kill_at(db, cli_index(folder, db, tiny_run_dir, *ARGS, wait=False), 130)
    _assert_consistent(db)
    with SearchIndex.open(db) as index:
        assert index.lagging  # ann.faiss is from the first run
    assert _assert_search_matches_snapshot(db) >= 130
    summary = run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), batch_size=2, workers=0))
    assert (summary.total, summary.removed, summary.ann.action) == (150, 10, "synced")
    assert_same_state(db_state(db), _reference(folder, tmp_path / "reference", tiny_run_dir))
    assert_ann_matches_lmdb(db)


def test_queries_and_a_second_index_during_a_run(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=3, per_class=100)
    running = cli_index(folder, db, tiny_run_dir, "--batch-size", "1", "--workers", "0", wait=False)
    try:
        wait_for_items(db, running, 20)
        second = CliRunner().invoke(cli.cli, ["index", str(folder), "--db", str(db), "--model", str(tiny_run_dir)])
        assert second.exit_code == 1 and "locked" in second.output and "Traceback" not in second.output
        assert 20 <= _assert_search_matches_snapshot(db) < 300  # the last committed state, mid-run
        assert running.poll() is None
    finally:
        out, err = running.communicate(timeout=300)
    assert running.returncode == 0, err
    assert _assert_search_matches_snapshot(db) == 300
    with SearchIndex.open(db) as index:
        assert not index.lagging


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (read from /proc, Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_decode_worker_costs_nothing(tmp_path, tiny_run_dir):
    """A worker killed from outside (as the OOM killer would): its batch is decoded again in a fresh worker,
    one file at a time; every file decodes there, so the run ends complete."""
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=40)
    proc = cli_index(folder, db, tiny_run_dir, *ARGS, "--workers", "1", wait=False)
    wait_for_items(db, proc, 10)
    workers = _children(proc.pid)
    assert workers, "no decode worker process found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "a decode worker died" in err and "decoding the files in flight one by one" in err
    summary = json.loads(out)
    assert (summary["total"], summary["failed"]) == (160, 0)
    assert_same_state(db_state(db), _reference(folder, tmp_path / "reference", tiny_run_dir))
    assert_ann_matches_lmdb(db)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_with_busy_workers_restarts_at_once(tmp_path, tiny_run_dir):
    """SIGKILL of `index` while its decode workers are busy, and the same command again with no pause: the
    writer lock died with the writer (the workers never held it), and the orphaned workers are gone."""
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=60)
    for attempt in range(2):
        proc = cli_index(folder, db, tiny_run_dir, "--batch-size", "4", "--workers", "2", wait=False)
        wait_for_items(db, proc, 8 + 40 * attempt)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "decode workers not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # not communicate(): that would wait for orphans holding the pipes
        again = cli_index(folder, db, tiny_run_dir, "--batch-size", "4", "--workers", "2", wait=False)
        try:
            wait_for_items(db, again, 1 + max(0, 8 + 40 * attempt), timeout=120)
            assert again.poll() is None or again.returncode == 0
        finally:
            os.kill(again.pid, signal.SIGKILL)
            again.wait(timeout=30)
            proc.communicate(timeout=30)
        assert "locked" not in again.communicate(timeout=30)[1]
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "orphaned decode workers still running"
    done = cli_index(folder, db, tiny_run_dir, "--batch-size", "4", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert_same_state(db_state(db), _reference(folder, tmp_path / "reference", tiny_run_dir))


def _mutate(folder: Path, rels: list[str]) -> None:
    """The changes of a second run: 10 files deleted, 5 changed, 10 new, one more bad file."""
    for rel in rels[:10]:
        (folder / rel).unlink()
    for i, rel in enumerate(rels[10:15]):
        write_image(folder / rel, 7000 + i)
    for i in range(10):
        write_image(folder / f"class{i % 4}/new{i:02d}.jpg", 8000 + i)
    (folder / "class2/also_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


@pytest.mark.parametrize("point", ["begin_run", "removals", "removals_2nd", "ann_renames", "map_resize"])
def test_killed_outside_the_encode_phase_then_resumed_equals_a_clean_run(tmp_path, tiny_run_dir, point):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=4, per_class=15)
    (folder / "class0/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    if point != "map_resize":  # map_resize: the killed run is the first, into a fresh DB with a tiny map
        assert cli_index(folder, db, tiny_run_dir, *ARGS).returncode == 0
    _mutate(folder, rels)
    killed = cli_index(folder, db, tiny_run_dir, *ARGS, kill_point=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "removals_2nd":  # the first 4 of the 10 removals were committed, the rest were not
        assert sum(rel not in db_state(db) for rel in rels[:10]) == 4
    done = cli_index(folder, db, tiny_run_dir, *ARGS)
    assert done.returncode == 0, done.stderr
    state, failures = full_state(db)
    clean_state, clean_failures = full_state(_clean(folder, tmp_path, tiny_run_dir))
    assert_same_state(state, clean_state)
    assert failures == clean_failures == {"class0/broken.jpg": (failures["class0/broken.jpg"][0], False),
                                          "class2/also_broken.png": (failures["class2/also_broken.png"][0], False)}
    assert_ann_matches_lmdb(db)
    assert _assert_search_matches_snapshot(db) == 60  # 60 - 10 deleted + 10 new
    with SearchIndex.open(db) as index:
        assert not index.lagging


def _clean(folder: Path, tmp_path: Path, model: Path) -> Path:
    db = tmp_path / "clean"
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(model), batch_size=4, workers=0))
    return db


# ------------------------------------------------------------------------------------- generations (issue 20)


def _live(db: Path) -> int:
    from indexer.store.generations import read_pointer

    return read_pointer(db).live


def test_a_new_generation_killed_while_building_leaves_the_live_one_served_then_resumes(tmp_path, tiny_run_dir,
                                                                                        tiny_model_spec):
    from indexer.store.generations import generation_dir, list_generations

    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=40)
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=1, embed_dim=16)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), batch_size=8, workers=0))
    live_before = db_state(db)
    seen = []
    for target in (1, 90):  # after the first commit into generation 2, then late in the resumed build
        proc = cli_index(folder, db, other, *ARGS, wait=False)
        seen.append(kill_at(generation_dir(db, 2), proc, target))
        assert _live(db) == 1
        assert_same_state(db_state(db), live_before)  # the live generation is untouched, and still served
        assert _assert_search_matches_snapshot(db) == 160
        _assert_consistent(generation_dir(db, 2))
        assert {g.id: g.state for g in list_generations(db)} == {1: "live", 2: "building"}
    held = len(db_state(generation_dir(db, 2)))
    assert held >= seen[-1]
    done = cli_index(folder, db, other, *ARGS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["generation"], summary["live_generation"], summary["encoded"]) == (2, 2, 160 - held)
    assert_same_state(db_state(generation_dir(db, 2)), _reference(folder, tmp_path / "reference", other))
    assert_ann_matches_lmdb(generation_dir(db, 2))
    assert_same_state(db_state(db), live_before)  # kept as the previous generation


@pytest.mark.parametrize("point", ["switch_before", "switch_after"])
def test_killed_during_the_switch_leaves_exactly_one_live_generation(tmp_path, tiny_run_dir, tiny_model_spec, point):
    from indexer.store.generations import generation_dir, list_generations

    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=10)
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=1)
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(tiny_run_dir), batch_size=8, workers=0))
    killed = cli_index(folder, db, other, *ARGS, kill_point=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    states = {g.id: g.state for g in list_generations(db)}
    assert list(states.values()).count("live") == 1
    assert _live(db) == (1 if point == "switch_before" else 2)
    with SearchIndex.open(db) as index:  # whichever is live answers, complete
        assert index.generation_id == _live(db) and len(index) == 20
    done = cli_index(folder, db, other, *ARGS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["live_generation"], summary["encoded"]) == (2, 0)  # nothing encoded twice
    assert {g.id: g.state for g in list_generations(db)} == {1: "previous", 2: "live"}
    assert_same_state(db_state(generation_dir(db, 2)), _reference(folder, tmp_path / "reference", other))
