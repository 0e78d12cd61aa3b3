"""`index FOLDER`: scan -> plan -> encode (indexer.build.encode) -> LMDB -> FAISS, incremental and crash-safe.

Order of work in a run, and why:
1. take the writer lock, scan the folder (stat only) and merge it with LMDB's sorted keys as it goes
   (indexer.build.scan, indexer.build.plan): memory for one folder's listing, the plan spooled to disk;
2. new and changed files are encoded and committed batch by batch (one LMDB transaction each);
3. only then are deleted files removed (REMOVE_BATCH per transaction), so a moved file finds its old
   embedding by content hash; the removal guard has counted them all in step 1, before any write;
4. FAISS is brought level with LMDB (also every `checkpoint_seconds` during step 2).
A kill at any point leaves LMDB as of its last commit; the next run finds the remaining work by the same
comparison, and FAISS is checked against LMDB's ids digest before it is trusted.

The encoder (and torch) is loaded only when something must be encoded or the DB must be bound to it; a run
over an unchanged folder costs about a stat walk.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.data.decode import DEFAULT_MAX_PIXELS, default_workers
from retrieval.data.walk import printable
from retrieval.errors import DecodeError, IndexStoreError

from indexer.store import ann
from indexer.store.layout import EncoderInfo, Failure, Header, limits_key
from .plan import Plan, make_plan
from .scan import Unreachable, scan_stream
from indexer.store.lmdb_store import Store

if TYPE_CHECKING:  # torch stays unimported until an encoder is needed
    from retrieval.encoder import Encoder

    from .encode import EncodeCounts

_RUN_DIR_JSON = "encoder.json"  # retrieval.encoder.saved.ENCODER_JSON (importing it would import torch)
REMOVE_BATCH = 4096  # paths removed per LMDB transaction (and scan failures recorded per transaction)


def prefer_passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose OMP_WAIT_POLICY). Must run
    before torch is imported. On a CPU the decode workers share the cores with the encoder's threads, and
    spinning threads take their time: measured on 2 cores (scripts/bench_index.py), index ran 7% faster
    and reached 0.91-0.94 of the encoder-alone rate (medians of two runs) instead of 0.88. Training is left
    alone: its many small ops ran 14% slower with sleeping threads (scripts/bench_finetune.py)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class IndexConfig:
    folder: Path
    db_dir: Path
    model: str = "lite0"
    batch_size: int = 64
    workers: int | None = None  # decode worker processes; None: default_workers(device, minimum=1), 0: in this process
    device: str = "auto"  # see retrieval.device.resolve_device
    precision: str | None = None  # None: the DB's (fp32 for a new DB); fp32 | bf16 | fp16 | int8 | auto (see choose)
    engine: str | None = None  # None: the DB's (torch for a new DB); torch | onnxruntime
    calibration: str = "percentile"  # int8: retrieval.encoder.quantize.CALIBRATION_METHODS
    ann: str = "auto"  # see indexer.store.ann.choose_factory
    reembed: bool = False
    rebuild_ann: bool = False
    strict: bool = False  # raise after the run if any file could not be indexed
    allow_empty: bool = False  # let a folder with no files at all empty a DB that holds items
    max_remove: int | None = None  # most items a run may remove; None: half of the DB (all with allow_empty)
    root_changed: bool = False  # let a DB built from another folder take this one (the collection moved)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: float = 256.0  # files larger than this are recorded as failures, never read into memory
    checkpoint_seconds: float = 600.0  # also write FAISS this often during a long run
    ray: bool = False  # encode on Ray Data (indexer.build.ray_encode) instead of in this process
    ray_address: str | None = None  # with ray: None starts a local Ray, "auto" joins `ray start`'s cluster


@dataclass(frozen=True)
class FailedFile:
    """A file the DB records as not indexable: its path (printable) and why."""

    path: str
    reason: str
    transient: bool = False  # an I/O error or the like: retried on the next run


@dataclass(frozen=True)
class IndexSummary:
    """What one `index` run did, and the DB it left behind."""

    indexed: int  # encoded + reused
    unchanged: int
    removed: int
    failed: int  # files currently recorded as bad (this run's and earlier unchanged ones)
    total: int  # items in the DB
    encoded: int
    reused: int  # embeddings taken from an item with the same content
    new_failures: int
    files: int  # files seen by the scan
    db: Path
    folder: Path
    model: str
    fingerprint: str
    precision: str | None  # the precision the encoder ran at (None: nothing encoded)
    engine: str | None  # the engine it ran on (None: nothing encoded)
    ann: ann.Refresh
    lmdb_bytes: int
    seconds: float
    images_per_s: float | None
    timings: dict[str, float]
    failures: list[FailedFile]
    gate: dict | None = None  # the ranking gate's figures per candidate tried, and the fallback reason if any
    unreachable: list[str] = field(default_factory=list)  # folders (or dangling links) the scan could not reach
    unreachable_kept: int = 0  # items kept because they lie below one of them

    def to_json(self) -> dict:
        """The `index --json` object (gate only when a candidate was gated or fell back)."""
        out = {**asdict(self), "db": str(self.db), "folder": str(self.folder)}
        if self.gate is None:
            del out["gate"]
        return out


def run_index(cfg: IndexConfig, *, progress: bool = False) -> IndexSummary:
    """Bring the DB at cfg.db_dir level with cfg.folder and return what the run did.

    With cfg.strict, raises DecodeError if any file failed.
    """
    if cfg.batch_size < 1 or (cfg.workers or 0) < 0 or cfg.max_file_mb <= 0 or (cfg.max_remove or 0) < 0:
        raise ValueError("batch_size must be >= 1, workers >= 0, max_file_mb > 0 and max_remove >= 0")
    started = time.perf_counter()
    folder = Path(cfg.folder).expanduser().resolve()
    with Store.open(cfg.db_dir, readonly=False) as store:
        _require_same_root(store, folder, cfg.root_changed)
        if not cfg.allow_empty:
            _refuse_to_empty(store, folder)
        header, encoder, plan, timings = _bind_and_plan(store, cfg, folder)
        with plan:
            ann.check_kind(cfg.ann, header.encoder.dim)
            for bad in plan.failures.batches(REMOVE_BATCH):
                store.put_failures([Failure(f.relpath, f.reason, transient=f.transient) for f in bad])
            t = time.perf_counter()
            counts: EncodeCounts | None = None
            choice: dict | None = None
            if plan.todo:
                assert encoder is not None  # _bind_and_plan loads the encoder whenever there is work
                counts, choice = _encode(store, cfg, folder, plan, encoder, header, progress)
            timings["encode_s"] = time.perf_counter() - t
            removed = sum(store.remove_paths(keys) for keys in plan.removed.batches(REMOVE_BATCH))
        if header.reembed_pending:
            store.finish_run()
        t = time.perf_counter()
        ann_info = _refresh_ann(store, cfg.ann, rebuild=cfg.rebuild_ann)
        timings["ann_s"] = time.perf_counter() - t
        with store.snapshot() as snap:
            total, failures = snap.count(), list(snap.failures())
        lmdb_bytes = store.disk_bytes()
    encoded, reused, failed_now = (counts.encoded, counts.reused, len(counts.failures)) if counts else (0, 0, 0)
    summary = IndexSummary(
        indexed=encoded + reused, unchanged=plan.unchanged, removed=removed, failed=len(failures),
        total=total, encoded=encoded, reused=reused,
        new_failures=failed_now + len(plan.failures), files=plan.files,
        db=Path(cfg.db_dir), folder=folder, model=header.encoder.spec, fingerprint=header.encoder.fingerprint,
        precision=choice["precision"] if choice else None, engine=choice["engine"] if choice else None, ann=ann_info,
        lmdb_bytes=lmdb_bytes,
        seconds=round(time.perf_counter() - started, 3),
        images_per_s=round(len(plan.todo) / timings["encode_s"], 2) if plan.todo else None,
        timings={k: round(v, 3) for k, v in timings.items()},
        failures=[FailedFile(printable(f.relpath), f.reason, f.transient) for f in failures],
        gate={"candidates": choice["gate"], "fallback": choice["fallback"]}
        if choice and (choice["gate"] or choice["fallback"]) else None,
        unreachable=[printable(p) for p in plan.unreachable], unreachable_kept=plan.unreachable_kept)
    if cfg.strict and failures:
        first = summary.failures[0]
        raise DecodeError(first.path, f"{first.reason} ({len(failures)} file(s) could not be indexed; --strict)")
    return summary


def _refuse_to_empty(store: Store, folder: Path) -> None:
    """A folder with no files at all while the DB holds items is far more often an unmounted drive or a
    wrong path than a real deletion of everything: stop before removing a single item (or re-embedding).
    The scan stops at the first image file, or failure, it finds."""
    if any(not isinstance(entry, Unreachable) for entry in scan_stream(folder)):
        return
    with store.snapshot() as snap:
        held = snap.count()
    if held:
        raise IndexStoreError(f"{folder} has no image files, but {store.db_dir} holds {held}: refusing to remove "
                              f"them all (an unmounted drive or a wrong path?); pass --allow-empty to empty the DB")


def _require_same_root(store: Store, folder: Path, root_changed: bool) -> None:
    """A DB is bound to the folder it indexes: pointed at another one, every item would look deleted."""
    header = store.header()
    if header is None or header.root == str(folder) or root_changed:
        return
    raise IndexStoreError(f"{store.db_dir} indexes {header.root}, not {folder}: pass --root-changed if the "
                          f"collection moved there (stored paths are relative, so nothing is re-encoded), or use "
                          f"another --db")


def _limit_removals(store: Store, cfg: IndexConfig, plan: Plan) -> None:
    """Stop before removing anything when a run would remove more items than allowed: more than
    cfg.max_remove, or by default more than half the DB (a vanished sub-tree, a wrong mount, a bad sync)."""
    n = plan.removed_items
    with store.snapshot() as snap:
        held = snap.count()
    if cfg.max_remove is not None:
        if n <= cfg.max_remove:
            return
        limit = f"more than --max-remove {cfg.max_remove}"
    elif cfg.allow_empty or 2 * n <= held:
        return
    else:
        limit = "more than half of it"
    where = ", ".join(f"{printable(name)}/ ({count})" for name, count in plan.removed_from.most_common(5))
    raise IndexStoreError(f"this run would remove {n} of the {held} items in {store.db_dir} ({limit}; gone from: "
                          f"{where}); nothing was changed. If those files were deleted on purpose, pass "
                          f"--max-remove {n}; if a drive or share is not mounted, mount it and run again")


def _bind_and_plan(store: Store, cfg: IndexConfig,
                   folder: Path) -> tuple[Header, Encoder | None, Plan, dict[str, float]]:
    """Bind the DB to the encoder (loading it only if needed) and plan the work: (header, encoder or None,
    plan, {"scan_s": seconds of the scan and plan}).

    --reembed empties the DB, so it binds before planning; otherwise the plan comes first, and an unchanged
    folder indexed with the same encoder never loads it.
    """
    header = store.header()
    if header is None or cfg.reembed:
        encoder = _load_encoder(cfg)
        info = EncoderInfo.of(encoder)  # a --reembed killed half way goes on with the engine it had chosen:
        info = _same_engine(info, header.encoder) if header is not None and header.reembed_pending else info
        header = store.begin_run(info, str(folder), reembed=cfg.reembed)
        return (header, encoder, *_plan(store, folder, cfg))
    plan, timings = _plan(store, folder, cfg)
    try:
        _limit_removals(store, cfg, plan)
        loaded = _load_encoder(cfg) if plan.todo or not _same_encoder_cheap(cfg.model, header.encoder) else None
        header = store.begin_run(_same_engine(EncoderInfo.of(loaded), header.encoder) if loaded else header.encoder,
                                 str(folder), reembed=False)
    except BaseException:
        plan.close()
        raise
    return header, loaded, plan, timings


def _plan(store: Store, folder: Path, cfg: IndexConfig) -> tuple[Plan, dict[str, float]]:
    """Scan `folder` and merge it with the DB's keys in one pass (one read snapshot; nothing is written)."""
    started = time.perf_counter()
    with store.snapshot() as snap:
        plan = make_plan(scan_stream(folder), snap.paths(), snap.failures(),
                         limits_key(cfg.max_pixels, _max_file_bytes(cfg)), spool_dir=store.db_dir)
    return plan, {"scan_s": time.perf_counter() - started}


