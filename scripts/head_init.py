"""What the head costs before training: test-split Recall@K and MAP@R of the trunk's own features, of the
fixed hashed projection and of the PCA head `finetune` fits (on the train classes minus validation).

One pass of the trunk over the train and test images; each head is applied to the same features, so the
three rows differ only by the head.

    python scripts/head_init.py --dataset folder --root ../shared/datasets/cub-birds-dev
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from retrieval.allocator import keep_freed_memory
    from retrieval.data import load_records, split_records
    from retrieval.data.records import carve_validation
    from retrieval.embed import embed_records
    from retrieval.encoder import load_encoder
    from retrieval.eval_config import DEFAULT_KS
    from retrieval.finetune import PCA_IMAGES
    from retrieval.finetune_config import default
    from retrieval.metrics import rank_leave_one_out, ranking_metrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="folder")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--model", default=default("model"))
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--val-fraction", type=float, default=default("val_fraction"))
    parser.add_argument("--seed", type=int, default=default("seed"))
    args = parser.parse_args(argv)
    keep_freed_memory()

    records = load_records(args.dataset, args.root)
    train, _ = carve_validation(split_records(records, "train"), args.val_fraction, seed=args.seed)
    train = train[:: max(1, len(train) // PCA_IMAGES)]
    test = split_records(records, "test")
    encoder = load_encoder(args.model, embed_dim=args.embed_dim)
    fit, _ = embed_records(encoder, train, tower=True, progress=True)
    features, labels = embed_records(encoder, test, tower=True, progress=True)
    features_t = torch.from_numpy(features)
    rows = {"trunk features (no head)": F.normalize(features_t, dim=1)}
    with torch.no_grad():
        rows[f"fixed hashed {args.embed_dim}-d head"] = F.normalize(encoder.head(features_t), dim=1)
        kept = encoder.init_head_from_features(torch.from_numpy(fit))
        rows[f"PCA {args.embed_dim}-d head ({len(train)} train images, {kept:.1%} energy)"] = \
            F.normalize(encoder.head(features_t), dim=1)
    out = {}
    for name, emb in rows.items():
        queries, _, neighbours = rank_leave_one_out(emb.numpy(), labels, DEFAULT_KS)
        out[name] = ranking_metrics(labels, queries, neighbours, DEFAULT_KS)
    keys = [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]
    print("| features | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, m in out.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    print(json.dumps({name: {k: m[k] for k in keys} for name, m in out.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
