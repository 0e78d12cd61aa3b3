"""Measure exact FAISS Flat search latency against collection size, to place `--ann auto`'s threshold.

Flat search reads every stored vector per query, so its latency grows with n * dim. This script times one
query (what an interactive `query` does) and a batch of queries at several sizes, and, at the largest size,
the approximate IVF index `auto` switches to, with its recall@10 against Flat. Uniform random unit vectors
are the worst case for IVF recall (no cluster structure); --clusters draws them around centres instead,
closer to real embeddings.

    python scripts/bench_ann.py --dim 512 --sizes 10000,30000,100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np


def _unit(n: int, dim: int, rng: np.random.Generator, clusters: int = 0) -> np.ndarray:
    """Unit vectors: uniform on the sphere, or around `clusters` centres (closer to real embeddings)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if clusters:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        x = centres[rng.integers(clusters, size=n)] + 0.7 * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _time_search(index, queries: np.ndarray, k: int, repeats: int) -> dict:
    one = _median_seconds(lambda: index.search(queries[:1], k), repeats)
    batch = _median_seconds(lambda: index.search(queries, k), max(1, repeats // 4))
    return {"ms_1_query": round(one * 1e3, 3), "ms_per_query_batched": round(batch * 1e3 / len(queries), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    parser.add_argument("--queries", type=int, default=64, help="batch size for the batched timing")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    parser.add_argument("--no-ivf", action="store_true", help="skip the IVF comparison at the largest size")
    parser.add_argument("--clusters", type=int, default=0, help="draw vectors around this many centres")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    data = _unit(max(sizes) + args.queries, args.dim, rng, args.clusters)
    data, queries = data[: max(sizes)], data[max(sizes):]
    rows = []
    for n in sizes:
        index = faiss.IndexFlatIP(args.dim)
        index.add(data[:n])
        row = {"n": n, "dim": args.dim, "index": "Flat", "mb": round(n * args.dim * 4 / 2**20, 1)}
        row.update(_time_search(index, queries, args.k, args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_ivf:
        from indexer.store.ann import choose_factory, ivf_params  # noqa: PLC0415 - script run from the repo root

        n = max(sizes)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(data[:n])
        _, truth = flat.search(queries, args.k)
        factory = choose_factory("ivf-flat", n, args.dim)
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        sample = data[rng.choice(n, min(n, 256 * faiss.extract_index_ivf(index).nlist), replace=False)]
        index.train(sample)
        index.add(data[:n])
        build = time.perf_counter() - t0
        faiss.extract_index_ivf(index).nprobe = ivf_params(index)
        _, found = index.search(queries, args.k)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(truth, found, strict=True)])
        row = {"n": n, "dim": args.dim, "index": factory, "nprobe": faiss.extract_index_ivf(index).nprobe,
               "build_s": round(build, 1), f"recall@{args.k}_vs_flat": round(float(recall), 3)}
        row.update(_time_search(index, queries, args.k, args.repeats))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