def _max_file_bytes(cfg: IndexConfig) -> int:
    return int(cfg.max_file_mb * 2**20)


def _encode(store: Store, cfg: IndexConfig, folder: Path, plan: Plan, encoder: Encoder, header: Header,
            progress: bool) -> tuple[EncodeCounts, dict]:
    """Encode and commit plan.todo here or on Ray: (counts, the engine choice as `index --json` shows it).
    The engine is chosen (indexer.build.choose) and recorded in the header before the first vector is written.
    Both paths stream the files from the plan's spool (the Ray path one window of files at a time)."""
    from retrieval.device import resolve_device

    from .choose import choose

    def checkpoint() -> None:
        _refresh_ann(store, cfg.ann, rebuild=False)

    device = resolve_device(cfg.device)
    ray = cfg.ray or cfg.ray_address
    if ray and (cfg.precision in ("int8", "auto") or header.encoder.precision == "int8"):
        raise IndexStoreError("--ray encodes with torch (fp32, bf16, fp16): int8 and --precision auto run locally")
    choice = choose(store, folder, plan.todo, encoder, header.encoder, precision=cfg.precision, engine=cfg.engine,
                    device=str(device), calibration=cfg.calibration)
    if choice.info != header.encoder:
        store.begin_run(choice.info, str(folder), reembed=False)
    if ray:
        from .ray_encode import encode_files_ray

        counts, _ = encode_files_ray(
            store, folder, plan.todo, encoder, precision=choice.info.precision, batch_size=cfg.batch_size,
            max_pixels=cfg.max_pixels, max_file_bytes=_max_file_bytes(cfg), address=cfg.ray_address, actors=None,
            checkpoint=checkpoint, checkpoint_seconds=cfg.checkpoint_seconds, progress=progress)
        return counts, choice.to_json()
    from .encode import Embedder, encode_files

    counts = encode_files(
        store, folder, iter(plan.todo), Embedder(encoder, device, runner=choice.runner), batch_size=cfg.batch_size,
        total=len(plan.todo), workers=default_workers(str(device), minimum=1) if cfg.workers is None else cfg.workers,
        max_pixels=cfg.max_pixels, max_file_bytes=_max_file_bytes(cfg),
        checkpoint=checkpoint, checkpoint_seconds=cfg.checkpoint_seconds, progress=progress)
    return counts, choice.to_json()


