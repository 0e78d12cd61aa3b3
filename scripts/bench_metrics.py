"""Time leave-one-out retrieval metrics (exact blocked kNN) on synthetic clustered embeddings.

    python scripts/bench_metrics.py --n 60000 --dim 512 [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from retrieval.eval_config import DEFAULT_KS
from retrieval.metrics import rank_leave_one_out, ranking_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=5, help="mean class size (SOP-like: ~5)")
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(1, args.n // args.per_class), args.n)
    centres = rng.normal(size=(labels.max() + 1, args.dim)).astype(np.float32)
    embeddings = centres[labels] + 1.5 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    start = time.perf_counter()
    queries, _, neighbours = rank_leave_one_out(embeddings, labels, DEFAULT_KS, block=args.block, device=args.device)
    metrics = ranking_metrics(labels, queries, neighbours, DEFAULT_KS)
    seconds = time.perf_counter() - start
    print(f"{args.n} x {args.dim} on {args.device} ({torch.get_num_threads()} CPU threads): {seconds:.1f} s")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
