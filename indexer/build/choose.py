"""Which engine and precision an `index` run encodes with, decided once per DB and recorded in its header.

The first run that encodes into a DB (or a --reembed) decides: fp32 runs on the engine asked (default: ONNX
Runtime on a CPU; its exported graph is checked against torch when opened and is exact to 1e-6). A reduced
precision (bf16, fp16, int8) or `auto` goes through the gate (retrieval.encoder.gate) on a held sample of the
files to encode: GATE_IMAGES of them, evenly spread, are embedded by fp32 and by the candidate, and the candidate
is kept only if the rankings agree; int8 is first calibrated on CALIBRATION_IMAGES other files of the same
folder. A failing candidate falls back to fp32 with a one-line warning. `auto` tries int8 (only on a CPU with
VNNI or AMX), then bf16 (only with AVX512-BF16 or AMX), and keeps the first that passes, else fp32. Later runs
use what the header records, so every vector of a DB is made the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from indexer.store.layout import EncoderInfo
from indexer.store.lmdb_store import Store
from retrieval.compat import cpu_has_bf16
from retrieval.data.decode import DEFAULT_MAX_PIXELS
from retrieval.encoder.engine import (
    EngineSpec,
    EngineUnavailable,
    Runner,
    cpu_has_vnni,
    open_runner,
    resolve_engine,
    runner_or_torch,
)
from retrieval.encoder.gate import Agreement, agreement
from retrieval.errors import IndexStoreError

from .encode import Embedder, ImageFiles, require_precision
from .scan import FileEntry

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

    from .plan import Spool

log = logging.getLogger(__name__)

GATE_IMAGES = 512  # held sample the rankings are compared on (all files when fewer)
MIN_GATE_IMAGES = 20  # fewer files to encode than this: too few to judge a reduced precision, fp32 it is
AUTO_ORDER = ("int8", "bf16")  # fastest first (docs/engines.md); fp32 when none passes


@dataclass(frozen=True)
class Choice:
    """What the run encodes with, and why: the gate's figures per candidate tried, the fallback reason."""

    runner: Runner
    info: EncoderInfo  # the header's record (engine, precision, graph)
    gate: dict[str, dict]  # candidate ("onnxruntime int8") -> Agreement.to_json()
    fallback: str | None = None

    def to_json(self) -> dict:
        return {"engine": self.info.engine, "precision": self.info.precision, "gate": self.gate,
                "fallback": self.fallback}


def choose(store: Store, folder: Path, todo: Spool[FileEntry], encoder: Encoder, info: EncoderInfo, *,
           precision: str | None, engine: str | None, device: str, calibration: str) -> Choice:
    """Decide (or take from `info`, the header's record, when the DB already holds vectors) how to encode."""
    with store.snapshot() as snap:
        held = snap.count()
    if held:
        return _recorded(store.db_dir, encoder, info, precision, engine, device)
    if precision in (None, "fp32"):
        runner, used, reason = runner_or_torch(encoder, resolve_engine("fp32", engine, device), device=device)
        return Choice(runner, replace(info, engine=used.engine, precision="fp32", graph=""), {}, reason)
    candidates = [c for c in AUTO_ORDER if _fast_here(c)] if precision == "auto" else [precision]
    skip = _not_worth_gating(precision, candidates, len(todo))
    if skip is not None:
        runner, used, reason = runner_or_torch(encoder, resolve_engine("fp32", engine if precision != "auto" else None,
                                                                       device), device=device)
        reason = f"{skip}; using {used}"
        log.warning("%s", reason)
        return Choice(runner, replace(info, engine=used.engine, precision="fp32", graph=""), {}, reason)
    sample = _Sample(folder, todo, encoder, device)
    reference, ref_spec, reason = runner_or_torch(encoder, resolve_engine("fp32", device=device), device=device)
    fp32 = sample.embed(reference, sample.gate)
    figures: dict[str, dict] = {}
    for name in candidates:
        spec = resolve_engine(name, engine if precision != "auto" else None)
        try:
            runner, graph = _candidate(store.db_dir, encoder, spec, sample, device, calibration)
        except EngineUnavailable as exc:
            reason = f"{spec} unavailable ({exc})"
            continue
        verdict = agreement(fp32, sample.embed(runner, sample.gate), sample.labels)
        figures[str(spec)] = verdict.to_json()
        if verdict.passed:
            return Choice(runner, replace(info, engine=spec.engine, precision=spec.precision, graph=graph), figures)
        reason = (f"{spec} fails the ranking gate on {verdict.images} images (top-10 overlap {verdict.overlap:.3f}"
                  f"{_deltas(verdict)}; {verdict.rule})")
    reason = f"{reason}; using {ref_spec}"
    log.warning("%s", reason)
    return Choice(reference, replace(info, engine=ref_spec.engine, precision="fp32", graph=""), figures, reason)


def _fast_here(precision: str) -> bool:
    """Whether this CPU runs `precision` natively (faster than fp32): int8 needs VNNI or AMX, bf16 AVX512-BF16 or
    AMX; `auto` tries only those."""
    return {"int8": cpu_has_vnni, "bf16": cpu_has_bf16}[precision]()


def _not_worth_gating(precision: str, candidates: list[str], files: int) -> str | None:
    """Why no reduced precision is even tried (None: try them): int8 on a CPU without int8 dot products, `auto`
    on a CPU with neither, or too few files to judge the rankings."""
    if precision == "int8" and not cpu_has_vnni():
        return ("this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), so int8 would be "
                "no faster than fp32")
    if not candidates:
        return ("this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX) nor native bf16 "
                "(AVX512-BF16 or AMX), so no reduced precision would be faster than fp32")
    if files < MIN_GATE_IMAGES:
        return f"{files} images are too few to check {precision}'s rankings (the gate needs {MIN_GATE_IMAGES})"
    return None


