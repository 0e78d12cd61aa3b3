"""Re-embed a served DB with another encoder while clients upload: failed requests, latency before / during /
after the build, the time from the switch to the first answer by the new encoder, disk per generation.

A folder of real photos (the first --limit JPEGs of --images, taken evenly across its class folders, copied) is
indexed with --model-a, `python cli.py serve` serves it, --clients threads upload those photos in a loop, and
`python cli.py index --model MODEL_B` (under `nice -n --nice`) builds generation 2 beside the served one and
switches. --model-b defaults to --model-a saved as a run directory with a 256-d head (another fingerprint, the
same cost per image). The clients run in this process, so they share the CPU with the server and the build.

    python scripts/bench_reembed.py --images ../shared/datasets/cub-birds-dev [--limit 300] [--clients 4]
        [--nice 10] [--model-a lite0] [--model-b RUN_DIR] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_serve import start_server  # noqa: E402


def copy_photos(src: Path, dst: Path, limit: int) -> list[Path]:
    """The first `limit` JPEGs of `src`, round-robin over its class folders, copied to dst/<class>/."""
    classes = [sorted(d.glob("*.jpg")) for d in sorted(p for p in src.iterdir() if p.is_dir())]
    picked: list[Path] = []
    for row in range(max(map(len, classes))):
        picked += [files[row] for files in classes if row < len(files)]
    out = []
    for path in picked[:limit]:
        (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
        out.append(Path(shutil.copy(path, dst / path.parent.name / path.name)))
    return out


def second_encoder(spec: str, out: Path) -> Path:
    """`spec` with a fresh 256-d head, saved as a run directory (another fingerprint)."""
    from retrieval.encoder import load_encoder, save_encoder

    save_encoder(load_encoder(spec, embed_dim=256), out)
    return out


def clients(base: str, photos: list[Path], n: int, stop: threading.Event, log: list[tuple]) -> list[threading.Thread]:
    """n threads uploading the photos in turn until `stop`; each answer logged as (start, end, status, generation)."""
    import httpx

    data = [(p.name, p.read_bytes()) for p in photos[:64]]

    def run(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            i = offset
            while not stop.is_set():
                name, body = data[i % len(data)]
                start = time.time()
                try:
                    resp = http.post("/api/search?k=10", files={"image": (name, body, "image/jpeg")})
                    gen = resp.json()["served_by"]["generation"] if resp.status_code == 200 else None
                    log.append((start, time.time(), resp.status_code, gen))
                except httpx.HTTPError as exc:
                    log.append((start, time.time(), repr(exc), None))
                i += n

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    return threads


def phase(log: list[tuple], since: float, until: float) -> dict:
    """Requests started in [since, until): count, failed, p50 / p99 latency in ms."""
    rows = [r for r in log if since <= r[0] < until]
    since, until = max(since, min(r[0] for r in log)), min(until, max(r[0] for r in log))
    ms = sorted(1000 * (end - start) for start, end, status, _ in rows if status == 200)
    pick = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)) if ms else (lambda q: None)
    return {"requests": len(rows), "failed": sum(r[2] != 200 for r in rows), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "seconds": round(until - since, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="Folder of class folders of JPEGs.")
    parser.add_argument("--limit", type=int, default=300, help="Photos indexed.")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--nice", type=int, default=10, help="Niceness of the build process (0: same priority).")
    parser.add_argument("--model-a", default="lite0")
    parser.add_argument("--model-b", default=None, help="Run directory or spec [default: model-a with a 256-d head].")
    parser.add_argument("--steady-s", type=float, default=15.0, help="Seconds measured before and after the build.")
    parser.add_argument("--work", type=Path, default=None, help="Working folder [default: a temporary one].")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_reembed-"))
    folder, db = work / "images", work / "db"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(db, ignore_errors=True)
    photos = copy_photos(args.images, folder, args.limit)
    model_b = args.model_b or str(second_encoder(args.model_a, work / "model-b"))
    index = [sys.executable, "cli.py", "index", str(folder), "--db", str(db), "--json", "--no-progress"]
    load_before = os.getloadavg()
    first = subprocess.run([*index, "--model", args.model_a], cwd=REPO, capture_output=True, text=True, check=True)
    server, base = start_server(db)
    log: list[tuple] = []
    stop = threading.Event()
    try:
        threads = clients(base, photos, args.clients, stop, log)
        time.sleep(args.steady_s)
        build_start = time.time()
        nice = ["nice", "-n", str(args.nice)] if args.nice else []
        build = subprocess.run([*nice, *index, "--model", model_b], cwd=REPO, capture_output=True, text=True)
        build_end = time.time()
        if build.returncode != 0:
            raise SystemExit(f"the build failed: {build.stderr.strip()}")
        switched = (db / "generations.json").stat().st_mtime
        time.sleep(args.steady_s)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)
    first_new = min((end for _, end, status, gen in log if gen == 2), default=None)
    gens = json.loads(subprocess.run([sys.executable, "cli.py", "generations", "--db", str(db), "--json"], cwd=REPO,
                                     capture_output=True, text=True, check=True).stdout)
    result = {
        "photos": len(photos), "clients": args.clients, "nice": args.nice, "model_a": args.model_a, "model_b": model_b,
        "first_index_s": json.loads(first.stdout)["seconds"], "build_s": round(build_end - build_start, 1),
        "before": phase(log, 0, build_start), "during": phase(log, build_start, switched),
        "after": phase(log, switched, float("inf")),
        "switch_to_first_new_answer_s": None if first_new is None else round(first_new - switched, 2),
        "failed_total": sum(r[2] != 200 for r in log),
        "generations": [{k: g[k] for k in ("id", "state", "items", "disk_bytes", "dim")} for g in gens],
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