def _load_encoder(cfg: IndexConfig) -> Encoder:
    from retrieval.device import resolve_device
    from retrieval.encoder import load_encoder

    return load_encoder(cfg.model, device=resolve_device(cfg.device))


def _same_engine(info: EncoderInfo, stored: EncoderInfo) -> EncoderInfo:
    """`info` with the stored engine, precision and graph when it is the stored encoder (its vectors' record)."""
    if info.fingerprint != stored.fingerprint:
        return info
    return replace(info, engine=stored.engine, precision=stored.precision, graph=stored.graph)


def _same_encoder_cheap(spec: str, stored: EncoderInfo) -> bool:
    """Whether `spec` names the stored encoder, without loading it: a run directory's recorded fingerprint,
    else the same spec string. (A False is settled by loading the encoder; a checkpoint file changed in place
    is caught by the next run that encodes, before it writes anything.)"""
    run_json = Path(spec).expanduser() / _RUN_DIR_JSON
    if run_json.is_file():
        try:
            return json.loads(run_json.read_text()).get("fingerprint") == stored.fingerprint
        except (OSError, ValueError):
            return False
    return spec == stored.spec


def _refresh_ann(store: Store, kind: str, *, rebuild: bool) -> ann.Refresh:
    with store.snapshot() as snap:
        return ann.refresh(store.db_dir, snap, kind, rebuild=rebuild)
