"""Engines and precisions in one run: encoder-only speed and the rankings each one gives, on real photos.

    python scripts/bench_precision.py ../shared/datasets/cub-birds-dev --model lite0 --test-classes 25

The folder's last --test-classes class folders (sorted; cub-birds-dev's unseen test half) are decoded and
preprocessed exactly as `index` does. Per setting (torch fp32, torch bf16 where the CPU has it, ONNX Runtime fp32,
OpenVINO fp32 where it is installed,
ONNX Runtime int8 per calibration method, calibrated on --calibration-images of those same images as `index` does)
it prints one JSON line: images/s at --batch-size over every image, ms per image at batch 1, leave-one-out
Recall@1 and MAP@R, mean top-10 overlap with torch fp32, the gate's verdict on a held sample of GATE_IMAGES
(indexer.build.choose), and the mixed case (fp32 queries against this setting's vectors). Then the load
(`uptime`) before and after: the figures are only comparable within one run. glibc keeps freed memory as the CLI
makes it (`--glibc-defaults` to compare: torch fp32 is about half as fast without it).

With `--end-to-end`, then per setting: `python cli.py index` of those class folders (through links) into a new DB
with that setting (images/s, wall time, what the gate kept), and `python cli.py serve` on that DB: p50 of 40
uploads at concurrency 1 (scripts/bench_serve.py's client) of one of its photos.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from indexer.build.choose import GATE_IMAGES
from indexer.build.encode import Embedder
from retrieval.allocator import keep_freed_memory
from retrieval.compat import cpu_has_bf16
from retrieval.data.decode import load_image
from retrieval.encoder import load_encoder
from retrieval.encoder.engine import EngineSpec, Runner, TorchRunner, open_runner, usable_cores
from retrieval.encoder.gate import agreement
from retrieval.encoder.quantize import CALIBRATION_METHODS, quantize_int8
from retrieval.metrics import knn_search, rank_leave_one_out, ranking_metrics

REPO = Path(__file__).resolve().parents[1]
Embed = Callable[[torch.Tensor], np.ndarray]  # a Runner, or any function of normalised images to embeddings
END_TO_END = (("torch fp32", ("--engine", "torch")), ("torch bf16", ("--precision", "bf16")),
              ("onnxruntime fp32", ("--engine", "onnxruntime")), ("openvino fp32", ("--engine", "openvino")),
              ("onnxruntime int8", ("--precision", "int8")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--test-classes", type=int, default=25, help="the last N class folders (sorted)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single", type=int, default=64, help="images timed one at a time (batch 1)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--methods", default=",".join(CALIBRATION_METHODS), help="int8 calibrations ('' for none)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's allocator as it is instead of keeping freed memory as the CLI does "
                             "(retrieval.allocator; torch's batch activations are then fresh pages every batch)")
    parser.add_argument("--end-to-end", action="store_true", help="then `index` and `serve` per setting")
    args = parser.parse_args()
    kept = keep_freed_memory(not args.glibc_defaults)
    print(json.dumps({"uptime_before": uptime(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
                      "keep_freed_memory": kept,
                      "cpu": _cpu()}), flush=True)
    encoder = load_encoder(args.model)
    test_classes = class_folders(args.folder)[-args.test_classes:]
    images, labels = load_classes(args.folder, test_classes, Embedder(encoder, "cpu"))
    gate_rows = np.linspace(0, len(images) - 1, min(GATE_IMAGES, len(images))).astype(int)
    rest = np.setdiff1d(np.arange(len(images)), gate_rows)
    calib = images[rest[np.linspace(0, len(rest) - 1, args.calibration_images).astype(int)]]
    scratch = Path(tempfile.mkdtemp(prefix="bench-int8-"))

    def int8(method: str) -> tuple[Runner, dict]:
        start = time.perf_counter()
        graph = quantize_int8(encoder, (calib[i:i + 16] for i in range(0, len(calib), 16)),
                              scratch / f"{method}.onnx", method=method)
        runner = open_runner(encoder, EngineSpec("onnxruntime", "int8"), int8_path=graph)
        return runner, {"quantize_s": round(time.perf_counter() - start, 1)}

    settings: list[tuple[str, Callable[[], tuple[Runner, dict]]]] = [("torch fp32", lambda: (TorchRunner(encoder), {}))]
    if cpu_has_bf16():
        settings.append(("torch bf16", lambda: (TorchRunner(encoder, "bf16"), {})))
    settings.append(("onnxruntime fp32", lambda: (open_runner(encoder, EngineSpec("onnxruntime", "fp32")), {})))
    if importlib.util.find_spec("openvino") is not None:
        settings.append(("openvino fp32", lambda: (open_runner(encoder, EngineSpec("openvino", "fp32")), {})))
    settings += [(f"onnxruntime int8 {m}", functools.partial(int8, m)) for m in args.methods.split(",") if m]
    reference: np.ndarray | None = None
    for name, make in settings:
        runner, extra = make()
        embeddings, rate = embed_timed(runner, images, args.batch_size)
        ms = single_ms(runner, images[: args.single])
        reference = embeddings if reference is None else reference
        print(json.dumps({"setting": name, "images": len(images), "images_per_s": round(rate, 1),
                          "batch1_ms": round(ms, 2), **_figures(embeddings, reference, labels),
                          "gate": agreement(reference[gate_rows], embeddings[gate_rows], labels[gate_rows]).to_json(),
                          "mixed_fp32_queries": _mixed(reference, embeddings, labels), **extra}), flush=True)
    if args.end_to_end:
        _end_to_end(args.folder, args.test_classes, args.model, scratch)
    print(json.dumps({"uptime_after": uptime()}), flush=True)


def _end_to_end(folder: Path, test_classes: int, model: str, scratch: Path) -> None:
    """Per setting, `index` of the test classes into a new DB, then `serve` on it (see the module docstring)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_serve import load, start_server

    links = scratch / "images"
    links.mkdir()
    for name in class_folders(folder)[-test_classes:]:
        os.symlink((folder / name).resolve(), links / name)
    upload = sorted(next(links.iterdir()).iterdir())[0].read_bytes()
    for name, options in END_TO_END:
        if (name == "torch bf16" and not cpu_has_bf16()) or (
                name.startswith("openvino") and importlib.util.find_spec("openvino") is None):
            continue
        db = scratch / f"db-{name.replace(' ', '-')}"
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "cli.py", "index", str(links), "--db", str(db), "--model", model,
                              *options, "--json"], cwd=REPO, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        summary = json.loads(out.stdout)
        proc, base = start_server(db, *(options if options[0] == "--engine" else ()))  # fp32: the same engine
        try:
            load(base, upload, 1, 5)  # warm-up
            served = load(base, upload, 1, 40)
        finally:
            proc.terminate()
            proc.wait(30)
        print(json.dumps({"end_to_end": name, "index_images_per_s": summary["images_per_s"], "index_wall_s":
                          round(wall, 1), "kept": f"{summary['engine']} {summary['precision']}",
                          "serve_p50_ms": served["p50_ms"], "serve_server_ms": served["server_median_ms"]}), flush=True)


