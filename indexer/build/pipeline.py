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
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.store import ann, generations
from indexer.store.layout import EncoderInfo, Failure, Header, limits_key
from indexer.store.lmdb_store import Store
from indexer.store.read import stored_eval_resize
from retrieval.data.decode import DEFAULT_MAX_PIXELS, default_workers
from retrieval.data.walk import printable
from retrieval.errors import DecodeError, IndexStoreError

from .plan import Plan, make_plan
from .scan import Unreachable, scan_stream

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
    crop_pct: float | None = None  # eval crop; None: the DB's own (recorded) one, for a new DB the model's
    resize_mode: str | None = None  # shortest | squash; None: as crop_pct
    tta: str | None = None  # test-time augmentation, none | flip; None: as crop_pct
    batch_size: int = 64
    workers: int | None = None  # decode worker processes; None: default_workers(device, minimum=1), 0: in this process
    device: str = "auto"  # see retrieval.device.resolve_device
    precision: str | None = None  # None: the DB's (fp32 for a new DB); fp32 | bf16 | fp16 | int8 | auto (see choose)
    engine: str | None = None  # None: the DB's (torch for a new DB); torch | onnxruntime
    calibration: str = "minmax"  # int8: retrieval.encoder.quantize.CALIBRATION_METHODS
    ann: str = "auto"  # see indexer.store.ann.choose_factory
    reembed: bool = False  # build a new generation even with the live generation's encoder
    switch: bool = True  # make a newly built generation live at the end (False: build it for a later --activate)
    keep: int = 1  # previous generations kept after a switch (for an instant rollback)
    check_disk: bool = True  # refuse to build a generation the free disk cannot hold
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
    generation: int = 1  # the generation this run wrote (see indexer.store.generations)
    live_generation: int = 1  # the live generation after the run

    def to_json(self) -> dict:
        """The `index --json` object (gate only when a candidate was gated or fell back)."""
        out = {**asdict(self), "db": str(self.db), "folder": str(self.folder)}
        if self.gate is None:
            del out["gate"]
        return out


def run_index(cfg: IndexConfig, *, progress: bool = False) -> IndexSummary:
    """Bring the DB at cfg.db_dir level with cfg.folder and return what the run did.

    With the live generation's encoder (or into a new DB) the live generation is updated in place. With another
    encoder, or cfg.reembed, a new generation is built beside the live one (or the one being built is resumed),
    brought level by a last incremental pass, and switched to (unless cfg.switch is False); see
    indexer.store.generations. With cfg.strict, raises DecodeError if any file failed.
    """
    if cfg.batch_size < 1 or (cfg.workers or 0) < 0 or cfg.max_file_mb <= 0 or (cfg.max_remove or 0) < 0:
        raise ValueError("batch_size must be >= 1, workers >= 0, max_file_mb > 0 and max_remove >= 0")
    if cfg.keep < 0:
        raise ValueError("keep must be >= 0")
    started = time.perf_counter()
    folder = Path(cfg.folder).expanduser().resolve()
    with generations.changing(cfg.db_dir) as gens:
        live = gens.pointer.live
        gen, encoder = _target(gens, cfg, folder)
        path = generations.generation_dir(cfg.db_dir, gen)
        first = _run_in(path, cfg, folder, encoder, gen, progress)
        if gen != live:  # the last incremental pass: files added during a long build are in before the switch
            last = _run_in(path, cfg, folder, encoder, gen, progress)
            first = _after(first, last)
            gens.mark_built(gen)
            if cfg.switch:
                gens.activate(gen)
                gens.prune(cfg.keep)
        summary = replace(first, live_generation=gens.pointer.live, seconds=round(time.perf_counter() - started, 3))
    if cfg.strict and summary.failures:
        first_failure = summary.failures[0]
        raise DecodeError(first_failure.path, f"{first_failure.reason} ({len(summary.failures)} file(s) could not "
                                              f"be indexed; --strict)")
    return summary


