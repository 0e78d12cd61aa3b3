"""Per-query cost of query expansion (`--expand K`) on a synthetic 100,000-item DB, through SearchIndex as `query`
and `serve` run it (the encoder forward, the same for both, is left out): plain search; expansion as shipped (one
search for a shortlist of `--shortlist` hits, their stored embeddings read from LMDB, re-ranked by the expanded
query); and, for comparison, expansion by a second full search (the expanded query searched again over the DB).

    python scripts/bench_expand.py [--items 100000] [--model lite0] [--expand 5] [--shortlist 200] [--queries 200]
                                   [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_query import db_arguments, prepare_db  # noqa: E402


def _median_ms(run, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        run(q[None])
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    db_arguments(parser)
    parser.add_argument("--expand", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--shortlist", type=int, default=None, help="default: the shipped DEFAULT_SHORTLIST")
    args = parser.parse_args()

    from indexer.store.expand import DEFAULT_SHORTLIST, Expansion, expand, expanded_search
    from indexer.store.search import SearchIndex

    work, built = prepare_db(args, "bench-expand-")
    expansion = Expansion(args.expand, shortlist=args.shortlist or DEFAULT_SHORTLIST)
    with SearchIndex.open(work / "db") as index:
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((args.queries, index.header.encoder.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)

        def second_search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            scores, ids = index.search(q, expansion.k)
            return index.search(expand(q, scores, index.vectors(ids[0])[None], expansion.alpha), args.k)

        index.search(queries[:2], args.k)   # warm the mmap and LMDB pages once
        plain = _median_ms(lambda q: index.search(q, args.k), queries)
        expanded = _median_ms(lambda q: expanded_search(index, q, args.k, expansion), queries)
        full = _median_ms(second_search, queries)
        factory = index.factory
    result = {"items": args.items, "factory": factory, "expand": args.expand, "shortlist": expansion.shortlist,
              "k": args.k, "queries": args.queries, "plain_ms": plain, "expanded_ms": expanded,
              "second_search_ms": full, "extra_ms": round(expanded - plain, 3), **built}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{args.items} items ({factory}), k={args.k}, median of {args.queries} queries one per call: plain "
              f"{plain} ms; --expand {args.expand} re-ranking {expansion.shortlist} hits {expanded} ms; "
              f"by a second full search {full} ms")


if __name__ == "__main__":
    main()