def class_folders(folder: Path) -> list[str]:
    """The class folders' names, sorted (the last ones are the unseen test half)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def load_classes(folder: Path, classes: list[str], embedder: Embedder) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised images of these class folders, decoded as `index` decodes, and their labels (0, 1, ...)."""
    tensors, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            tensors.append(embedder.transform(load_image(path, draft_size=embedder.draft_size).image))
            labels.append(label)
    return embedder.finish(torch.stack(tensors)), np.array(labels)


def embed_timed(runner: Embed, images: torch.Tensor, batch: int) -> tuple[np.ndarray, float]:
    """(embeddings, images/s) at `batch`, after one warm-up batch."""
    runner(images[:batch])  # warm up
    start = time.perf_counter()
    out = np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])
    return out, len(images) / (time.perf_counter() - start)


def single_ms(runner: Embed, images: torch.Tensor) -> float:
    """ms per image embedded one at a time, after one warm-up."""
    runner(images[:1])
    start = time.perf_counter()
    for i in range(len(images)):
        runner(images[i:i + 1])
    return 1000 * (time.perf_counter() - start) / len(images)


def _figures(embeddings: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    queries, _, neighbours = rank_leave_one_out(embeddings, labels, (1,))
    metrics = ranking_metrics(labels, queries, neighbours, (1,))
    _, ref_nn = knn_search(reference, reference, 10, exclude_self=True)
    _, nn = knn_search(embeddings, embeddings, 10, exclude_self=True)
    overlap = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ref_nn, nn, strict=True)]))
    return {"recall@1": round(metrics["recall@1"], 4), "map@r": round(metrics["map@r"], 4),
            "top10_overlap": round(overlap, 4)}


def _mixed(queries: np.ndarray, database: np.ndarray, labels: np.ndarray) -> dict:
    """Recall@1 and MAP@R of fp32 query vectors searched among this setting's vectors (each query's own left out)."""
    width = int(np.bincount(labels).max()) - 1
    _, neighbours = knn_search(queries, database, max(width, 1), exclude_self=True)
    metrics = ranking_metrics(labels, np.arange(len(labels)), neighbours, (1,))
    return {"recall@1": round(metrics["recall@1"], 4), "map@r": round(metrics["map@r"], 4)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