def _target(gens: generations.Generations, cfg: IndexConfig, folder: Path) -> tuple[int, Encoder | None]:
    """(the generation this run writes, the encoder if it had to be loaded to decide): the live one, unless it
    holds items of another encoder (or cfg.reembed); then a generation for cfg.model being built (resumed), a
    non-live one of the same encoder (brought level: a fast roll forward), or a new one (disk checked first)."""
    pointer = gens.pointer
    live_header, live_items, live_bytes = _peek(cfg.db_dir, pointer.live)
    if live_header is not None:
        _require_same_root(cfg.db_dir, live_header, folder, cfg.root_changed)
    if live_header is None or not live_items:
        return pointer.live, None  # a new or empty DB simply takes the encoder
    if not cfg.allow_empty:
        _refuse_to_empty(cfg.db_dir, live_items, folder)
    if not cfg.reembed and _same_encoder_cheap(cfg, live_header.encoder):
        return pointer.live, None
    encoder = _load_encoder(cfg, None)   # a new generation takes the model's own eval resize and tta, or cfg's
    info = EncoderInfo.of(encoder)
    if not cfg.reembed:
        if info.fingerprint == live_header.encoder.fingerprint:
            return pointer.live, encoder
        kept = _load_encoder(cfg, live_header.encoder)   # the same model with the transform the live DB records
        if kept.fingerprint() == live_header.encoder.fingerprint:
            return pointer.live, kept
    for gen in reversed(generations.on_disk(cfg.db_dir)):
        header, _, held_bytes = _peek(cfg.db_dir, gen)
        building = pointer.state(gen) == "building"
        if gen != pointer.live and (building or not cfg.reembed) and (
                header is None and building or header is not None and header.encoder.fingerprint == info.fingerprint):
            if building and cfg.check_disk:
                _check_disk(cfg.db_dir, gen, generations.estimate_bytes(live_items, live_bytes, live_header.encoder.dim,
                                                                       info.dim) - held_bytes)
            return gen, encoder
    if cfg.check_disk:
        _check_disk(cfg.db_dir, pointer.next,
                    generations.estimate_bytes(live_items, live_bytes, live_header.encoder.dim, info.dim))
    return gens.create()[0], encoder


def _peek(db_dir: Path, gen: int) -> tuple[Header | None, int, int]:
    """(header, items, LMDB bytes in use) of a generation; (None, 0, 0) when it does not exist yet."""
    if not generations.exists(db_dir, gen):
        return None, 0, 0
    with Store.open(generations.generation_dir(db_dir, gen)) as store, store.snapshot() as snap:
        return snap.header, snap.count(), store.disk_bytes()


def _check_disk(db_dir: Path, gen: int, needed: int) -> None:
    free = shutil.disk_usage(db_dir).free
    if needed > free:
        raise IndexStoreError(f"generation {gen} needs about {needed / 2**30:.2f} GiB more on disk and {db_dir} has "
                              f"{free / 2**30:.2f} GiB free: free some (python cli.py generations --db {db_dir} "
                              f"--drop ID drops an old generation) or pass --no-disk-check")


def _after(first: IndexSummary, last: IndexSummary) -> IndexSummary:
    """One summary of a build's two passes: the work of both, the state after the last."""
    return replace(last, indexed=first.indexed + last.indexed, unchanged=first.unchanged,
                   removed=first.removed + last.removed, encoded=first.encoded + last.encoded,
                   reused=first.reused + last.reused, new_failures=first.new_failures + last.new_failures,
                   precision=first.precision or last.precision, images_per_s=first.images_per_s,
                   timings={k: round(first.timings.get(k, 0) + v, 3) for k, v in last.timings.items()},
                   engine=first.engine or last.engine, gate=first.gate or last.gate,
                   ann=first.ann if last.ann.action == "unchanged" else last.ann)


def _run_in(path: Path, cfg: IndexConfig, folder: Path, encoder: Encoder | None, gen: int,
            progress: bool) -> IndexSummary:
    """One incremental pass over `folder` into the generation at `path` (today's whole `index` run)."""
    started = time.perf_counter()
    with Store.open(path, readonly=False) as store:
        header, encoder, plan, timings = _bind_and_plan(store, cfg, folder, encoder, generations.first_item_id(gen))
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
    return IndexSummary(
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
        unreachable=[printable(p) for p in plan.unreachable], unreachable_kept=plan.unreachable_kept,
        generation=gen)


