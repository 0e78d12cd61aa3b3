"""The ranking levers that need no training, measured through the product's own `index` and `eval --db`:
the eval resize (centre crop vs whole image vs squash), flip averaging (`--tta flip`), alpha query expansion
(K x alpha) and, under a query / database split, database-side augmentation (DBA).

The class folders of ROOT are split as `finetune --dataset folder` splits them (the first floor(fraction * n)
sorted names are train): choose on the train half, report the test half once. Each half is indexed (through
links to its class folders) once per eval resize, into OUT/<half>-<resize>/db, with `run_index`; every figure is
`evaluate_db`, so the same numbers come from `python cli.py eval --db OUT/<half>-<resize>/db --expand K
--expand-alpha A --json`; a flip DB is OUT/<half>-<resize>-flip/db.

DBA (--dba K,...) is scored on the same DBs, with its own honest protocol: the labelled items of each class
(sorted by path) alternate between a query half and a database half; every database item is replaced by
normalise(itself + its top-K database neighbours, weighted by cosine^alpha) (the aQE formula of
indexer.store.expand, neighbours never a query nor itself); the queries search the augmented database with
their plain embeddings, and the same split with the plain database is the baseline (K=0).

    python scripts/ranking_levers.py ../shared/datasets/cub-birds-dev --out /tmp/levers \\
        [--model lite0] [--resize 0.875,1.0,squash] [--tta none,flip] [--halves train,test] \\
        [--expand 1,2,3,5,8] [--alphas 0,1,3] [--dba 1,2,3,5,8 --dba-alphas 0,3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KS = (1, 2, 4, 8)


def _half(root: Path, out: Path, half: str, fraction: float) -> Path:
    """A folder of links to the half's class folders (made once)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    cut = math.floor(fraction * len(classes))
    folder = out / f"{half}-images"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for name in classes[:cut] if half == "train" else classes[cut:]:
            os.symlink((root / name).resolve(), folder / name)
    return folder


def _resize(text: str) -> tuple[float | None, str | None]:
    return (None, "squash") if text == "squash" else (float(text), "shortest")


def _ints(text: str) -> list[int]:
    return [int(k) for k in text.split(",") if k]


def _dba_split(db: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query embeddings, their class numbers, database embeddings, theirs): the labelled items of each class,
    sorted by path, alternate between the two halves (first to the queries)."""
    from indexer.store.lmdb_store import Store

    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        items, vectors = snap.items(ids), snap.vectors(ids)
    rows = sorted((item.label, item.relpath, row) for row, item in enumerate(items) if item and item.label)
    names = sorted({label for label, _, _ in rows})
    number = {name: i for i, name in enumerate(names)}
    position = {}
    queries, database = [], []
    for label, _, row in rows:
        position[label] = position.get(label, -1) + 1
        (queries if position[label] % 2 == 0 else database).append(row)
    qlabels = np.array([number[items[r].label] for r in queries])
    dlabels = np.array([number[items[r].label] for r in database])
    return vectors[queries], qlabels, vectors[database], dlabels


def _dba_metrics(split: tuple[np.ndarray, ...], k: int, alpha: float) -> dict[str, float]:
    """Recall@K / MAP@R of the queries over the database augmented with K database neighbours (0: plain)."""
    from indexer.store.expand import expand
    from retrieval.metrics import knn_search, neighbour_width, ranking_metrics

    queries, qlabels, database, dlabels = split
    if k:
        scores, ids = knn_search(database, database, k, exclude_self=True)
        database = expand(database, scores, database[np.maximum(ids, 0)], alpha)
    # one extra label row per class stands for "a query of this class": R = the class's database items
    classes = int(max(qlabels.max(), dlabels.max())) + 1
    labels = np.concatenate([dlabels, np.arange(classes)])
    width = neighbour_width(labels, KS)
    _, neighbours = knn_search(queries, database, width)
    return ranking_metrics(labels, len(dlabels) + qlabels, neighbours, KS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--resize", default="0.875,1.0,squash", help="crop fractions and/or 'squash'")
    parser.add_argument("--tta", default="none", help="none and/or flip")
    parser.add_argument("--halves", default="train,test")
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--expand", default="1,2,3,5,8")
    parser.add_argument("--alphas", default="0,1,3")
    parser.add_argument("--dba", default="", help="database-side augmentation K values (query / database split)")
    parser.add_argument("--dba-alphas", default="0,3")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args()

    from indexer.build.pipeline import IndexConfig, run_index
    from indexer.eval_db import DbEvalConfig, evaluate_db
    from indexer.store.expand import Expansion

    rows = []
    for half in args.halves.split(","):
        folder = _half(args.root, args.out, half, args.train_fraction)
        for resize, tta in ((r, t) for r in args.resize.split(",") for t in args.tta.split(",")):
            crop_pct, mode = _resize(resize)
            db = args.out / (f"{half}-{resize}" + ("" if tta == "none" else f"-{tta}")) / "db"
            started = time.perf_counter()
            summary = run_index(IndexConfig(folder=folder, db_dir=db, model=args.model, crop_pct=crop_pct,
                                            resize_mode=mode, tta=None if tta == "none" else tta,
                                            workers=0, device="cpu"))
            common = {"half": half, "resize": resize, "tta": tta, "index_s": round(time.perf_counter() - started, 1),
                      "images_per_s": summary.images_per_s}
            print(f"{half:5} {resize:>6} tta={tta}  indexed {summary.encoded} in {common['index_s']} s "
                  f"({summary.images_per_s} img/s)", flush=True)
            settings = [Expansion()] + [Expansion(k, float(a)) for k in _ints(args.expand)
                                        for a in args.alphas.split(",")]
            scored = [({"expand": e.k, "alpha": e.alpha}, evaluate_db(DbEvalConfig(db=db, expand=e)).report.metrics)
                      for e in settings]
            if args.dba:
                split = _dba_split(db)
                scored += [({"dba": k, "alpha": float(a)}, _dba_metrics(split, k, float(a)))
                           for k in [0, *_ints(args.dba)] for a in (args.dba_alphas.split(",") if k else ["0"])]
            for setting, metrics in scored:
                row = {**common, **setting, **{k: round(float(v), 4) for k, v in metrics.items()}}
                rows.append(row)
                print(f"{half:5} {resize:>6} tta={tta} " + " ".join(f"{k}={v:g}" for k, v in setting.items()) + "  "
                      + "  ".join(f"{k} {row[k]:.4f}" for k in ("recall@1", "recall@2", "recall@4", "recall@8",
                                                                 "map@r")), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
