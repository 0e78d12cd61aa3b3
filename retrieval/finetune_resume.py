"""What a fine-tune run keeps to resume, and the check that a resumed run continues the same training.

Every setting the optimiser state or the batches depend on (`resume_settings`) must match the checkpoint's; a
mismatch, or a state that no longer fits the model (torch raises on a different parameter layout), is one
RetrievalError line naming what changed, never a torch traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .encoder import Encoder
from .errors import RetrievalError
from .finetune_config import FinetuneConfig
from .losses import LOSS_DEFAULTS


@dataclass
class TrainState:
    """What a checkpoint restores: completed epochs, progress into the next one, history, best epoch."""

    epoch: int = 0                 # epochs fully trained and evaluated
    step: int = 0                  # batches already trained of epoch `epoch + 1` (mid-epoch interrupt)
    partial_loss: float = 0.0      # sum of those batches' losses
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None


def resume_settings(cfg: FinetuneConfig, *, root: Path, encoder: Encoder, world_size: int, locked_groups: int) -> dict:
    """Every setting the batches, the parameter groups or the optimiser state depend on (epochs may grow,
    workers, device and progress may change)."""
    return {"dataset": cfg.dataset, "root": str(root.resolve()), "crop": cfg.crop,
            "train_fraction": cfg.train_fraction, "model": cfg.model, "embed_dim": encoder.embed_dim,
            "loss": cfg.loss, "loss_params": {**LOSS_DEFAULTS[cfg.loss], **cfg.loss_params}, "p": cfg.p,
            "k": cfg.k, "steps_per_epoch": cfg.steps_per_epoch, "image_size": encoder.image_size,
            "seed": cfg.seed, "world_size": world_size, "lr_backbone": cfg.lr_backbone,
            "lr_head": cfg.lr_head, "lr_proxies": cfg.lr_proxies, "weight_decay": cfg.weight_decay,
            "freeze_bn": cfg.freeze_bn, "val_fraction": cfg.val_fraction, "head_init": cfg.head_init,
            "locked_groups": locked_groups, "crop_pct": encoder.config.crop_pct,
            "resize_mode": encoder.config.resize_mode, "tta": encoder.config.tta}


def resume_changes(saved: dict, now: dict) -> list[str]:
    """The settings of `now` (resume_settings of this run) that differ from the checkpoint's, as 'key old -> new'.

    A setting newer than the checkpoint (crop_pct, resize_mode, tta came later) cannot be compared: a run made
    before it existed resumes as before, with the setting's value of this run."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def restore(payload: dict, path: Path, now: dict, modules: dict[str, Any]) -> TrainState:
    """Load the checkpoint `payload` (read from `path`) into `modules` (name -> object with load_state_dict,
    in order: encoder, loss, optimizer, scheduler) after checking the settings; the restored TrainState."""
    changed = resume_changes(payload["config"], now)
    if changed:
        raise RetrievalError(f"{path}: cannot resume with different settings: {'; '.join(changed)}")
    for name, module in modules.items():
        try:
            module.load_state_dict(payload[name])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RetrievalError(f"{path}: cannot resume: the saved {name} state does not fit this run ({reason}); "
                                 f"start a new run with another --out") from None
    return TrainState(payload["epoch"], payload["step"], payload["partial_loss"], payload["history"],
                      payload["best_epoch"])


def state_payload(state: TrainState, config: dict, modules: dict[str, Any]) -> dict:
    """The checkpoint: the run's configuration, its progress and the state dict of each module."""
    return {"config": config, "epoch": state.epoch, "step": state.step, "partial_loss": state.partial_loss,
            "history": state.history, "best_epoch": state.best_epoch,
            **{name: module.state_dict() for name, module in modules.items()}}