def _refuse_to_empty(db_dir: Path, held: int, folder: Path) -> None:
    """A folder with no files at all while the DB holds items is far more often an unmounted drive or a
    wrong path than a real deletion of everything: stop before removing a single item (or building a new
    generation). The scan stops at the first image file, or failure, it finds."""
    if any(not isinstance(entry, Unreachable) for entry in scan_stream(folder)):
        return
    raise IndexStoreError(f"{folder} has no image files, but {db_dir} holds {held}: refusing to remove "
                          f"them all (an unmounted drive or a wrong path?); pass --allow-empty to empty the DB")


def _require_same_root(db_dir: Path, header: Header, folder: Path, root_changed: bool) -> None:
    """A DB is bound to the folder it indexes: pointed at another one, every item would look deleted."""
    if header.root == str(folder) or root_changed:
        return
    raise IndexStoreError(f"{db_dir} indexes {header.root}, not {folder}: pass --root-changed if the "
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


def _bind_and_plan(store: Store, cfg: IndexConfig, folder: Path, encoder: Encoder | None,
                   first_id: int) -> tuple[Header, Encoder | None, Plan, dict[str, float]]:
    """Bind the DB to the encoder (loading it only if needed and not given) and plan the work: (header, encoder
    or None, plan, {"scan_s": seconds of the scan and plan}).

    A new DB binds before planning (its items numbered from `first_id`); otherwise the plan comes first, and an
    unchanged folder indexed with the same encoder never loads it.
    """
    header = store.header()
    if header is None:
        encoder = encoder or _load_encoder(cfg, None)
        header = store.begin_run(EncoderInfo.of(encoder), str(folder), first_id=first_id)
        return (header, encoder, *_plan(store, folder, cfg))
    plan, timings = _plan(store, folder, cfg)
    try:
        _limit_removals(store, cfg, plan)
        if encoder is None and (plan.todo or not _same_encoder_cheap(cfg, header.encoder)):
            encoder = _load_encoder(cfg, header.encoder)
        header = store.begin_run(_same_engine(EncoderInfo.of(encoder), header.encoder) if encoder else header.encoder,
                                 str(folder))
    except BaseException:
        plan.close()
        raise
    return header, encoder, plan, timings


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
    if ray and (cfg.precision in ("int8", "auto") or header.encoder.precision == "int8" or cfg.engine not in (None,
                                                                                                          "torch")):
        raise IndexStoreError("--ray encodes with torch (fp32, bf16, fp16): int8, --precision auto and the "
                              "onnxruntime and openvino engines run locally")
    choice = choose(store, folder, plan.todo, encoder, header.encoder, precision=cfg.precision,
                    engine="torch" if ray else cfg.engine, device=str(device), calibration=cfg.calibration)
    if choice.info != header.encoder:
        store.begin_run(choice.info, str(folder))
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


def _load_encoder(cfg: IndexConfig, stored: EncoderInfo | None) -> Encoder:
    """cfg.model with cfg's eval resize and tta; what cfg leaves open is the `stored` DB's (when it is not re-embedded),
    so a DB keeps the transform it was built with, else the model's own."""
    from retrieval.device import resolve_device
    from retrieval.encoder import load_encoder

    resize = stored_eval_resize(stored) if stored is not None else {}
    given = {"crop_pct": cfg.crop_pct, "resize_mode": cfg.resize_mode, "tta": cfg.tta}
    resize.update({key: value for key, value in given.items() if value is not None})
    return load_encoder(cfg.model, device=resolve_device(cfg.device), **resize)


def _same_engine(info: EncoderInfo, stored: EncoderInfo) -> EncoderInfo:
    """`info` with the stored engine, precision and graph when it is the stored encoder (its vectors' record)."""
    if info.fingerprint != stored.fingerprint:
        return info
    return replace(info, engine=stored.engine, precision=stored.precision, graph=stored.graph)


def _same_encoder_cheap(cfg: IndexConfig, stored: EncoderInfo) -> bool:
    """Whether cfg names the stored encoder, without loading it: no eval resize or tta given, and a run directory's
    recorded fingerprint, else the same spec string. (A False is settled by loading the encoder; a checkpoint
    file changed in place is caught by the next run that encodes, before it writes anything.)"""
    if cfg.crop_pct is not None or cfg.resize_mode is not None or cfg.tta is not None:
        return False
    spec = cfg.model
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
