"""Index at scale: the streamed scan + plan, FAISS built from LMDB in bounded memory, an incremental 1% update,
and `index --ray` against the local encode path, in one run.

scan   For each of --scan-items (100k, 1M, 10M): an LMDB of N items written through the store API (real paths,
       records and hashes; 4-d embeddings, since only the plan's memory is measured), then, in a fresh
       process, the scan + plan of `index` (pipeline._plan: scan.scan_stream merged with the DB's keys) over a
       synthetic tree of N files in folders of 1,000, injected at the walker boundary (retrieval.data.walk.walk
       replaced by a generator of the same Found entries, listing one folder at a time with real stat
       records): 1% of the DB's files gone, 1% changed, 1% new. Reported: wall time and peak anonymous memory
       beyond the process's start (as below), for the plan and for reading its spools back in batches.
       For N <= 1M also the whole scan held as a list (scan.scan_folder, as the indexer did before), for scale.

faiss  An LMDB of --items (1M) x 512 synthetic unit vectors (drawn around 1,000 centres, closer to real
       embeddings than uniform noise) is written through the store API, as scripts/bench_query.py does. Each
       step then runs in a fresh process that reports its wall time and memory: peak anonymous memory (the heap,
       sampled every 20 ms) beyond the process's start, which excludes LMDB's memory-mapped pages (page cache,
       shared and reclaimable), and the FAISS file's size (the index itself).
         build     `ann.refresh(kind=auto)` from scratch: `auto`'s choice for this size and this machine's RAM
         recall    recall@10 of SearchIndex.search (what `query` and `eval` use) against exact search over the
                   LMDB snapshot, for 200 held-out queries; also for ivf-pq (auto's choice past RAM, with its
                   re-ranking from LMDB) built the same way
         add 1%    1% more vectors committed, then `ann.refresh`: the file is left lagging, searched around
         merge     the same update merged into the file as before this change (load, add, rewrite), for scale
ray    --images JPEGs (1024x768) indexed with lite0 by `python cli.py index` on the local path (one decode
       worker) and with `--ray-address` on a local 2-CPU Ray started once (as `ray start` would be),
       alternating, --rounds each: the steady rate (images/s between 10% and 90% committed, polled from the
       DB; batches of 16 for both), and the encode stage's overall rate (for Ray including its actors'
       start-up, loading the model). On a machine shared with other jobs the rates follow the load; what
       does not is the CPU the run cost between those marks: CPU-ms per image and the cores it kept busy,
       summed over every process below this one alive at the 90% mark (the `index` process, its decode
       workers, and Ray's processes: raylet, GCS, decode tasks, actors; other users' are not counted);
       with --by-process also per process: user and system CPU-ms and minor page faults per image.

    python scripts/bench_scale.py [--items 1000000] [--images 256] [--rounds 2] [--skip scan|faiss|ray]
                                  [--scan-items 100000,1000000,10000000] [--work DIR] [--by-process]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 512
CENTRES = 1000


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((CENTRES, DIM), dtype=np.float32)
    x = centres[rng.integers(CENTRES, size=n)] + 0.8 * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_db(db: Path, n: int, start: int = 0, batch: int = 10_000) -> None:
    """Commit n synthetic items (ids and paths from `start`) through the store API."""
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store

    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, DIM, 224), str(db.parent / "images"))
        for at in range(start, start + n, batch):
            vectors = _vectors(min(batch, start + n - at), seed=at)
            items = [NewItem(f"c{i % 1000:04d}/img{i:08d}.jpg", f"c{i % 1000:04d}", 50_000, 0, 640, 480,
                             i.to_bytes(16, "little"), v)
                     for i, v in zip(range(at, at + len(vectors)), vectors, strict=True)]
            store.commit_batch(items, [])


class _Memory:
    """Peak anonymous memory (RssAnon) of this process, sampled in a thread."""

    def __init__(self) -> None:
        self.start = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon()) - self.start


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


FILES_PER_FOLDER = 1000
SCAN_DIM = 4


def _scan_rel(j: int, new: bool = False) -> str:
    return f"d{j // FILES_PER_FOLDER:05d}/img{j:08d}{'n' if new else ''}.jpg"


def write_scan_db(db: Path, n: int, batch: int = 20_000) -> None:
    """Commit n items with the synthetic tree's paths (all with size 50,000 and mtime 1) through the store API."""
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store

    vector = np.full(SCAN_DIM, 0.5, dtype=np.float32)
    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, SCAN_DIM, 224), str(db.parent / "tree"))
        for at in range(0, n, batch):
            store.commit_batch([NewItem(_scan_rel(j), f"d{j // FILES_PER_FOLDER:05d}", 50_000, 1, 640, 480,
                                        j.to_bytes(16, "little"), vector) for j in range(at, min(at + batch, n))], [])


