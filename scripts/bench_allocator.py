"""Page faults, kernel time and peak memory of the encoder's forward pass with glibc's default allocator
settings and with `retrieval.allocator.keep_freed_memory` (what `finetune` and `eval --dataset` set).

Each setting runs in its own process (peak memory is per process): one warm-up batch, then `--batches`
timed batches of random images through the encoder in inference mode (the evaluation pass; a training step
allocates the same activations and more).

    python scripts/bench_allocator.py --batch 64 --batches 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(setting: str, model: str, batch: int, batches: int) -> dict:
    """One process's figures (run in a child: `--child SETTING`)."""
    sys.path.insert(0, str(ROOT))
    from retrieval.allocator import keep_freed_memory

    keep_freed_memory(setting == "reuse")
    import torch

    from retrieval.encoder import load_encoder

    encoder = load_encoder(model)
    encoder.eval()
    images = torch.randn(batch, 3, encoder.image_size, encoder.image_size)
    with torch.inference_mode():
        encoder(images)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(batches):
            encoder(images)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    system, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    return {"malloc": setting, "images_per_s": round(batch * batches / seconds, 2),
            "minor_faults_per_batch": (after.ru_minflt - before.ru_minflt) // batches,
            "kernel_cpu_share": round(system / (system + user), 3), "peak_rss_gb": round(after.ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--child", choices=("default", "reuse"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.batches)))
        return 0
    rows = []
    for setting in ("default", "reuse"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--model", args.model, "--batch",
                              str(args.batch), "--batches", str(args.batches)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ["images_per_s", "minor_faults_per_batch", "kernel_cpu_share", "peak_rss_gb"]
    print(f"{args.model}, batch {args.batch}, {args.batches} timed batches, {rows[0]['threads']} threads")
    print("| malloc | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['malloc']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
