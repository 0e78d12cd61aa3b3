"""Images/s of the fine-tune loop with its data pipeline versus the bare forward + backward + step.

Both use finetune's own pieces (`train_step`, `train_loader`, `train_mode`) on the same encoder, loss and
P x K batch. "bare" repeats one batch already decoded and augmented in memory; "full" reads the train split
through the DataLoader (decode with draft(), random resized crop, flip, normalise) for the same number of
steps, timed from the creation of the loader as one epoch of training experiences it. The settings are
measured in interleaved rounds and their medians compared: the pipeline cost is 1 - full / bare. On a CPU
the workers compete with the model for the same cores, so the table covers several worker counts.

Cost of the process: minor page faults per step and the kernel's share of CPU time (getrusage deltas of the
timed loops) and the peak resident memory. `--malloc default` keeps glibc's default allocator settings
(the "before"); `reuse` is what `finetune` sets (retrieval.allocator): run both to compare, peak memory
being per process.

    python scripts/bench_finetune.py                                  # the embedded set, lite0, 224 px
    python scripts/bench_finetune.py --dataset folder --root ../shared/datasets/caltech101 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from retrieval.allocator import keep_freed_memory
from retrieval.data import load_records, split_records
from retrieval.data.sampler import PKSampler
from retrieval.device import resolve_device
from retrieval.encoder import load_encoder
from retrieval.finetune import TrainStep, train_loader, train_mode, train_step
from retrieval.finetune_config import default
from retrieval.losses import make_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=default("dataset"))
    parser.add_argument("--root", type=Path, default=None, help="Default: the embedded generated set.")
    parser.add_argument("--model", default=default("model"))
    parser.add_argument("--image-size", type=int, default=None, help="Default: the encoder's.")
    parser.add_argument("--locked-groups", type=int, default=0,
                        help="Keep the tower's first N layer groups frozen (finetune --locked-groups); default: 0.")
    parser.add_argument("-P", type=int, default=default("p"), dest="p")
    parser.add_argument("-K", type=int, default=default("k"), dest="k")
    parser.add_argument("--steps", type=int, default=18, help="Timed steps per measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; medians are reported.")
    parser.add_argument("--workers", default="0,1,2", help="Comma-separated worker counts to time.")
    parser.add_argument("--device", default=default("device"))
    parser.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                        help="reuse: keep freed memory (finetune's setting); default: glibc's defaults.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory(args.malloc == "reuse")
    device = resolve_device(args.device)
    root = args.root
    if root is None:
        from retrieval.data.generate import ensure_default_dataset

        root = ensure_default_dataset()
    records = split_records(load_records(args.dataset, root), "train")
    encoder = load_encoder(args.model, device=device)
    if args.image_size is not None:
        from dataclasses import replace

        encoder.config = replace(encoder.config, image_size=args.image_size)
    if args.locked_groups:
        encoder.lock_tower(args.locked_groups)
    classes = sorted({r.label for r in records})
    label_map = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    label_map[classes] = torch.arange(len(classes))
    model = TrainStep(encoder, make_loss("circle")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)   # tiny steps: the weights barely move
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_mode(model, freeze_bn=True)
    amp = device.type == "cuda"
    sampler = PKSampler([r.label for r in records], args.p, args.k, seed=0)
    batch = args.p * args.k

    usage: dict[str, float] = {"faults": 0, "system": 0, "cpu": 0, "steps": 0}

    def run(batches) -> float:
        """Images/s over `args.steps` steps fed by `batches`; the clock includes creating the iterator."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for images, labels, _ in islice(batches(), args.steps):
            train_step(model, images, label_map[labels], optimizer, scheduler, device=device, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage["faults"] += after.ru_minflt - before.ru_minflt
        usage["system"] += after.ru_stime - before.ru_stime
        usage["cpu"] += after.ru_stime - before.ru_stime + after.ru_utime - before.ru_utime
        usage["steps"] += args.steps
        return args.steps * batch / seconds

    first = next(iter(train_loader(encoder, records, sampler, workers=0, device=device)))
    preloaded = (first[0].to(device), first[1], first[2])
    run(lambda: iter([preloaded] * 3))   # warm-up: allocator, kernels, optimiser state
    usage.update(faults=0, system=0, cpu=0, steps=0)
    worker_counts = [int(w) for w in args.workers.split(",")]
    bare, full = [], {w: [] for w in worker_counts}
    for round_ in range(args.rounds):   # interleaved, so drift in machine load hits every setting alike
        bare.append(run(lambda: iter([preloaded] * args.steps)))
        for workers in worker_counts:
            sampler.set_epoch(round_ * 100 + workers + 1)
            full[workers].append(run(lambda w=workers: iter(train_loader(encoder, records, sampler, workers=w,
                                                                           device=device))))
    bare_rate = statistics.median(bare)
    results = {"device": str(device), "threads": torch.get_num_threads(), "batch": batch,
               "locked_groups": args.locked_groups,
               "image_size": encoder.image_size, "steps": args.steps, "rounds": args.rounds,
               "bare_images_per_s": round(bare_rate, 2), "bare_rounds": [round(r, 2) for r in bare], "full": {},
               "malloc": args.malloc, "minor_faults_per_step": round(usage["faults"] / usage["steps"]),
               "kernel_cpu_share": round(usage["system"] / max(usage["cpu"], 1e-9), 4),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    for workers, rates in full.items():
        rate = statistics.median(rates)
        results["full"][workers] = {"images_per_s": round(rate, 2), "rounds": [round(r, 2) for r in rates],
                                    "pipeline_cost": round(1 - rate / bare_rate, 4)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.model} {encoder.image_size}px, batch {args.p}x{args.k}, locked groups {args.locked_groups}, "
          f"{args.steps} steps, {device}, "
          f"{results['threads']} threads, medians of {args.rounds} interleaved rounds")
    print(f"bare forward+backward+step on preloaded tensors: {results['bare_images_per_s']:.1f} images/s")
    print(f"malloc {args.malloc}: {results['minor_faults_per_step']} minor page faults per step, "
          f"{100 * results['kernel_cpu_share']:.1f}% of CPU time in the kernel, peak RSS {results['peak_rss_gb']} GB")
    for workers, row in results["full"].items():
        print(f"full loop, {workers} workers: {row['images_per_s']:.1f} images/s "
              f"(pipeline cost {100 * row['pipeline_cost']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
