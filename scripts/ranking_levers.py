"""The ranking levers that need no training, measured through the product's own `index` and `eval --db`:
the eval resize (centre crop vs whole image vs squash) and alpha query expansion (K x alpha).

The class folders of ROOT are split as `finetune --dataset folder` splits them (the first floor(fraction * n)
sorted names are train): choose on the train half, report the test half once. Each half is indexed (through
links to its class folders) once per eval resize, into OUT/<half>-<resize>/db, with `run_index`; every figure is
`evaluate_db`, so the same numbers come from `python cli.py eval --db OUT/<half>-<resize>/db --expand K
--expand-alpha A --json`.

    python scripts/ranking_levers.py ../shared/datasets/cub-birds-dev --out /tmp/levers \\
        [--model lite0] [--resize 0.875,1.0,squash] [--halves train,test] [--expand 1,2,3,5,8] [--alphas 0,1,3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--resize", default="0.875,1.0,squash", help="crop fractions and/or 'squash'")
    parser.add_argument("--halves", default="train,test")
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--expand", default="1,2,3,5,8")
    parser.add_argument("--alphas", default="0,1,3")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args()

    from indexer.build.pipeline import IndexConfig, run_index
    from indexer.eval_db import DbEvalConfig, evaluate_db
    from indexer.store.expand import Expansion

    rows = []
    for half in args.halves.split(","):
        folder = _half(args.root, args.out, half, args.train_fraction)
        for resize in args.resize.split(","):
            crop_pct, mode = _resize(resize)
            db = args.out / f"{half}-{resize}" / "db"
            started = time.perf_counter()
            run_index(IndexConfig(folder=folder, db_dir=db, model=args.model, crop_pct=crop_pct, resize_mode=mode,
                                  workers=0, device="cpu"))
            index_s = time.perf_counter() - started
            settings = [Expansion()] + [Expansion(int(k), float(a)) for k in args.expand.split(",") if k
                                        for a in args.alphas.split(",")]
            for expansion in settings:
                metrics = evaluate_db(DbEvalConfig(db=db, expand=expansion)).report.metrics
                row = {"half": half, "resize": resize, "expand": expansion.k, "alpha": expansion.alpha,
                       "index_s": round(index_s, 1), **{k: round(float(v), 4) for k, v in metrics.items()}}
                rows.append(row)
                print(f"{half:5} {resize:>6} K={expansion.k} alpha={expansion.alpha:g}  " +
                      "  ".join(f"{k} {row[k]:.4f}" for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")),
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
