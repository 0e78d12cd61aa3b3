"""Is reduced precision safe for indexing? Cosine of bf16/fp16 embeddings to fp32 on real images, and speed.

    python scripts/bench_precision.py ../shared/datasets/caltech101 --model lite0 --images 1000

Images are decoded and transformed exactly as `index` does (JPEG draft to the resize size). Reports, per
precision, the minimum / 0.1th percentile / mean cosine to fp32 and images/s of the encoder alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from indexer.build.encode import Embedder
from indexer.build.scan import scan_folder
from retrieval.data.decode import load_image
from retrieval.encoder import load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--images", type=int, default=1000, help="evenly spread over the folder's files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    encoder = load_encoder(args.model, device=args.device)
    files = scan_folder(args.folder).files
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(args.images, len(files))).astype(int)]
    reference = Embedder(encoder, args.device, "fp32")
    images = torch.stack([reference.transform(load_image(args.folder / f.relpath,
                                                         draft_size=reference.draft_size).image) for f in picked])
    precisions = ["fp32", "bf16"] if args.device == "cpu" else ["fp32", "fp16"]
    embeddings, rates = {}, {}
    for precision in precisions:
        embedder = Embedder(encoder, args.device, precision, verify=False)  # the raw reduced-precision output
        embedder(images[: args.batch_size])  # warm up
        start = time.perf_counter()
        embeddings[precision] = np.concatenate([embedder(images[i:i + args.batch_size])
                                                for i in range(0, len(images), args.batch_size)])
        rates[precision] = len(images) / (time.perf_counter() - start)
    for precision in precisions:
        cos = (embeddings[precision] * embeddings["fp32"]).sum(axis=1)
        print(json.dumps({"model": args.model, "precision": precision, "images": len(images),
                          "images_per_s": round(rates[precision], 1), "min_cosine": round(float(cos.min()), 6),
                          "p0.1_cosine": round(float(np.percentile(cos, 0.1)), 6),
                          "mean_cosine": round(float(cos.mean()), 6), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
