"""Embed a list of records with an encoder and score retrieval on them (Recall@K, MAP@R).

One code path for `finetune` (the baseline and every epoch) and `eval --dataset`: both embed with
`embed_records` and score with `metrics.rank_leave_one_out` + `metrics.ranking_metrics`, so the numbers a
run reports are the numbers a later evaluation of its run directory reproduces.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .data.dataset import ImageDataset
from .data.records import Record
from .errors import RetrievalError
from .eval_config import DEFAULT_KS
from .metrics import Metrics, rank_leave_one_out, ranking_metrics

if TYPE_CHECKING:
    from .encoder import Encoder


@dataclass(frozen=True)
class RecordsEvaluation:
    """What `evaluate_records` measured: the metrics of `metrics.ranking_metrics` and the embedding time."""

    metrics: Metrics
    embed_seconds: float

    def to_json(self) -> dict[str, float]:
        """The metrics flat, plus "embed_seconds" (one row of a fine-tune run's history)."""
        return {**self.metrics, "embed_seconds": self.embed_seconds}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (on CPU fp32 measured faster here)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(dataset: ImageDataset, *, workers: int, device: torch.device,
                **kw: Any) -> torch.utils.data.DataLoader:
    """DataLoader with the settings training and evaluation share (prefetching workers, pinned memory on CUDA)."""
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        **kw,
    )


@torch.inference_mode()
def embed_records(
    encoder: Encoder,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    amp: bool = True,
    tower: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, D) float32 and labels (N,) int64 of `records`, in order, with the eval transform.

    With `tower`, the pooled tower features before the head (N, feature_dim), not normalised.

    JPEGs are decoded with draft() to the eval resize size (the transform shrinks them to it anyway).
    The encoder is put in eval mode and left there.
    """
    if not records:
        raise RetrievalError("nothing to embed: the record list is empty")
    device = torch.device(device)
    dataset = ImageDataset(records, encoder.eval_transform(), draft_size=encoder.config.resize_size)
    loader = make_loader(dataset, workers=workers, device=device, batch_size=batch_size, shuffle=False)
    encoder.eval()
    forward = encoder.tower_features if tower else encoder
    out = np.empty((len(records), encoder.config.feature_dim if tower else encoder.embed_dim), dtype=np.float32)
    labels = np.empty(len(records), dtype=np.int64)
    bar = tqdm(total=len(records), desc="embed", unit="img", disable=not progress, leave=False)
    with bar, autocast(device, amp):
        for images, batch_labels, index in loader:
            emb = forward(images.to(device, non_blocking=True))
            out[index.numpy()] = emb.float().cpu().numpy()
            labels[index.numpy()] = batch_labels.numpy()
            bar.update(len(index))
    return out, labels


def evaluate_records(
    encoder: Encoder,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    amp: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
) -> RecordsEvaluation:
    """Recall@K, MAP@R and R-Precision of `records` retrieving each other (leave-one-out), plus timing."""
    start = time.perf_counter()
    embeddings, labels = embed_records(
        encoder, records, batch_size=batch_size, workers=workers, device=device, progress=progress, amp=amp
    )
    seconds = time.perf_counter() - start
    queries, _, neighbours = rank_leave_one_out(embeddings, labels, ks, device=device)
    return RecordsEvaluation(ranking_metrics(labels, queries, neighbours, ks), round(seconds, 2))