def synthetic_walk(n: int) -> Iterator:
    """What retrieval.data.walk.walk would yield for the synthetic tree of n files, one folder listed (with
    real os.stat_result records) at a time: of the DB's files, j % 100 == 1 is gone, == 2 changed (mtime 2),
    and == 3 has a new file beside it."""
    from retrieval.data.walk import Found

    def stat(mtime: int) -> os.stat_result:
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, 50_000, 0, mtime, mtime),
                              {"st_mtime_ns": mtime, "st_ctime_ns": mtime})

    for first in range(0, n, FILES_PER_FOLDER):
        listing = []
        for j in range(first, min(first + FILES_PER_FOLDER, n)):
            if j % 100 != 1:
                listing.append(Found(_scan_rel(j), stat(2 if j % 100 == 2 else 1)))
            if j % 100 == 3:
                listing.append(Found(_scan_rel(j, new=True), stat(1)))
        listing.sort(key=lambda found: os.fsencode(found.relpath))
        yield from listing


def scan_step(name: str, db: Path, n: int) -> dict:
    """The scan + plan of `index` over the synthetic tree against the DB, measured in this (fresh) process."""
    from indexer.build import pipeline, scan
    from indexer.store.lmdb_store import Store

    scan.walk = lambda root: synthetic_walk(n)  # the walker boundary: everything past it is the real code
    cfg = pipeline.IndexConfig(folder=db.parent / "tree", db_dir=db)
    out: dict = {"step": name, "entries": n}
    with Store.open(db, readonly=False) as store:
        memory = _Memory()
        start = time.perf_counter()
        if name == "scan-list":
            listed = scan.scan_folder(cfg.folder)
            out["files"] = len(listed.files)
        else:
            plan, _ = pipeline._plan(store, cfg.folder, cfg)
            out["plan_s"] = round(time.perf_counter() - start, 2)
            out["plan_peak_heap_mb"] = round((max(memory.peak, _rss_anon()) - memory.start) / 2**20, 1)
            with plan:
                todo = sum(len(batch) for batch in plan.todo.batches(64))
                removed = sum(len(keys) for keys in plan.removed.batches(pipeline.REMOVE_BATCH))
                out.update(todo=todo, removed=removed, unchanged=plan.unchanged, spool_mb=round(
                    sum(spool._file.tell() for spool in (plan.todo, plan.removed)) / 2**20, 1))
            expected = (n // 100 + (n % 100 > 2)) + (n // 100 + (n % 100 > 3)), n // 100 + (n % 100 > 1)
            assert (todo, removed) == expected, (todo, removed, expected)
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["peak_heap_mb"] = round(memory.stop() / 2**20, 1)
    return out


def bench_scan(work: Path, sizes: list[int]) -> list[dict]:
    results = []
    for n in sizes:
        db = work / f"db-scan-{n}"
        if not (db / "data.mdb").exists():
            start = time.perf_counter()
            write_scan_db(db, n)
            print(json.dumps({"step": "write LMDB", "items": n, "seconds": round(time.perf_counter() - start, 1),
                              "lmdb_mb": round((db / "data.mdb").stat().st_size / 2**20, 1)}), flush=True)
        results.append(_run_step("scan", db, "auto", n))
        if n <= 1_000_000:
            results.append(_run_step("scan-list", db, "auto", n))
    return results


def step(name: str, db: Path, kind: str, items: int) -> dict:
    """One measured step, run in this (fresh) process."""
    from indexer.store import ann
    from indexer.store.lmdb_store import Store
    from indexer.store.search import SearchIndex

    if name.startswith("scan"):
        return scan_step(name, db, items)
    out: dict = {"step": name}
    memory = _Memory()
    start = time.perf_counter()
    if name == "build":
        with Store.open(db, readonly=False) as store, store.snapshot() as snap:
            out["ann"] = ann.refresh(db, snap, kind, rebuild=True).to_json()
    elif name in ("add", "merge"):
        if name == "merge":
            ann.MERGE_MIN_BYTES = 1 << 62  # the behaviour before: every update loads, syncs and rewrites
        with Store.open(db, readonly=False) as store, store.snapshot() as snap:
            out["ann"] = ann.refresh(db, snap, kind).to_json()
    elif name == "recall":
        queries = _vectors(200, seed=999_999_937)
        with SearchIndex.open(db, gpu=False) as index:
            t = time.perf_counter()
            _, found = index.search(queries, 10)
            out["search_ms_per_query"] = round((time.perf_counter() - t) * 1e3 / len(queries), 2)
            out["lagging"] = index.lagging
            ids = index.ids()
            _, truth = ann.exact_search(queries, 10, ids, index.vectors)
        hits = [len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]
        out["recall@10"] = round(float(np.mean(hits)), 4)
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["peak_heap_mb"] = round(memory.stop() / 2**20, 1)
    if (db / ann.ANN_FILE).exists():
        out["faiss_mb"] = round((db / ann.ANN_FILE).stat().st_size / 2**20, 1)
    return out


def _run_step(name: str, db: Path, kind: str, items: int) -> dict:
    cmd = [sys.executable, __file__, "--step", name, "--db", str(db), "--kind", kind, "--items", str(items)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def bench_faiss(work: Path, n: int) -> list[dict]:
    db = work / "db-scale"
    shutil.rmtree(db, ignore_errors=True)
    start = time.perf_counter()
    write_db(db, n)
    print(json.dumps({"step": "write LMDB", "items": n, "seconds": round(time.perf_counter() - start, 1),
                      "lmdb_mb": round((db / "data.mdb").stat().st_size / 2**20, 1)}), flush=True)
    results = [_run_step("build", db, "auto", n), _run_step("recall", db, "auto", n)]
    write_db(db, n // 100, start=n)
    results += [_run_step("add", db, "auto", n), _run_step("recall", db, "auto", n),
                _run_step("merge", db, "auto", n), _run_step("build", db, "ivf-pq", n),
                _run_step("recall", db, "ivf-pq", n)]
    return results


def bench_ray(work: Path, images: int, rounds: int, by_process: bool = False) -> dict:
    import ray
    from PIL import Image

    folder = work / "jpegs"
    if len(list(folder.glob("*/*.jpg"))) != images:
        shutil.rmtree(folder, ignore_errors=True)
        small = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        for i in range(images):  # smooth content (upscaled noise): JPEG decoding costs what a photo's does
            path = folder / f"c{i % 8}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(np.roll(small, i, axis=1)).resize((1024, 768), Image.Resampling.BICUBIC)
            image.save(path, quality=90)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    ray_start = time.perf_counter() - start
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    cpu_ms: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for _ in range(rounds):
            for mode in ("local", "ray"):
                db = work / f"db-{mode}"
                shutil.rmtree(db, ignore_errors=True)
                extra = ["--ray-address", address] if mode == "ray" else []
                row = _timed_index(folder, db, images, extra, by_process)
                rates[mode].append(row["steady_images_per_s"] or 0.0)
                cpu_ms[mode].append(row["steady_cpu_ms_per_image"] or 0.0)
                print(json.dumps({"mode": mode, "images": images, **row}), flush=True)
    finally:
        ray.shutdown()
    local, on_ray = (statistics.median(r for r in rates[mode] if r) for mode in ("local", "ray"))
    result = {"ray_start_s": round(ray_start, 1), "local_steady_images_per_s": rates["local"],
              "ray_steady_images_per_s": rates["ray"], "ratio_of_medians": round(on_ray / local, 3),
              "cpu_ms_per_image": cpu_ms, "cpu_ratio_of_medians": round(statistics.median(cpu_ms["local"])
                                                                         / statistics.median(cpu_ms["ray"]), 3)}
    print(json.dumps(result), flush=True)
    return result


def _timed_index(folder: Path, db: Path, images: int, extra: list[str], by_process: bool = False) -> dict:
    """`python cli.py index` in a subprocess, the DB polled from here: the steady rate is images/s between
    10% and 90% committed (start-up, model loading and the last batches left out)."""
    from indexer.store.lmdb_store import Store
    from retrieval.errors import IndexStoreError

    cmd = [sys.executable, "cli.py", "index", str(folder), "--db", str(db), "--batch-size", "16", "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    marks: dict[float, float] = {}
    cpu: dict[float, dict[int, _Usage]] = {}
    store = None
    while proc.poll() is None and len(marks) < 2 and time.perf_counter() - start < 1800:
        try:
            store = store or Store.open(db)
            with store.snapshot() as snap:
                count = snap.count() if snap.header is not None else 0
        except IndexStoreError:
            count = 0
        for share in (0.1, 0.9):
            if share not in marks and count >= share * images:
                marks[share], cpu[share] = time.perf_counter(), _usage_below(os.getpid())
        time.sleep(0.05)
    if store is not None:
        store.close()
    summary = json.loads(proc.communicate()[0])
    steady = 0.8 * images / (marks[0.9] - marks[0.1]) if len(marks) == 2 and marks[0.9] > marks[0.1] else None
    processes = _between(cpu[0.1], cpu[0.9], 0.8 * images) if steady else {}
    ms = sum(user + system for user, system, _ in processes.values())
    row = {"steady_images_per_s": steady and round(steady, 2),
           "steady_cpu_ms_per_image": round(ms, 1) if steady else None,
           "steady_cores_busy": round(ms * steady / 1000, 2) if steady else None,
           "encode_stage_images_per_s": summary["images_per_s"], "wall_s": round(time.perf_counter() - start, 1)}
    if by_process:
        row["processes_user_system_ms_faults_per_image"] = dict(sorted(processes.items(), key=lambda x: -sum(x[1][:2])))
    return row


@dataclass(frozen=True)
class _Usage:
    """One process's counters from /proc/PID/stat."""

    name: str  # its command line, shortened
    user_s: float
    system_s: float
    minor_faults: int


def _usage_below(root: int) -> dict[int, _Usage]:
    """pid -> _Usage of every live process below `root` (Linux /proc)."""
    parents, usage = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:48]
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        usage[pid] = _Usage(name, int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]))
    below, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in below]
        below.update(children)
        frontier += children
    return {pid: usage[pid] for pid in below}


