"""The fine-tune configuration, kept free of heavy imports so the CLI can show its defaults instantly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path

SCHEDULES = ("cosine", "constant")
HEAD_INITS = ("pca", "fixed")
AUTO_LOCKED = 6   # leading layer groups frozen by default, at most half the tower's (lite0: stem + 112/56 px stages)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tune run depends on; `out` is the run directory."""

    out: Path
    dataset: str = "cub"
    root: Path | None = None               # None: the embedded generated set (created on first use)
    crop: bool = False                     # CUB: crop to the bounding boxes
    train_fraction: float = 0.5            # folder: share of the sorted classes used for training
    val_fraction: float = 0.1              # train classes moved to validation (chooses the kept epoch); 0: test
    patience: int = 2                      # stop after this many epochs without a better validation epoch; 0: never
    model: str = "lite0"                   # encoder spec (see retrieval.encoder.sources)
    embed_dim: int | None = None           # None: the encoder's default (512)
    head_init: str = "pca"                 # pca: the train split's top principal directions; fixed: hashed projection
    loss: str = "circle"
    loss_params: Mapping[str, float] = field(default_factory=dict)   # overrides of LOSS_DEFAULTS[loss]
    p: int = 16                            # classes per batch (8 lost Recall@1 on full Caltech-101, 16 kept it)
    k: int = 4                             # images per class in a batch
    epochs: int = 4
    steps_per_epoch: int | None = None     # None: one pass over the train images (PKSampler's length)
    lr_backbone: float = 3e-5              # early groups locked: birds MAP@R +0.042 in epoch 1 (1e-5: +0.027)
    lr_head: float = 1e-4                  # 1e-3 measured to overfit the train classes
    lr_proxies: float | None = None        # class-circle proxies; None: 10 x lr_head
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    schedule: str = "cosine"
    freeze_backbone_epochs: int = 0        # for random heads; ours keeps the trunk's geometry
    freeze_bn: bool = True                 # keep BatchNorm running statistics (eval mode) while training
    locked_groups: int | None = None       # the tower's first N layer groups stay frozen; None: auto (AUTO_LOCKED)
    image_size: int | None = None          # None: the encoder's own input size
    crop_pct: float | None = None          # eval crop (saved in encoder.json); None: the encoder's own
    resize_mode: str | None = None         # eval resize, shortest | squash; None: the encoder's own
    tta: str | None = None                 # evaluation's test-time augmentation, none | flip (saved in encoder.json)
    workers: int | None = None             # None: 0 on a 2-core CPU, CPUs / 4 on a CPU, CPUs (max 8) with CUDA
    seed: int = 0
    resume: bool = False
    device: str = "auto"                   # auto: cuda when available, else cpu
    amp: bool = True                       # bf16 autocast on CUDA; ignored on CPU (fp32 is faster there)
    eval_batch_size: int = 64


def default(name: str) -> object:
    """The default of one FinetuneConfig field (the CLI shows these, so they are written only once)."""
    value = FinetuneConfig.__dataclass_fields__[name].default
    if value is MISSING:
        raise KeyError(f"FinetuneConfig.{name} has no plain default")
    return value
