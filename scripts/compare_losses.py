"""Fine-tune the same encoder on the same data with the same budget under each loss; print a metrics table.

Every loss gets its papers' default hyper-parameters (LOSS_DEFAULTS) and otherwise identical settings:
sampler, epochs, learning rates, schedule, seed. The table shows the pretrained baseline (epoch 0, the same
for every run) and each loss's *last* epoch, so no loss is favoured by picking its best epoch on the test
split; the kept epoch's (chosen on the validation split) test MAP@R is listed beside it for reference.
`pairs.png` in --out puts each loss's last-epoch picture side by side (retrieval.pairs: each validation
anchor's hardest negative vs hardest positive cosine, Circle Loss's circle and the triplet line).

    python scripts/compare_losses.py --out runs/losses                       # the embedded bird set
    python scripts/compare_losses.py --dataset folder --root ../shared/datasets/caltech101 --out runs/cal
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.finetune import run_finetune
from retrieval.finetune_config import FinetuneConfig, default
from retrieval.losses import LOSSES

COLUMNS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder for one run directory per loss.")
    parser.add_argument("--dataset", default=default("dataset"))
    parser.add_argument("--root", type=Path, default=None, help="Default: the embedded generated set.")
    parser.add_argument("--losses", default=",".join(LOSSES), help="Comma-separated subset of " + ", ".join(LOSSES))
    parser.add_argument("--model", default=default("model"))
    parser.add_argument("--epochs", type=int, default=default("epochs"))
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("-P", type=int, default=default("p"), dest="p")
    parser.add_argument("-K", type=int, default=default("k"), dest="k")
    parser.add_argument("--workers", type=int, default=default("workers"))
    parser.add_argument("--device", default=default("device"))
    parser.add_argument("--seed", type=int, default=default("seed"))
    parser.add_argument("--resume", action="store_true", help="Continue (or reuse) finished runs in --out.")
    return parser.parse_args(argv)


def table(rows: list[tuple[str, dict, float | None]]) -> str:
    """Markdown table: one row per (name, metrics, best MAP@R)."""
    header = ["run", *COLUMNS, "kept-epoch map@r"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, metrics, best in rows:
        cells = [f"{metrics[c]:.4f}" for c in COLUMNS] + ["" if best is None else f"{best:.4f}"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def plot_side_by_side(out: Path, losses: list[str]) -> Path:
    """pairs.png: each loss's last epoch, one panel per loss, with Circle Loss's default m for every panel."""
    import numpy as np

    from retrieval.losses import LOSS_DEFAULTS
    from retrieval.pairs import PAIRS_JSON, PAIRS_PNG, plot_pairs

    panels = {}
    for loss in losses:
        data = json.loads((out / loss / PAIRS_JSON).read_text())
        last = max(data["epochs"], key=int)
        panels[f"{loss} (epoch {last})"] = (np.asarray(data["epochs"][last]["s_n"]),
                                            np.asarray(data["epochs"][last]["s_p"]))
    m = float(LOSS_DEFAULTS["circle"]["m"])
    return plot_pairs(panels, out / PAIRS_PNG, m=m, margin=m, title=f"{data['split']} anchors after training")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = FinetuneConfig(out=args.out, dataset=args.dataset, root=args.root, model=args.model, epochs=args.epochs,
                          steps_per_epoch=args.steps_per_epoch, image_size=args.image_size, p=args.p, k=args.k,
                          workers=args.workers, device=args.device, seed=args.seed,
                          patience=0)   # one budget: every loss trains all --epochs
    results = {}
    for loss in args.losses.split(","):
        out = args.out / loss
        resume = args.resume and (out / "last.pt").is_file()
        print(f"== {loss} -> {out}", file=sys.stderr)
        run_finetune(replace(base, out=out, loss=loss, resume=resume), progress=sys.stderr.isatty())
        results[loss] = json.loads((out / "metrics.json").read_text())
    first = next(iter(results.values()))
    rows = [("pretrained (epoch 0)", first["baseline"], None)]
    rows += [(f"{loss} (epoch {m['epochs'][-1]['epoch']})", m["epochs"][-1], m["best"]["map@r"] if m["best"] else None)
             for loss, m in results.items()]
    text = table(rows)
    print(text)
    (args.out / "compare_losses.md").write_text(text + "\n")
    plot_side_by_side(args.out, list(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
