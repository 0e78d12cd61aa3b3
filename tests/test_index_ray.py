"""`index --ray`: the encode stage on Ray Data gives the same DB as the local path, and survives killed
processes (a Ray worker, the driver). One local Ray (2 CPUs, no dashboard, small object store) per module;
the CLI runs join it with --ray-address, as `--ray-address auto` joins a cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.build.encode import Committer, Loaded
from indexer.build.pipeline import IndexConfig, IndexSummary, run_index
from indexer.build.ray_encode import RAY_SYSTEM_CONFIG, ActorReport, RayPlan, _actor_env, encode_files_ray, plan_actors
from indexer.build.scan import FileEntry, scan_folder
from indexer.store.layout import EncoderInfo
from indexer.store.lmdb_store import Store
from retrieval.data.decode import DEFAULT_MAX_PIXELS
from retrieval.encoder import load_encoder
from tests.index_support import (
    assert_ann_matches_lmdb,
    assert_same_state,
    cli_index,
    db_state,
    kill_at,
    make_folder,
    wait_for_items,
    write_image,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_actor_plan_follows_the_cluster():
    assert plan_actors({"CPU": 64.0, "GPU": 8.0}, 256) == RayPlan(
        actors=8, gpus_per_actor=1, threads_per_actor=0, decode_tasks=56, window_files=8 * 256 * 512)
    assert plan_actors({"CPU": 2.0}, 64) == RayPlan(
        actors=1, gpus_per_actor=0, threads_per_actor=2, decode_tasks=1, window_files=2**16)  # the floor
    assert plan_actors({"CPU": 64.0}, 64) == RayPlan(
        actors=16, gpus_per_actor=0, threads_per_actor=4, decode_tasks=8, window_files=16 * 64 * 512)
    assert plan_actors({"CPU": 64.0}, 64, actors=3) == RayPlan(3, 0, 4, 52, 3 * 64 * 512)
    assert plan_actors({"CPU": 4096.0, "GPU": 512.0}, 256).window_files == 2**20  # the cap, whatever the cluster


def test_a_file_the_encode_step_has_no_embedding_for_is_left_to_the_caller(tmp_path):
    """Committer.take (both paths' commit step) stores what it has and hands back what it has not."""
    db = tmp_path / "db"
    todo = [FileEntry(f"c/{i}.jpg", 10, 1, 1) for i in range(3)]
    loaded = [Loaded(i, content_hash=bytes([i]) * 16, size=10, mtime_ns=1, width=4, height=4) for i in range(3)]
    vectors = np.eye(3, dtype=np.float32)
    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("test", "f" * 64, 3, 8), str(tmp_path))
        committer = Committer(store, total=3, limits="", checkpoint=lambda: None, checkpoint_seconds=600.0,
                              progress=False)
        missing = committer.take(todo, loaded, lambda rows: [None if r == 1 else vectors[r] for r in rows])
        committer.close()
    assert [x.index for x in missing] == [1]
    assert (committer.counts.encoded, committer.counts.reused) == (2, 0)
    state = db_state(db)
    assert sorted(state) == ["c/0.jpg", "c/2.jpg"]
    np.testing.assert_array_equal(state["c/2.jpg"][1], vectors[2])


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             _system_config=RAY_SYSTEM_CONFIG)  # workers at the driver's priority, as a local `index --ray`
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _cfg(folder: Path, db: Path, model: Path, **kw) -> IndexConfig:
    return IndexConfig(folder=folder, db_dir=db, model=str(model), **{"batch_size": 4, "workers": 0, **kw})


def _bad_files(folder: Path) -> None:
    (folder / "class0/truncated.jpg").write_bytes((folder / "class0/img000.jpg").read_bytes()[:300])
    (folder / "class1/empty.png").write_bytes(b"")
    (folder / "class2/notes.jpg").write_text("not an image")


def _summary(s: IndexSummary) -> tuple:
    return s.indexed, s.encoded, s.reused, s.unchanged, s.removed, s.failed, s.total, s.failures


@pytest.mark.slow
def test_ray_path_gives_the_local_db_item_by_item(tmp_path, tiny_run_dir, ray_address):
    folder = tmp_path / "images"
    rels = make_folder(folder, classes=3, per_class=8)
    _bad_files(folder)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    first = run_index(_cfg(folder, local, tiny_run_dir))
    assert _summary(run_index(_cfg(folder, on_ray, tiny_run_dir, ray=True))) == _summary(first)
    assert first.failed == 3
    assert_same_state(db_state(on_ray), db_state(local))
    assert_ann_matches_lmdb(on_ray)

    (folder / "class1/copy.jpg").write_bytes((folder / rels[0]).read_bytes())  # reused by content hash
    write_image(folder / rels[3], 900)                                           # changed
    (folder / rels[5]).unlink()                                                  # deleted
    write_image(folder / "class0/new.png", 901)                                  # new
    second = run_index(_cfg(folder, local, tiny_run_dir))
    assert (second.encoded, second.reused, second.removed) == (2, 1, 1)
    assert _summary(run_index(_cfg(folder, on_ray, tiny_run_dir, ray=True))) == _summary(second)
    assert_same_state(db_state(on_ray), db_state(local))
    assert_ann_matches_lmdb(on_ray)


