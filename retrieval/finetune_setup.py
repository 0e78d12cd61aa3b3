"""A fine-tune run's set-up, as functions of its configuration: the splits, the encoder with its locked
groups, the P x K batch shape, the optimiser's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_records, split_records
from .data.records import Record
from .encoder import Encoder, load_encoder
from .errors import RetrievalError
from .finetune_config import AUTO_LOCKED, FinetuneConfig


def load_splits(cfg: FinetuneConfig, *, main: bool,
                barrier: Callable[[], None]) -> tuple[list[Record], list[Record], Path]:
    """(train, test, root) records; with no root the generated cub set, made once by the main rank."""
    root = cfg.root
    if root is None:
        if cfg.dataset != "cub":
            raise RetrievalError(f"--dataset {cfg.dataset} needs --root (only the generated cub set is built in)")
        from .data.generate import ensure_default_dataset

        root = ensure_default_dataset() if main else None
        barrier()   # rank 0 generates it once; the others then find it
        root = root or ensure_default_dataset()
    records = load_records(cfg.dataset, root, crop=cfg.crop, train_fraction=cfg.train_fraction)
    train, test = split_records(records, "train"), split_records(records, "test")
    if not train or not test:
        raise RetrievalError(f"{root}: need images in both splits, got {len(train)} train and {len(test)} test")
    return train, test, Path(root)


def build_encoder(cfg: FinetuneConfig, device: torch.device) -> tuple[Encoder, int | None, int]:
    """(encoder, its tower's layer groups, how many of them are locked) for this run."""
    encoder = load_encoder(cfg.model, embed_dim=cfg.embed_dim, device=device, crop_pct=cfg.crop_pct,
                           resize_mode=cfg.resize_mode, tta=cfg.tta)
    groups = encoder.layer_groups()
    locked = locked_groups(cfg.locked_groups, groups)
    if locked:
        encoder.lock_tower(locked)
    if cfg.image_size is not None and cfg.image_size != encoder.image_size:
        # The config is the encoder's preprocessing contract: a new input size is a new config, saved as such.
        encoder.config = dataclasses.replace(encoder.config, image_size=cfg.image_size)
    return encoder, groups, locked


def make_optimizer(cfg: FinetuneConfig, trunk: list[nn.Parameter], head: Iterable[nn.Parameter],
                   proxies: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over named groups: the unlocked trunk, the head, and the class proxies of a proxy loss."""
    groups = [
        {"params": trunk, "lr": cfg.lr_backbone, "name": "backbone"},
        {"params": list(head), "lr": cfg.lr_head, "name": "head"},
    ]
    if proxies:   # class-circle: proxies move on the unit sphere; decay would only shrink their norm
        lr = cfg.lr_proxies if cfg.lr_proxies is not None else 10 * cfg.lr_head
        groups.append({"params": proxies, "lr": lr, "weight_decay": 0.0, "name": "proxies"})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The LambdaLR multiplier of this run's schedule over all its epochs."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = cfg.schedule
    return lambda step: lr_factor(step, total=total, warmup=warmup, schedule=schedule)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rates at optimiser step `step`: linear warm-up, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_shape(labels: list[int], p: int, k: int) -> tuple[int, str | None]:
    """(P to use, a log line or None): P is lowered to the number of classes with at least 2 images when the
    train split has fewer; classes with fewer than K images are sampled with replacement (PKSampler)."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    usable = int((counts >= 2).sum())
    if usable < 2:
        raise RetrievalError(f"the train split has {usable} class(es) with at least 2 images; P x K batches need 2")
    notes = []
    if p > usable:
        notes.append(f"P lowered from {p} to {usable}: the train split has {usable} classes with 2+ images")
    if (short := int(((counts >= 2) & (counts < k)).sum())):
        notes.append(f"{short} of them have fewer than K={k} images and are sampled with replacement")
    return min(p, usable), "; ".join(notes) or None


def locked_groups(requested: int | None, groups: int | None) -> int:
    """The tower's leading layer groups to freeze: as requested, or by default AUTO_LOCKED but at most half
    of them (none when the tower cannot be locked in part)."""
    if requested is None:
        return min(AUTO_LOCKED, groups // 2) if groups else 0
    return requested
