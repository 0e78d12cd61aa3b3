"""Latency and throughput of `python cli.py serve` on a 100,000-item DB, over loopback, in one run.

The DB is synthesised as scripts/bench_query.py does (random unit vectors through the store API, bound to the
real encoder's fingerprint, FAISS built by `ann.refresh`: `auto` -> exact Flat at 100k x 512). Each request
uploads a real JPEG (scikit-image's cat, 451x300) that the server decodes, embeds and searches for real.

1. Latency: p50 / p95 of one upload at concurrency 1, 4, 16 and 64 (a fixed number of requests each) against the
   default server (micro-batching on). Goal: p50 <= 150 ms at concurrency 1.
2. Throughput at concurrency 8, micro-batching on (default) vs off (`--max-batch 1`): both servers run side by
   side and are measured in alternating rounds (medians). Goal: on >= 1.5 x off.
3. With `--settings`: only p50 at concurrency 1 per engine (torch fp32, torch bf16 where the CPU has it, ONNX
   Runtime fp32, OpenVINO fp32 where installed; one server each, `--engine` / `--precision`), plain search and
   `expand=5` in alternating rounds of 20 requests (medians of the rounds' p50 and of the server's own decode /
   embed / search times).

The clients are threads of this process (httpx), so they share the CPU with the server: the figures include
that cost, as a real client on the same machine would.

    python scripts/bench_serve.py [--items 100000] [--model lite0] [--rounds 3] [--settings] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_query import db_arguments, prepare_db, query_image  # noqa: E402

LATENCY_REQUESTS = {1: 40, 4: 80, 16: 160, 64: 320}
THROUGHPUT_CONCURRENCY = 8
THROUGHPUT_REQUESTS = 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python cli.py serve` on a free loopback port; returns once /healthz answers."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--db", str(db), "--port", str(port), *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve did not start within 300 s")


def load(base: str, image: bytes, concurrency: int, requests: int, params: str = "k=10") -> dict:
    """`requests` uploads from `concurrency` client threads; latencies (s), wall time and the server's timings.
    A 503 (shed: the server is over --queue-size or --max-wait-ms) is counted, not retried; any other error stops."""
    import httpx

    latencies: list[float] = []
    server: list[dict] = []
    shed = 0
    left = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        nonlocal shed
        with httpx.Client(base_url=base, timeout=60) as http:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                start = time.perf_counter()
                resp = http.post(f"/api/search?{params}", files={"image": ("chelsea.jpg", image, "image/jpeg")})
                elapsed = time.perf_counter() - start
                if resp.status_code == 503:
                    with lock:
                        shed += 1
                    continue
                resp.raise_for_status()
                with lock:
                    latencies.append(elapsed)
                    server.append(resp.json()["timings"])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 2), "answered_rps": round(len(lat) / wall, 2), "shed_503": shed,
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
        "server_median_ms": {key: round(statistics.median(t[key] for t in server), 1)
                             for key in ("decode_ms", "embed_ms", "search_ms", "total_ms")},
        "mean_batch": round(statistics.mean(t["batch"] for t in server), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    db_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating throughput rounds per server.")
    parser.add_argument("--settings", action="store_true", help="Only p50 at concurrency 1 per engine, with and "
                        "without query expansion.")
    args = parser.parse_args()

    work, _ = prepare_db(args, "bench-serve-")
    db = work / "db"
    image = query_image(work).read_bytes()
    if args.settings:
        per_setting(db, image, args)
        return

    servers = {"on": start_server(db), "off": start_server(db, "--max-batch", "1")}
    try:
        on, off = servers["on"][1], servers["off"][1]
        for base in (on, off):
            load(base, image, 1, 5)  # warm-up: first forwards, page cache, thread pools
        latency = [load(on, image, c, n) for c, n in LATENCY_REQUESTS.items()]
        rounds: dict[str, list[dict]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for name, base in (("on", on), ("off", off)):
                rounds[name].append(load(base, image, THROUGHPUT_CONCURRENCY, THROUGHPUT_REQUESTS))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    rps = {name: statistics.median(r["throughput_rps"] for r in rs) for name, rs in rounds.items()}
    result = {
        "items": args.items, "model": args.model, "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_before": os.getloadavg(),
        "latency": latency, "throughput": rounds,
        "throughput_rps_median": rps, "batching_speedup": round(rps["on"] / rps["off"], 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"DB: {args.items:,} items ({args.model}); {os.cpu_count()} CPUs; OMP_NUM_THREADS="
          f"{result['omp_num_threads']}; load average {os.getloadavg()[0]:.2f}")
    print("| concurrency | requests | p50 ms | p95 ms | req/s | 503s | server decode / embed / search ms "
          "| mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in latency:
        s = r["server_median_ms"]
        print(f"| {r['concurrency']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['throughput_rps']} | "
              f"{r['shed_503']} | "
              f"{s['decode_ms']} / {s['embed_ms']} / {s['search_ms']} | {r['mean_batch']} |")
    for name in ("on", "off"):
        runs = ", ".join(str(r["throughput_rps"]) for r in rounds[name])
        batch = statistics.median(r["mean_batch"] for r in rounds[name])
        print(f"micro-batching {name:>3}, concurrency {THROUGHPUT_CONCURRENCY}: {rps[name]:.2f} req/s "
              f"(rounds {runs}; mean batch {batch})")
    print(f"speed-up: {result['batching_speedup']:.2f} x (goal >= 1.5); "
          f"p50 at concurrency 1: {latency[0]['p50_ms']} ms (goal <= 150)")


SETTING_ROUNDS, SETTING_REQUESTS = 5, 20


def per_setting(db: Path, image: bytes, args: argparse.Namespace) -> None:
    """p50 at concurrency 1 per engine, plain vs expand=5 in alternating rounds (medians), one server at a time."""
    from retrieval.compat import cpu_has_bf16

    engines = {"torch fp32": ["--engine", "torch"], "onnxruntime fp32": ["--engine", "onnxruntime"]}
    if importlib.util.find_spec("openvino") is not None:
        engines["openvino fp32"] = ["--engine", "openvino"]
    if cpu_has_bf16():
        engines["torch bf16"] = ["--precision", "bf16"]
    load_before = os.getloadavg()
    rows = []
    for name, extra in engines.items():
        proc, base = start_server(db, *extra)
        try:
            load(base, image, 1, 5)  # warm-up
            runs: dict[str, list[dict]] = {"plain": [], "expand 5": []}
            for _ in range(SETTING_ROUNDS):
                runs["plain"].append(load(base, image, 1, SETTING_REQUESTS))
                runs["expand 5"].append(load(base, image, 1, SETTING_REQUESTS, "k=10&expand=5"))
        finally:
            proc.terminate()
            proc.wait(30)
        for search, rs in runs.items():
            rows.append({"engine": name, "search": search,
                         "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 1),
                         "round_p50s": [r["p50_ms"] for r in rs],
                         **{key: round(statistics.median(r["server_median_ms"][key] for r in rs), 1)
                            for key in ("decode_ms", "embed_ms", "search_ms", "total_ms")}})
    result = {"items": args.items, "model": args.model, "cpus": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "settings": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"DB: {args.items:,} items ({args.model}); {os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; concurrency 1, medians of {SETTING_ROUNDS} rounds of {SETTING_REQUESTS}")
    print("| engine | search | p50 ms | server decode / embed / search / total ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['search']} | {r['p50_ms']} | {r['decode_ms']} / {r['embed_ms']} / "
              f"{r['search_ms']} / {r['total_ms']} |")


if __name__ == "__main__":
    main()