def _between(start: dict[int, _Usage], end: dict[int, _Usage], images: float) -> dict[str, list[float]]:
    """Per command line: [user, system CPU-ms, minor faults] per image between two _usage_below snapshots,
    over the processes alive at the end (one that ended between them, such as the last run's actor, is left
    out rather than subtracted)."""
    out: dict[str, list[float]] = {}
    for pid, u in end.items():
        s = start.get(pid, _Usage(u.name, 0.0, 0.0, 0))
        row = out.setdefault(u.name.strip(), [0.0, 0.0, 0.0])
        row[0] += 1000 * (u.user_s - s.user_s) / images
        row[1] += 1000 * (u.system_s - s.system_s) / images
        row[2] += (u.minor_faults - s.minor_faults) / images
    return {name: [round(x, 1) for x in row] for name, row in out.items() if row[0] + row[1] >= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", choices=["scan", "faiss", "ray"], action="append", default=[])
    parser.add_argument("--scan-items", default="100000,1000000,10000000",
                        help="comma-separated sizes of the scan part")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--by-process", action="store_true", help="ray: also each process's CPU and faults")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.db, args.kind, args.items)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"cpu": _cpu(), "threads": os.cpu_count(), "load_1min": os.getloadavg()[0]}), flush=True)
    if "scan" not in args.skip:
        bench_scan(work, [int(x) for x in args.scan_items.split(",")])
    if "faiss" not in args.skip:
        bench_faiss(work, args.items)
    if "ray" not in args.skip:
        bench_ray(work, args.images, args.rounds, args.by_process)
    print(json.dumps({"load_1min_after": os.getloadavg()[0]}), flush=True)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
