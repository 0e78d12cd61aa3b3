"""Cost of a label-filtered search (`query --label`, `label=` on /api/search) on the 100,000-item benchmark DB.

The DB is bench_query.py's (random unit vectors through the store API, 1,000 labels of 100 items each, FAISS
`auto` -> exact Flat), so a set of 10 labels holds 1% of the items. Each row times SearchIndex.search for the same
query vectors, one query at a time (as a served upload is searched), median over the queries:

    plain               no filter
    1 label (0.1%)      100 ids: searched exactly from their stored embeddings
    10 labels (1%)      1,000 ids: the same path
    100 labels (10%)    10,000 ids: the same path
    700 labels (70%)    70,000 ids: FAISS with an ID selector (above SearchIndex's exact limit)

    python scripts/bench_filter.py [--items 100000] [--queries 200] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import db_arguments, prepare_db  # noqa: E402 - a sibling script

SETS = {"1 label (0.1%)": 1, "10 labels (1%)": 10, "100 labels (10%)": 100, "700 labels (70%)": 700}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    db_arguments(parser)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    db = prepare_db(args, "filter")[0] / "db"

    from indexer.store.search import SearchIndex

    rng = np.random.default_rng(1)
    with SearchIndex.open(db) as index:
        queries = rng.standard_normal((args.queries, index.header.encoder.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        rows: dict[str, dict] = {}
        for name, n_labels in {"plain": 0, **SETS}.items():
            labels = tuple(f"c{i:04d}" for i in range(n_labels))
            only = index.ids_with_labels(labels) if labels else None
            index.search(queries[:1], args.k, only=only)   # warm
            times, found = [], []
            for q in queries:
                start = time.perf_counter()
                _, ids = index.search(q[None], args.k, only=only)
                times.append(1000 * (time.perf_counter() - start))
                found.append(int((ids[0] >= 0).sum()))
            rows[name] = {"ids": None if only is None else len(only), "median_ms": round(statistics.median(times), 2),
                          "p95_ms": round(float(np.percentile(times, 95)), 2), "min_results": min(found)}
    if args.json:
        print(json.dumps({"items": args.items, "factory": index.factory, "rows": rows}, indent=2))
        return
    print(f"{args.items:,} items, FAISS {index.factory}, k={args.k}, {args.queries} queries one at a time")
    print("| search | ids allowed | median ms | p95 ms | fewest results |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ids'] or 'all'} | {row['median_ms']} | {row['p95_ms']} | {row['min_results']} |")


if __name__ == "__main__":
    main()