def test_ray_actors_embed_with_the_encoders_tta(tmp_path, tiny_run_dir, ray_address):
    """--tta flip travels with the encoder to the actors: the same flip-averaged DB as the local path."""
    folder = tmp_path / "images"
    make_folder(folder, classes=2, per_class=3)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    run_index(_cfg(folder, local, tiny_run_dir, tta="flip"))
    run_index(_cfg(folder, on_ray, tiny_run_dir, tta="flip", ray=True))
    assert_same_state(db_state(on_ray), db_state(local))
    with Store.open(on_ray) as store:
        assert store.header().encoder.tta == "flip"
    plain = run_index(_cfg(folder, tmp_path / "plain", tiny_run_dir))
    assert plain.fingerprint != run_index(_cfg(folder, on_ray, tiny_run_dir)).fingerprint


def _cpu_ticks() -> dict[str, int]:
    """CPU clock ticks (user + system) of each thread of this process."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[task.name] = int(fields[11]) + int(fields[12])
    return out


def _minor_faults() -> int:
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


class _BatchThread:
    """A map_batches actor that reports, from the thread Ray calls its batches on, how many threads a
    convolution kept busy and how many pages faulted in while 200 MB were allocated and freed 5 times."""

    def __init__(self):
        import torch

        torch.set_num_threads(2)  # as _EncodeActor does: in __init__, on another thread than the batch calls

    def __call__(self, batch: dict) -> dict:
        import torch

        x, conv = torch.randn(32, 3, 160, 160), torch.nn.Conv2d(3, 64, 7, stride=2)
        with torch.inference_mode():
            before = _cpu_ticks()
            while max(t - before.get(k, 0) for k, t in _cpu_ticks().items()) < 100:  # 1 s of CPU in a thread
                conv(x)
        spent = sorted((t - before.get(k, 0) for k, t in _cpu_ticks().items()), reverse=True)
        np.ones(200 << 17)  # 200 MB (float64), touched, freed: the process's first time
        faults = _minor_faults()
        for _ in range(5):
            np.ones(200 << 17)
        batch["busy"] = np.array([sum(t > spent[0] // 3 for t in spent)])
        batch["pages"] = np.array([(_minor_faults() - faults) // 5])
        return batch


@pytest.mark.slow
def test_a_cpu_encode_actor_uses_its_threads_and_reuses_freed_memory(ray_address):
    """Ray calls a map actor's batches on a thread whose OpenMP team is as large as OMP_NUM_THREADS, which
    Ray sets to the actor's num_cpus (1), and whose glibc arena maps and faults in large blocks each time:
    _actor_env sets the actor's threads, one arena, no mmap and no trimming."""
    import ray

    def batch_thread(env: dict) -> dict:
        return ray.data.range(1).map_batches(
            _BatchThread, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
            runtime_env={"env_vars": env}).take_all()[0]

    tuned, default = batch_thread(_actor_env(2)), batch_thread({})
    assert (tuned["busy"], default["busy"]) == (2, 1)
    assert tuned["pages"] < 50 and default["pages"] >= 100  # 200 MB is 100 pages even if all were 2 MB ones


def _encode_on_ray(store: Store, folder: Path, todo, model: Path, **kw) -> tuple:
    """encode_files_ray on the module's Ray, as run_index calls it: (counts, ActorReport)."""
    return encode_files_ray(
        store, folder, todo, load_encoder(str(model)), precision="fp32", batch_size=4,
        max_pixels=DEFAULT_MAX_PIXELS, max_file_bytes=256 << 20, address=None, actors=None,
        **{"checkpoint": lambda: None, "checkpoint_seconds": 600.0, "progress": False, **kw})


@pytest.mark.slow
def test_ray_actors_do_not_encode_content_the_db_holds(tmp_path, tiny_run_dir, ray_address):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=2, per_class=4)
    first = run_index(_cfg(folder, db, tiny_run_dir, ray=True))
    assert (first.encoded, first.reused) == (8, 0)
    (folder / "copies").mkdir()
    for i, rel in enumerate(rels[:6]):
        shutil.copy(folder / rel, folder / f"copies/{i}.jpg")
    write_image(folder / "copies/new.png", 901)
    todo = [e for e in scan_folder(folder).files if e.label == "copies"]
    with Store.open(db, readonly=False) as store:
        counts, report = _encode_on_ray(store, folder, todo, tiny_run_dir)
    assert (counts.encoded, counts.reused, counts.failures) == (1, 6, [])
    assert isinstance(report, ActorReport) and report.encoded == 1  # the actors ran the encoder on new.png only
    state = db_state(db)
    for i, rel in enumerate(rels[:6]):
        np.testing.assert_array_equal(state[f"copies/{i}.jpg"][1], state[rel][1])


