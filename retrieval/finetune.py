"""Fine-tune an encoder with a metric-learning loss on P x K batches, scoring Recall@K and MAP@R every epoch.

The defaults protect a strong pretrained trunk, which naive fine-tuning easily makes worse (measured on
unseen Caltech-101 classes; figures in the project notes):
- BatchNorm keeps its pretrained running statistics (a P x K batch holds only P classes; its statistics
  would drift towards them and corrupt the features of every unseen class);
- the trunk's first layer groups locked (`locked_groups`, open_clip's `lock`): the high-resolution stages
  hold most activations, so a step takes half the memory and ~1.6x less time, and the generic low-level
  features stay as pretrained;
- small learning rates: the trunk's 3e-5 (on fine-grained birds MAP@R +0.042 after one epoch against
  +0.027 at 1e-5; on generic Caltech-101 classes later epochs drift, which the validation split sees) and
  the head's 1e-4 (at 1e-3 the head overfits the train classes, the unseen-class gain vanishes);
- the head starts from a projection that keeps the trunk's geometry, so the baseline is fair and the trunk
  needs no head-only phase (`freeze_backbone_epochs` > 0 still provides one, e.g. for a random head);
- 16 classes x 4 images per batch: with 8 x 4, Recall@1 on unseen Caltech-101 classes wavered around the
  baseline, with 16 x 4 (more negatives per anchor) it rose while MAP@R rose more;
- warm-up then cosine decay, so the last epochs settle instead of jumping around.

Epoch 0 is the pretrained baseline, evaluated on the test split by the same code as every later epoch.
The run directory keeps the best epoch (by MAP@R among the epochs that keep the baseline's Recall@1; see
`selection_key`), the last state for `resume`, the metrics and the curves. Runs unchanged under
`torchrun --nproc_per_node=N`: DDP (gloo on CPU, nccl on CUDA), the P x K sampler shards batches by rank,
rank 0 evaluates and writes, the other ranks wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .data.dataset import ImageDataset
from .data.decode import default_workers
from .data.records import Record, carve_validation
from .data.sampler import PKSampler
from .device import resolve_device
from .embed import RecordsEvaluation, autocast, embed_records, make_loader
from .encoder import Encoder
from .encoder.model import init_head
from .errors import RetrievalError
from .eval_config import DEFAULT_KS
from .finetune_config import HEAD_INITS, SCHEDULES, FinetuneConfig
from .finetune_resume import TrainState, restore, resume_settings, state_payload
from .finetune_select import chosen_split, is_better, recall_lost_warning, selection_note
from .finetune_setup import batch_shape, build_encoder, load_splits, lr_lambda, make_optimizer
from .interrupt import sigint_latch
from .losses import LOSS_DEFAULTS, LOSSES, make_loss
from .metrics import rank_leave_one_out, ranking_metrics
from .pairs import hardest_pairs
from .run_dir import CHECKPOINT, RunDir

log = logging.getLogger(__name__)

PCA_IMAGES = 4096   # at most this many train images (evenly spaced) fit the PCA head

class TrainingInterrupted(RetrievalError):
    """Ctrl-C during fine-tuning: the state was saved and `--resume` continues from it."""


@dataclass(frozen=True)
class _Dist:
    """This process's place in the run: rank, world size, device; owns_group if we initialised it."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished run reports: its directory, epochs, kept epoch and the figures of epochs 0, kept, last.

    Each figure set holds Recall@K for DEFAULT_KS and MAP@R on the test split (and, when a validation split
    chose the kept epoch, the same on it).
    """

    out: str
    epochs: int
    best_epoch: int | None
    baseline: dict[str, float]
    best: dict[str, float] | None
    last: dict[str, float]
    fingerprint: str | None
    seconds: float
    selected_on: str = "test"      # the split that chose the kept epoch: "validation", or "test" (optimistic)
    validation: dict[str, dict[str, float]] | None = None   # baseline / best / last on the validation split

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _figures(row: dict) -> dict[str, float]:
    return {key: row[key] for key in [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]}


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult | None:
    """Train, evaluate every epoch, write the run directory; return the summary (rank 0; None elsewhere)."""
    _validate(cfg)
    ctx = _setup_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx, progress).run()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _validate(cfg: FinetuneConfig) -> None:
    checks = [
        (cfg.loss in LOSSES, f"unknown loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}"),
        (cfg.schedule in SCHEDULES, f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
        (cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (cfg.p >= 2 and cfg.k >= 2, f"P x K batches need P >= 2 classes and K >= 2 images, got P={cfg.p} K={cfg.k}"),
        (0 <= cfg.val_fraction < 1, f"the validation fraction must lie in [0, 1), got {cfg.val_fraction}"),
        (cfg.patience >= 0, f"patience must not be negative, got {cfg.patience}"),
        (cfg.head_init in HEAD_INITS, f"unknown head init {cfg.head_init!r}; choose one of {', '.join(HEAD_INITS)}"),
        (cfg.steps_per_epoch is None or cfg.steps_per_epoch >= 1, "steps per epoch must be at least 1"),
        (min(cfg.lr_backbone, cfg.lr_head, cfg.weight_decay, cfg.warmup_epochs) >= 0, "rates must not be negative"),
        (0 <= cfg.freeze_backbone_epochs, "freeze-backbone epochs must not be negative"),
        (cfg.locked_groups is None or cfg.locked_groups >= 0, "locked groups must not be negative"),
        ((cfg.workers or 0) >= 0 and cfg.eval_batch_size >= 1, "workers must be >= 0 and the eval batch size >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise RetrievalError(message)


def _setup_distributed(device_name: str) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), else run alone."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return _Dist(0, 1, device, owns_group=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # timm's BatchNormAct2d included


def train_mode(module: nn.Module, *, freeze_bn: bool) -> None:
    """Training mode, except that with `freeze_bn` every BatchNorm keeps normalising with (and keeping) its
    pretrained running statistics: a P x K batch of a few classes would drag them towards those classes."""
    module.train()
    if freeze_bn:
        for child in module.modules():
            if isinstance(child, _BATCH_NORMS):
                child.eval()


def train_loader(encoder: Encoder, records: list[Record], batch_sampler: Iterable[list[int]], *, workers: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Training batches: the encoder's train transform, JPEG draft() decoding to its resize size."""
    dataset = ImageDataset(records, encoder.train_transform(), draft_size=encoder.config.resize_size)
    return make_loader(dataset, workers=workers, device=device, batch_sampler=batch_sampler)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, amp: bool) -> float:
    """One optimiser step on one batch (`model(images, labels)` returns the loss); returns the loss value."""
    with autocast(device, amp):
        loss = model(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach().item()


class TrainStep(nn.Module):
    """Encoder + loss as one module, so DDP averages the gradients of both (class proxies included)."""

    def __init__(self, encoder: Encoder, loss: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.encoder(images), labels)


class _EpochBatches(torch.utils.data.Sampler[list[int]]):
    """Batches [start, stop) of one epoch of a PKSampler (resume skips the ones already trained)."""

    def __init__(self, sampler: PKSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        return islice(iter(self.sampler), self.start, self.stop)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class Trainer:
    """One fine-tune run's training: set-up, the epoch loop, evaluation and the kept epoch; files go through
    a RunDir (rank 0)."""

    def __init__(self, cfg: FinetuneConfig, ctx: _Dist, progress: bool):
        self.cfg, self.ctx, self.progress = cfg, ctx, progress and ctx.main
        self.amp = cfg.amp and ctx.device.type == "cuda"
        self.workers = default_workers(ctx.device.type, minimum=0) if cfg.workers is None else cfg.workers
        self.run_dir = RunDir(cfg.out, writer=ctx.main)
        if ctx.main:
            self.run_dir.prepare(resume=cfg.resume)
        ctx.barrier()
        self.log = self.run_dir.log
        self.train_records, self.test_records, self.root = load_splits(cfg, main=ctx.main, barrier=ctx.barrier)
        self.train_records, self.val_records = carve_validation(self.train_records, cfg.val_fraction, seed=cfg.seed)
        self.chooser = "validation" if self.val_records else "test"
        classes = sorted({r.label for r in self.train_records})
        self.label_map = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        self.label_map[classes] = torch.arange(len(classes))
        torch.manual_seed(cfg.seed)   # same initial head and proxies on every rank
        self.encoder, self.layer_groups, self.locked_groups = build_encoder(cfg, ctx.device)
        self.trunk_params = [p for p in self.encoder.backbone_parameters() if p.requires_grad]   # not locked
        self.loss = make_loss(cfg.loss, num_classes=len(classes), dim=self.encoder.embed_dim,
                              **dict(cfg.loss_params)).to(ctx.device)
        self.step_module = TrainStep(self.encoder, self.loss)
        self.p, self.batch_note = batch_shape([r.label for r in self.train_records], cfg.p, cfg.k)
        self.sampler = PKSampler([r.label for r in self.train_records], self.p, cfg.k, seed=cfg.seed,
                                 rank=ctx.rank, world_size=ctx.world_size)
        self.steps = min(len(self.sampler), cfg.steps_per_epoch or len(self.sampler))
        self.optimizer = make_optimizer(cfg, self.trunk_params, self.encoder.head_parameters(),
                                        list(self.loss.parameters()))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps))
        self.state = TrainState()
        self.pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # epoch -> (s_n, s_p) of pairs.png
        self.wrapped: nn.Module = self.step_module   # DDP-wrapped under torchrun (_set_backbone_trainable)
        self.backbone_trainable: bool | None = None

    # -- set-up ------------------------------------------------------------------------------------------

    def _resume_config(self) -> dict:
        return resume_settings(self.cfg, root=self.root, encoder=self.encoder, world_size=self.ctx.world_size,
                               locked_groups=self.locked_groups)

    def _modules(self) -> dict[str, Any]:
        """What a checkpoint holds the state of, in the order it is restored."""
        return {"encoder": self.encoder, "loss": self.loss, "optimizer": self.optimizer,
                "scheduler": self.scheduler}   # the scheduler keeps our lambda (more epochs: a longer cosine)

    def _run_config(self) -> dict:
        """The full configuration as plain JSON values (written to metrics.json and the checkpoint)."""
        plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.cfg).items()}
        return {**plain, **self._resume_config(), "device": str(self.ctx.device)}

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> FinetuneResult | None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.resume:
            self._load_checkpoint()
        else:
            self.log(f"fine-tune {cfg.model} with {cfg.loss} loss on {cfg.dataset} {self.root}: "
                     f"{len(self.train_records)} train / {len(self.val_records)} validation / "
                     f"{len(self.test_records)} test images, world size {ctx.world_size}, device {ctx.device}, "
                     f"{self.steps} steps of {self.p}x{cfg.k} per epoch")
            self.log(selection_note(self.chooser, self.val_records, cfg.val_fraction))
            if self.batch_note:
                self.log(self.batch_note)
            if self.locked_groups:
                self.log(f"trunk: its first {self.locked_groups} of {self.layer_groups} layer groups stay frozen "
                         f"(--locked-groups)")
            self._init_head()
        start = time.perf_counter()
        try:
            with sigint_latch() as check_interrupt:
                if not self.state.history:
                    self._end_epoch(0, {"loss": None, "train_seconds": None, "images_per_s": None})
                for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
                    check_interrupt()
                    if self._stopped_early():
                        break
                    self._end_epoch(epoch, self._train_epoch(epoch, check_interrupt))
        except KeyboardInterrupt:
            if ctx.main:
                self._save_checkpoint()
            raise TrainingInterrupted(
                f"interrupted after {self.state.epoch} epoch(s) + {self.state.step} step(s); state saved to "
                f"{self.run_dir.out / CHECKPOINT}; resume with --resume") from None
        chosen = [chosen_split(row) for row in self.state.history]
        if ctx.main and (warning := recall_lost_warning(chosen, self.state.best_epoch, self.chooser)):
            self.log(warning)
        return self._result(time.perf_counter() - start) if ctx.main else None

    def _set_backbone_trainable(self, trainable: bool) -> nn.Module:
        """Freeze or unfreeze the trunk; under DDP re-wrap, since DDP fixes its parameter set when built."""
        if trainable != self.backbone_trainable:
            for param in self.trunk_params:
                param.requires_grad_(trainable)
            self.backbone_trainable = trainable
            self.wrapped = self.step_module
            if self.ctx.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
                self.wrapped = DistributedDataParallel(self.step_module, device_ids=ids,
                                                       broadcast_buffers=not self.cfg.freeze_bn)
        assert self.wrapped is not None
        return self.wrapped

    def _train_epoch(self, epoch: int, check_interrupt: Callable[[], None]) -> dict:
        """Train one epoch (or what is left of it): mean batch loss over all ranks, seconds, images/s.

        `check_interrupt` runs before each step, so a Ctrl-C that Python swallowed still stops the run there.
        """
        cfg, ctx, state = self.cfg, self.ctx, self.state
        model = self._set_backbone_trainable(epoch > cfg.freeze_backbone_epochs)
        train_mode(self.step_module, freeze_bn=cfg.freeze_bn)
        # Augmentation randomness is a function of (seed, epoch, rank): a run resumed at an epoch boundary
        # repeats the uninterrupted run exactly, with no RNG state to carry in the checkpoint.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + ctx.rank)
        self.sampler.set_epoch(epoch)
        loader = train_loader(self.encoder, self.train_records, _EpochBatches(self.sampler, state.step, self.steps),
                              workers=self.workers, device=ctx.device)
        batch_images = self.p * cfg.k * ctx.world_size
        bar = tqdm(total=self.steps, initial=state.step, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not self.progress, dynamic_ncols=True)
        start, done_here = time.perf_counter(), 0
        with bar:
            for images, labels, _ in loader:
                check_interrupt()
                state.partial_loss += train_step(model, images, self.label_map[labels], self.optimizer,
                                                 self.scheduler, device=ctx.device, amp=self.amp)
                state.step += 1
                done_here += 1
                rate = done_here * batch_images / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{state.partial_loss / state.step:.4f}", img_s=f"{rate:.1f}")
                bar.update()
        seconds = time.perf_counter() - start
        mean_loss = torch.tensor([state.partial_loss / max(1, state.step)], device=ctx.device)
        if ctx.world_size > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= ctx.world_size
        images_per_s = round(done_here * batch_images / seconds, 2) if done_here else None
        return {"loss": mean_loss.item(), "train_seconds": round(seconds, 2), "images_per_s": images_per_s}

    def _end_epoch(self, epoch: int, train: dict) -> None:
        """Rank 0 evaluates, records, keeps the best weights and checkpoints; the others wait.

        `train` holds the epoch's loss, train_seconds and images_per_s (all None for the baseline, epoch 0).
        """
        ctx = self.ctx
        if ctx.main:
            metrics, embeddings, labels = self._evaluate(self.test_records)
            val = None
            if self.val_records:
                val, embeddings, labels = self._evaluate(self.val_records)
            row = {"epoch": epoch, **train, **metrics, "val": val,
                   "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups}}
            history = [chosen_split(r) for r in self.state.history]
            best = history[self.state.best_epoch] if self.state.best_epoch is not None else None
            # the pretrained weights are the baseline, not a result
            improved = epoch > 0 and is_better(chosen_split(row), best, history[0] if history else row)
            self.pairs[str(epoch)] = hardest_pairs(embeddings, labels)
            self.state.history.append(row)
            self.state.best_epoch = epoch if improved else self.state.best_epoch
        self.state.epoch, self.state.step, self.state.partial_loss = epoch, 0, 0.0
        if ctx.main:
            if improved:
                self.run_dir.save_encoder(self.encoder)
            self.log(_epoch_line(row, improved))
            self._save_checkpoint()
            self._write_metrics()
            self.run_dir.write_curves(self.state.history)
            self.run_dir.write_pairs(self.pairs, split=self.chooser, **self._boundary())
        ctx.barrier()

    def _evaluate(self, records: list[Record]) -> tuple[dict, np.ndarray, np.ndarray]:
        """Metrics (those of `metrics.ranking_metrics` + embed_seconds), embeddings and labels of `records`."""
        start = time.perf_counter()
        embeddings, labels = embed_records(self.encoder, records, batch_size=self.cfg.eval_batch_size,
                                           workers=self.workers, device=self.ctx.device, progress=self.progress,
                                           amp=self.amp)
        seconds = time.perf_counter() - start
        queries, _, neighbours = rank_leave_one_out(embeddings, labels, DEFAULT_KS, device=self.ctx.device)
        metrics = RecordsEvaluation(ranking_metrics(labels, queries, neighbours, DEFAULT_KS), round(seconds, 2))
        return metrics.to_json(), embeddings, labels

    def _stopped_early(self) -> bool:
        """Early stopping on the validation split: `patience` epochs since the kept one (same on every rank)."""
        cfg, state = self.cfg, self.state
        stop = torch.tensor([0])
        if (self.ctx.main and self.val_records and cfg.patience > 0 and state.best_epoch is not None
                and state.epoch - state.best_epoch >= cfg.patience):
            stop[0] = 1
            self.log(f"early stop: no better validation epoch in the {cfg.patience} epoch(s) after epoch "
                     f"{state.best_epoch}")
        if self.ctx.world_size > 1:
            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def _boundary(self) -> dict[str, float]:
        """m of the circle and the triplet line drawn in pairs.png: the run's own loss parameters where it
        has them, else Circle Loss's default m (the circle) and triplet's default margin (the line)."""
        params = {**LOSS_DEFAULTS[self.cfg.loss], **self.cfg.loss_params}
        m = float(params.get("m", LOSS_DEFAULTS["circle"]["m"]))   # type: ignore[arg-type]
        margin = float(params.get("margin", m))                    # type: ignore[arg-type]
        return {"m": m, "margin": margin}

    def _init_head(self) -> None:
        """PCA head: the train split's top principal directions of the trunk features, so epoch 0 ranks
        (almost) as the trunk does. Only for a fresh hashed projection narrower than the trunk; a head that
        comes trained (a run directory) or `--head-init fixed` is left alone."""
        encoder, cfg = self.encoder, self.cfg
        fresh = init_head(encoder.config.feature_dim, encoder.embed_dim).weight.to(encoder.head.weight)
        if cfg.head_init != "pca" or encoder.embed_dim >= encoder.config.feature_dim:
            return
        if not torch.equal(encoder.head.weight.detach(), fresh):
            self.log("head: kept as loaded (not the fresh projection), no PCA")
            return
        if self.ctx.main:
            records = self.train_records[:: max(1, len(self.train_records) // PCA_IMAGES)]
            features, _ = embed_records(encoder, records, batch_size=cfg.eval_batch_size, workers=self.workers,
                                        device=self.ctx.device, progress=self.progress, amp=self.amp, tower=True)
            kept = encoder.init_head_from_features(torch.from_numpy(features))
            self.log(f"head: PCA of {len(records)} train images' trunk features ({encoder.config.feature_dim} -> "
                     f"{encoder.embed_dim}, {kept:.1%} of their energy)")
        if self.ctx.world_size > 1:
            with torch.no_grad():
                dist.broadcast(encoder.head.weight.data, src=0)

    # -- what the run directory keeps ---------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        self.run_dir.save_checkpoint(state_payload(self.state, self._run_config(), self._modules()))

    def _load_checkpoint(self) -> None:
        path = self.run_dir.out / CHECKPOINT
        self.state = restore(self.run_dir.load_checkpoint(self.ctx.device), path, self._resume_config(),
                             self._modules())
        self.pairs = self.run_dir.read_pairs()
        self.log(f"resumed from {path}: {self.state.epoch} epoch(s) + {self.state.step} step(s) done, "
                 f"training to epoch {self.cfg.epochs}")

    def _write_metrics(self) -> None:
        s = self.state
        self.run_dir.write_metrics({
            "config": self._run_config(),
            "selected_on": self.chooser,
            "baseline": s.history[0],
            "best_epoch": s.best_epoch,
            "best": s.history[s.best_epoch] if s.best_epoch is not None else None,
            "epochs": s.history,
        })

    def _result(self, seconds: float) -> FinetuneResult:
        s = self.state
        return FinetuneResult(
            out=str(self.run_dir.out), epochs=s.epoch, best_epoch=s.best_epoch, baseline=_figures(s.history[0]),
            best=_figures(s.history[s.best_epoch]) if s.best_epoch is not None else None,
            last=_figures(s.history[-1]), fingerprint=self.run_dir.fingerprint(), seconds=round(seconds, 1),
            selected_on=self.chooser,
            validation={name: _figures(row["val"]) for name, row in
                        (("baseline", s.history[0]), ("best", s.history[s.best_epoch or 0]), ("last", s.history[-1]))}
            if self.val_records else None)


def _epoch_line(row: dict, best: bool) -> str:
    loss = "baseline" if row["loss"] is None else f"loss {row['loss']:.4f}"
    val = row.get("val")
    val_part = f" | val R@1 {val['recall@1']:.4f} MAP@R {val['map@r']:.4f} | test" if val else ""
    recalls = " ".join(f"R@{k} {row[f'recall@{k}']:.4f}" for k in DEFAULT_KS)
    speed = f" {row['images_per_s']:.1f} img/s" if row["images_per_s"] else ""
    return (f"epoch {row['epoch']}: {loss}{val_part} {recalls} MAP@R {row['map@r']:.4f}{speed}"
            f"{' (kept)' if best else ''}")