def _recorded(db_dir: Path, encoder: Encoder, info: EncoderInfo, precision: str | None, engine: str | None,
              device: str) -> Choice:
    """The engine the DB's vectors were made with; IndexStoreError when asked for another or when it is gone."""
    recorded = EngineSpec(info.engine, info.precision)
    if precision not in (None, "auto") and resolve_engine(precision, engine).precision != recorded.precision:
        raise IndexStoreError(f"{db_dir}'s vectors were made with {recorded}: a run adds to them with the same "
                              f"(leave out --precision), or pass --reembed to re-encode everything")
    if recorded.precision == "fp32":  # torch and onnxruntime fp32 agree to 1e-6: either may add to the other's
        spec = resolve_engine("fp32", engine, device)
        runner, used, reason = runner_or_torch(encoder, spec, device=device)
        return Choice(runner, replace(info, engine=used.engine), {}, reason)
    try:
        runner = open_runner(encoder, recorded, device=device, int8_path=db_dir / info.graph if info.graph else None)
    except EngineUnavailable as exc:
        raise IndexStoreError(f"{db_dir}'s vectors were made with {recorded}, which cannot run here ({exc}): "
                              f"pass --reembed to re-encode everything") from None
    return Choice(runner, info, {})


def _candidate(db_dir: Path, encoder: Encoder, spec: EngineSpec, sample: _Sample, device: str,
               calibration: str) -> tuple[Runner, str]:
    """(runner, graph file name or "") for a reduced precision; int8 is calibrated on the sample's other files."""
    if spec.precision != "int8":
        require_precision(spec.precision, torch.device(device))  # bf16 without AVX512-BF16 / AMX, fp16 on a CPU
        return open_runner(encoder, spec, device=device), ""
    from retrieval.encoder.quantize import calibration_key, quantize_int8

    images, hashes = sample.calibration_images()
    graph = f"encoder-int8-{calibration_key(encoder, calibration, hashes)}.onnx"
    if not (db_dir / graph).is_file():
        # 8 images per calibration batch: onnxruntime holds every activation of a batch (peak RSS of `index
        # --precision int8` on lite0: 7.1 GB with 32, 5.0 GB with 8; the same ranges, MinMax is batch-independent)
        quantize_int8(encoder, (images[i:i + 8] for i in range(0, len(images), 8)), db_dir / graph,
                      method=calibration)
    return open_runner(encoder, spec, device=device, int8_path=db_dir / graph), graph


def _deltas(verdict: Agreement) -> str:
    if verdict.recall_at_1 is None:
        return ""
    return (f", Recall@1 {verdict.recall_at_1_fp32:.4f} -> {verdict.recall_at_1:.4f}, "
            f"MAP@R {verdict.map_at_r_fp32:.4f} -> {verdict.map_at_r:.4f}")


class _Sample:
    """Evenly spread files of the run's todo list, decoded and preprocessed as `index` does: the gate's held
    sample, and (for int8) calibration files disjoint from it where the folder has enough."""

    def __init__(self, folder: Path, todo: Spool[FileEntry], encoder: Encoder, device: str):
        from retrieval.encoder.quantize import CALIBRATION_IMAGES

        self._embedder = Embedder(encoder, "cpu")  # for its transforms; the runners are given per call
        self._dataset = ImageFiles(folder, (), self._embedder.transform, self._embedder.draft_size,
                                   DEFAULT_MAX_PIXELS)
        n = len(todo)
        gate = set(np.linspace(0, n - 1, min(GATE_IMAGES, n)).astype(int).tolist()) if n else set()
        rest = [i for i in range(n) if i not in gate] or sorted(gate)  # a small folder calibrates on the sample
        calib = {rest[int(j)] for j in np.linspace(0, len(rest) - 1, min(CALIBRATION_IMAGES, len(rest)))}
        self._gate_entries: list[tuple[int, FileEntry]] = []
        self._calib_entries: list[tuple[int, FileEntry]] = []
        for i, entry in enumerate(todo):
            if i in gate:
                self._gate_entries.append((i, entry))
            if i in calib:
                self._calib_entries.append((i, entry))
        self.gate, gate_labels, _ = self._load(self._gate_entries)
        names = sorted({label for label in gate_labels if label})
        self.labels = np.array([names.index(label) if label else -1 for label in gate_labels], dtype=np.int64)

    def _load(self, entries: list[tuple[int, FileEntry]]) -> tuple[torch.Tensor, list[str], list[bytes]]:
        """(normalised images, labels, content hashes) of the entries that decode."""
        loaded = [(self._dataset[(i, entry.relpath)], entry.label) for i, entry in entries]
        good = [(x, label) for x, label in loaded if x.tensor is not None]
        if not good:
            raise EngineUnavailable("no file of the sample decodes")
        images = self._embedder.finish(torch.stack([x.tensor for x, _ in good if x.tensor is not None]))
        return images, [label for _, label in good], [x.content_hash for x, _ in good]

    def calibration_images(self) -> tuple[torch.Tensor, list[bytes]]:
        images, _, hashes = self._load(self._calib_entries)
        return images, hashes

    @staticmethod
    def embed(runner: Runner, images: torch.Tensor, batch: int = 64) -> np.ndarray:
        return np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])