@pytest.mark.slow
def test_ray_reads_the_files_to_encode_one_window_at_a_time(tmp_path, tiny_run_dir, ray_address):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=3, per_class=8)
    write_image(tmp_path / "other/x.jpg", 99_999)
    run_index(_cfg(tmp_path / "other", db, tiny_run_dir))  # binds the DB (x.jpg; the 24 files are handed over)
    pulled, seen = 0, []

    def stream(entries: list[FileEntry]):
        nonlocal pulled
        for entry in entries:
            pulled += 1
            yield entry

    def checkpoint() -> None:  # runs after every batch (checkpoint_seconds=0), everything so far committed
        with store.snapshot() as snap:
            seen.append((pulled, snap.count() - 1))

    todo = scan_folder(folder).files
    with Store.open(db, readonly=False) as store:
        counts, report = _encode_on_ray(store, folder, stream(todo), tiny_run_dir, window_files=8,
                                        checkpoint=checkpoint, checkpoint_seconds=0.0)
    assert (counts.encoded, report.encoded, pulled) == (24, 24, 24)
    assert [committed for _, committed in seen] == [4, 8, 12, 16, 20, 24]  # one checkpoint a batch of 4
    assert [read for read, _ in seen] == [8, 8, 16, 16, 24, 24]  # the plan is read on one window at a time
    assert sorted(db_state(db)) == sorted([e.relpath for e in todo] + ["x.jpg"])


@pytest.mark.slow
def test_ray_path_when_stored_content_moves_during_the_run(tmp_path, tiny_run_dir, ray_address):
    """A file changed in the run and a new file holding its old content: whichever the actor and the commit
    see first, the DB ends as the local path leaves it (a file skipped by the actor whose content the commit
    no longer finds is encoded in a last pass)."""
    folder, on_ray, local = tmp_path / "images", tmp_path / "ray", tmp_path / "local"
    rels = make_folder(folder, classes=2, per_class=6)
    for db in (on_ray, local):
        run_index(_cfg(folder, db, tiny_run_dir, batch_size=1))
    for i, rel in enumerate(rels[:4]):
        shutil.copy(folder / rel, folder / f"class1/zz{i}.jpg")  # sorted after the originals
        write_image(folder / rel, 500 + i)
    second = run_index(_cfg(folder, on_ray, tiny_run_dir, ray=True, batch_size=1, checkpoint_seconds=0.0))
    assert (second.encoded + second.reused, second.unchanged, second.total) == (8, 8, 16)
    run_index(_cfg(folder, local, tiny_run_dir, batch_size=1))
    assert_same_state(db_state(on_ray), db_state(local))


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid` (read from /proc, Linux)."""
    parents, cmdlines = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = cmdlines.get(child, "")
                frontier.append(child)
    return found


def _encode_actors() -> list[int]:
    """The encode actors of this module's Ray (its processes are children of this test process)."""
    return [pid for pid, cmd in _descendants(os.getpid()).items() if cmd.startswith("ray::MapWorker")]


def _count(db: Path) -> int:
    from indexer.store.lmdb_store import Store

    with Store.open(db) as store, store.snapshot() as snap:
        return snap.count()


def _reference(folder: Path, db: Path, model: Path) -> dict:
    run_index(_cfg(folder, db, model))
    return db_state(db)


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_and_every_image_is_stored_once(tmp_path, tiny_run_dir, ray_address):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=100)
    proc = cli_index(folder, db, tiny_run_dir, "--batch-size", "1", "--ray-address", ray_address, wait=False)
    try:
        seen = wait_for_items(db, proc, 20, timeout=180)
        actors = _encode_actors()
        assert actors, "no encode actor process found"
        for pid in actors:
            os.kill(pid, signal.SIGKILL)
        assert _count(db) < 400, "the run ended before the worker was killed"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("{"), (out[:3000], err[-3000:])
    assert seen < 400 and json.loads(out)["total"] == 400
    assert_same_state(db_state(db), _reference(folder, tmp_path / "reference", tiny_run_dir))
    assert_ann_matches_lmdb(db)


@pytest.mark.slow
def test_a_killed_driver_resumes(tmp_path, tiny_run_dir, ray_address):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=60)
    (folder / "class0/truncated.jpg").write_bytes((folder / "class0/img000.jpg").read_bytes()[:300])
    seen = kill_at(db, cli_index(folder, db, tiny_run_dir, "--batch-size", "2", "--ray-address", ray_address,
                                 wait=False), 30)
    assert 30 <= seen < 240
    deadline = time.monotonic() + 60
    while _encode_actors() and time.monotonic() < deadline:  # the cluster ends the dead driver's actors
        time.sleep(0.2)
    done = cli_index(folder, db, tiny_run_dir, "--batch-size", "2", "--ray-address", ray_address)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    before = summary["unchanged"]
    assert before >= seen and (summary["indexed"], summary["total"], summary["failed"]) == (240 - before, 240, 1)
    assert_same_state(db_state(db), _reference(folder, tmp_path / "reference", tiny_run_dir))
    assert_ann_matches_lmdb(db)
