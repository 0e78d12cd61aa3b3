"""What query expansion's shortlist costs in rankings: `eval --db`'s leave-one-out figures of each DB with plain
search and with `--expand K` re-ranking the first M hits, for each M (the DB's item count stands for a second full
search of the expanded query).

    python scripts/expand_shortlist.py DB [DB ...] [--expand 5] [--alpha 3] [--shortlists 100,150,200,300,all]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dbs", type=Path, nargs="+")
    parser.add_argument("--expand", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--shortlists", default="100,150,200,300,all")
    args = parser.parse_args()

    from indexer.eval_db import DbEvalConfig, evaluate_db
    from indexer.store.expand import Expansion
    from indexer.store.search import SearchIndex

    for db in args.dbs:
        with SearchIndex.open(db) as index:
            items = len(index)
        settings = [("plain", Expansion())] + [
            (m, Expansion(args.expand, args.alpha, shortlist=items if m == "all" else int(m)))
            for m in args.shortlists.split(",")]
        for name, expansion in settings:
            metrics = evaluate_db(DbEvalConfig(db, expand=expansion)).report.metrics
            print(json.dumps({"db": str(db), "shortlist": name, **{k: round(float(metrics[k]), 4) for k in KEYS}}),
                  flush=True)


if __name__ == "__main__":
    main()
