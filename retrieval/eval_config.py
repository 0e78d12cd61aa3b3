"""Evaluation settings, kept free of heavy imports so the CLI can show their defaults instantly.

`DEFAULT_KS` is the one list of Recall@K cut-offs that `finetune`, `eval` and the demo report by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)
RESIZE_MODES = ("shortest", "squash")  # eval resize of an encoder (retrieval.encoder.config.EncoderConfig)
TTA_MODES = ("none", "flip")  # test-time augmentation of an encoder in eval mode (EncoderConfig.tta)
DEFAULT_EXPAND_ALPHA = 3.0  # exponent of the hits' cosine weights in query expansion (indexer.store.expand)


@dataclass(frozen=True)
class DatasetEvalConfig:
    """`eval --dataset`: which split of which data set, embedded by which encoder."""

    dataset: str
    root: Path
    model: str
    split: str = "test"
    crop_pct: float | None = None  # eval crop; None: the encoder's own
    resize_mode: str | None = None  # shortest | squash; None: the encoder's own
    tta: str | None = None  # none | flip; None: the encoder's own
    ks: tuple[int, ...] = DEFAULT_KS
    crop: bool = False
    train_fraction: float = 0.5
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    report: Path | None = None
    compare: Path | None = None
    progress: bool = False
