"""Encoder cost of flip averaging (`--tta flip`): images per second of the encoder forward with tta none and
flip on the same batches of real images (decoded and preprocessed once, beforehand), rounds alternating
none / flip so that a machine shared with other jobs loads both alike; the median round of each is reported.

    python scripts/bench_tta.py IMAGE_FOLDER [--model lite0] [--batch 64] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from retrieval.data.decode import load_image
    from retrieval.encoder import load_encoder

    encoders = {tta: load_encoder(args.model, tta=tta) for tta in ("none", "flip")}
    plain = encoders["none"]
    paths = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.batch]
    transform = plain.eval_transform()
    batch = torch.stack([transform(load_image(p, draft_size=plain.config.resize_size).image) for p in paths])
    seconds: dict[str, list[float]] = {"none": [], "flip": []}
    with torch.inference_mode():
        for encoder in encoders.values():   # warm-up
            encoder(batch[:8])
        for _ in range(args.rounds):
            for tta, encoder in encoders.items():
                start = time.perf_counter()
                encoder(batch)
                seconds[tta].append(time.perf_counter() - start)
    rates = {tta: round(len(batch) / statistics.median(s), 1) for tta, s in seconds.items()}
    out = {"model": args.model, "batch": len(batch), "rounds": args.rounds, "threads": torch.get_num_threads(),
           "images_per_s": rates, "flip_over_none_time": round(rates["none"] / rates["flip"], 2)}
    print(json.dumps(out) if args.json else
          f"{args.model}, batch {len(batch)}, {torch.get_num_threads()} thread(s), median of {args.rounds} rounds: "
          f"tta none {rates['none']} img/s, flip {rates['flip']} img/s ({out['flip_over_none_time']}x the time)")


if __name__ == "__main__":
    main()
