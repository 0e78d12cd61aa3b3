"""The encoding stage of `index --ray`: the same files, decoding and commits as indexer.build.encode, on Ray Data.

The driver plans exactly as a local run does and hands the files to encode to Ray Data in windows of at most
RayPlan.window_files files (one Dataset each, so the driver and the object store hold one window's paths,
however many files the run has):
  read + hash + decode   CPU tasks running the indexer's own `ImageFiles` (so a bad file gets the same reason),
                         one block of `batch_size` files each, shipping uint8 pixels;
  encode                 `map_batches` over an actor pool: the encoder is shipped once and built once per
                         actor in `__init__`, one GPU per actor when the cluster has GPUs, the CPU otherwise.
                         Content the DB already holds is not encoded: the actor asks a `_HeldContent` actor
                         (on the driver's node, reading the LMDB read-only) which of its hashes are stored;
  commit                 the driver consumes the results with `iter_batches` and commits them through the
                         local path's `Committer`: the same store calls, failure ledger (with transient and
                         capped failures), content-hash reuse and checkpoints.
LMDB stays the single writer and the source of truth: a killed Ray worker is retried by Ray (a batch it was
encoding is done again; the store replaces by path, so an image is never stored twice), and a killed driver
is resumed from LMDB by the next run, which plans only what is not committed yet. A file whose content the
actor found stored but the commit did not (the only item holding it was replaced in between) is encoded in a
last pass that does not skip. The files, and the DB's folder, are read by path: the files must be seen by
every node at the same path, the DB only by the driver's node.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.store.layout import limits_key
from indexer.store.lmdb_store import Store
from retrieval.allocator import KEEP_FREED_TUNABLES
from retrieval.compat import ray_init_private
from retrieval.data.decode import allow_pixels
from retrieval.encoder import Encoder
from retrieval.errors import IndexStoreError

from .encode import Committer, Embedder, EncodeCounts, ImageFiles, Loaded
from .scan import FileEntry

log = logging.getLogger(__name__)

_CPU_THREADS = 4  # torch threads per encode actor on a CPU-only cluster (fewer when the cluster is smaller)
_DECODE_CPUS = 0.5  # CPUs a decode task reserves: decoding a photo costs about 1/10 of encoding it on a CPU
_WINDOW_BATCHES = 512  # batches per actor in one window (a new window starts the actor pool again) ...
_MIN_WINDOW = 1 << 16  # ... but at least this many files (on 2 CPUs ~15 minutes of lite0, against ~10 s)
_MAX_WINDOW = 1 << 20  # ... and at most this many (~0.1 GB of paths in the object store, ~0.3 GB of entries)
# Ray runs its workers at nice 15 (worker_niceness), below the driver and anything else on the machine: beside
# other busy processes at nice 0 (on a shared node, two trainings on 2 cores) the decode tasks and the encode
# actors got ~3% of a core, an actor took ~4 minutes to start and `index --ray` looked hung. A Ray this process
# starts runs its workers at the driver's priority, as the local path's worker processes do.
RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


@dataclass
class ActorReport:
    """What the actors did: the precision they encoded at (the one the driver chose, see indexer.build.choose)
    and how many images they ran through the encoder."""

    precision: str
    encoded: int = 0


@dataclass(frozen=True)
class RayPlan:
    """How the encode stage is spread over the cluster (see plan_actors)."""

    actors: int  # size of the encode actor pool
    gpus_per_actor: int  # 1 on a cluster with GPUs, else 0
    threads_per_actor: int  # torch threads of a CPU actor (0: leave torch's default, for GPU actors)
    decode_tasks: int  # decode tasks at a time: the CPUs the actors' threads leave (at least 1)
    window_files: int  # files handed to one Dataset


def plan_actors(cluster: dict[str, float], batch_size: int, actors: int | None = None) -> RayPlan:
    """One actor per GPU when the cluster has GPUs; otherwise one CPU actor per _CPU_THREADS CPUs, each
    reserving one CPU for Ray's scheduler (the others are left to the decode tasks, which need far less: about
    3 CPU-ms per photo against 34 to encode it on a CPU) but running _CPU_THREADS torch threads. Decode tasks
    run at most as many at a time as there are CPUs the actors do not keep busy (on a CPU-only cluster at least
    1/8 of the CPUs), so they do not take the encoder's cores (on 2 CPUs: one decode task beside one 2-thread
    actor, as the local path's one worker). A window holds _WINDOW_BATCHES batches per actor, within
    [_MIN_WINDOW, _MAX_WINDOW] files: each window starts the actor pool again (~10 s on 2 CPUs)."""
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus:
        n = actors or gpus
        threads, decode = 0, max(1, cpus - n)
    else:
        n = actors or max(1, cpus // _CPU_THREADS)
        threads = max(1, min(_CPU_THREADS, cpus // n))
        decode = max(1, cpus - n * threads, cpus // 8)  # decoding: ~1/10 of encoding's CPU
    window = min(_MAX_WINDOW, max(_MIN_WINDOW, n * batch_size * _WINDOW_BATCHES))
    return RayPlan(n, 1 if gpus else 0, threads, decode, window)


def encode_files_ray(store: Store, root: Path, todo: Iterable[FileEntry], encoder: Encoder, *, precision: str,
                     batch_size: int, max_pixels: int, max_file_bytes: int, address: str | None,
                     actors: int | None, checkpoint: Callable[[], object], checkpoint_seconds: float,
                     progress: bool, window_files: int | None = None) -> tuple[EncodeCounts, ActorReport]:
    """Encode and commit every file of `todo` on Ray (`address`: None starts a local Ray unless this process
    already joined one; "auto" joins the cluster of `ray start`), `todo` read one window at a time
    (window_files: RayPlan's unless given). Returns the counts and what the actors did."""
    ray = _import_ray()
    report = ActorReport(precision)
    embedder = Embedder(encoder, "cpu", "fp32")  # for its transform and sizes; encoding happens in the actors
    committer = Committer(store, total=len(todo) if isinstance(todo, Sized) else None,
                          limits=limits_key(max_pixels, max_file_bytes), checkpoint=checkpoint,
                          checkpoint_seconds=checkpoint_seconds, progress=progress)
    # Ray prints its cluster's messages (a worker died, ...) on stdout: keep them off `index --json`'s output
    with contextlib.redirect_stdout(sys.stderr):
        started = _connect(ray, address)
        held = None
        try:
            plan = plan_actors(ray.cluster_resources(), batch_size, actors)
            log.info("ray: %s, %s", plan, ray.cluster_resources())
            held = _held_content(ray, store.db_dir)

            def encode(files: Iterable[FileEntry], skip_held: bool) -> list[FileEntry]:
                """Encode and commit `files` window by window; returns the files left out (see _embed_batch)."""
                left: list[FileEntry] = []
                for window in _windows(files, window_files or plan.window_files):
                    dataset = _dataset(ray, root, window, encoder, embedder, precision, batch_size, max_pixels,
                                       max_file_bytes, plan, held if skip_held else None)
                    for loaded, rows in _results(dataset, report):
                        left += [window[x.index] for x in committer.take(window, loaded, rows)]
                return left

            left = encode(todo, skip_held=True)
            if left:
                log.info("ray: %d files skipped as stored were not found at commit (their content was replaced "
                         "meanwhile): encoding them", len(left))
                encode(left, skip_held=False)
        except ray.exceptions.RayError as exc:
            done = committer.counts.encoded + committer.counts.reused
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IndexStoreError(f"the Ray encode stage failed ({first}); the {done} images committed so far "
                                  "are kept: run the same command again to continue") from exc
        finally:
            committer.close()
            if held is not None:   # the encode actors hold its handle too, so it would outlive the run
                ray.kill(held)
            if started:
                ray.shutdown()
    return committer.counts, report


def _windows(files: Iterable[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    """`files` in lists of `size` (the last one shorter), read from the iterable as they are needed."""
    it = iter(files)
    while window := list(itertools.islice(it, size)):
        yield window


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise IndexStoreError('--ray needs Ray Data: pip install -e ".[ray]" (on every node of the cluster)') from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join (or start) Ray; True when this call started it (then the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        kwargs.update(include_dashboard=False, **ray_init_private(RAY_SYSTEM_CONFIG))
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise IndexStoreError(f"cannot join Ray at {address!r}: {str(exc).splitlines()[0]} (start one with "
                              "`ray start --head`, or leave out --ray-address for a local Ray)") from None
    return True


class _HeldContent:
    """Tells the encode actors which content hashes the DB holds (a Ray actor on the driver's node: the DB
    lives on the driver's disk; LMDB lets it read while the driver writes, each call in a fresh snapshot)."""

    def __init__(self, db_dir: str):
        self.store = Store.open(db_dir)

    def held(self, hashes: list[bytes]) -> list[bool]:
        with self.store.snapshot() as snap:
            found = snap.find_hashes(hashes)
        return [h in found for h in hashes]


def _held_content(ray: Any, db_dir: Path) -> Any:
    """A _HeldContent actor pinned to this (the driver's) node; it holds no state, so Ray restarts it and
    retries its calls if its process dies."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    held = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1)(_HeldContent)
    return held.remote(str(Path(db_dir).resolve()))


def _dataset(ray: Any, root: Path, todo: list[FileEntry], encoder: Encoder, embedder: Embedder, precision: str,
             batch_size: int, max_pixels: int, max_file_bytes: int, plan: RayPlan, held: Any) -> Any:
    """files -> (CPU tasks) decoded pixels -> (actor pool) embeddings, as a lazy Ray Dataset; `held`: the
    _HeldContent actor whose stored content the actors skip, or None to encode every file."""
    import pyarrow as pa

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's per-run INFO lines on stderr
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    probe = embedder.transform(_blank(encoder.image_size))  # shape and dtype of one decoded image
    blocks = [pa.table({"index": np.arange(start, min(start + batch_size, len(todo)), dtype=np.int64),
                        "relpath": [e.relpath for e in todo[start:start + batch_size]]})
              for start in range(0, len(todo), batch_size)]  # one batch a block: decoded and encoded whole
    decoded = ray.data.from_arrow(blocks).map_batches(
        _decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=_DECODE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks),
        fn_kwargs={"root": str(root), "transform": embedder.transform, "draft_size": embedder.draft_size,
                   "max_pixels": max_pixels, "max_file_bytes": max_file_bytes,
                   "shape": tuple(probe.shape), "dtype": str(probe.numpy().dtype)})
    return decoded.map_batches(
        _EncodeActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor, num_cpus=1, runtime_env={"env_vars": _actor_env(plan.threads_per_actor)},
        fn_constructor_kwargs={"encoder": encoder, "precision": precision, "threads": plan.threads_per_actor,
                               "held": held})


def _actor_env(threads: int) -> dict[str, str]:
    """Environment of the encode actors' processes. Ray calls a map actor's batches on a thread of its own:
    - its OpenMP team takes its size from OMP_NUM_THREADS, which Ray sets to the actor's num_cpus (1), and
      torch.set_num_threads in __init__ (another thread) does not reach it: a CPU actor encoded on one core;
    - glibc gives that thread an arena of its own, whose heaps are trimmed as blocks are freed (and blocks
      over its 64 MB heaps, or over the mmap threshold, are mapped and unmapped each time): every batch's
      activations were faulted in again (measured with lite0 at batch 16: ~5,000 minor faults and 9 of 25
      CPU-ms per image in the kernel; docs/scaling.md). One arena, no mmap and no trimming
      (retrieval.allocator.keep_freed_memory's settings, as glibc tunables so they hold from the process's
      start) make one batch's freed memory the next's.
    Also the local path's OpenMP wait policy (pipeline.prefer_passive_openmp): idle threads sleep, beside the
    decode tasks. A wait policy or glibc tunables set in the driver's environment are passed on instead."""
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", f"glibc.malloc.arena_max=1:{KEEP_FREED_TUNABLES}")}
    return {**env, "OMP_NUM_THREADS": str(threads)} if threads else env


def _blank(size: int) -> Image.Image:
    return Image.new("RGB", (size, size))


def _decode_batch(batch: dict[str, np.ndarray], *, root: str, transform: Callable, draft_size: int, max_pixels: int,
                  max_file_bytes: int, shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files with the local path's `ImageFiles` (in a Ray CPU task)."""
    allow_pixels(max_pixels)   # this Ray worker process is an entry point of its own
    rels = [str(r) for r in batch["relpath"]]
    files = ImageFiles(Path(root), [FileEntry(rel, -1, -1, -1) for rel in rels], transform, draft_size, max_pixels,
                   max_file_bytes)
    n = len(rels)
    pixels = np.zeros((n, *shape), dtype=dtype)
    hashes = np.zeros((n, 16), dtype=np.uint8)
    stats = np.full((n, 6), -1, dtype=np.int64)  # size, mtime_ns, width, height, transient, capped
    errors = []
    for i in range(n):
        x = files[i]
        if x.tensor is not None:
            pixels[i] = x.tensor.numpy()
        if x.content_hash:
            hashes[i] = np.frombuffer(x.content_hash, dtype=np.uint8)
        stats[i] = (x.size, x.mtime_ns, x.width, x.height, x.transient, x.capped)
        errors.append(x.error or "")
    return {"index": batch["index"], "pixels": pixels, "hash": hashes, "stats": stats,
            "error": np.array(errors, dtype=object)}


class _EncodeActor:
    """One member of the encode actor pool: the encoder built once, on this actor's GPU if it has one. Rows
    whose content `held` (a _HeldContent actor, or None) says the DB holds are not encoded ("encoded" False)."""

    def __init__(self, encoder: Encoder, precision: str, threads: int, held: Any):
        if threads:
            torch.set_num_threads(threads)
        import ray

        self.dim = encoder.embed_dim
        self.embedder = Embedder(encoder, "cuda" if ray.get_gpu_ids() else "cpu", precision)
        self.held = held

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        encode = batch["error"] == ""
        if self.held is not None and encode.any():
            encode[encode] = ~np.array(ray.get(self.held.held.remote([h.tobytes() for h in batch["hash"][encode]])),
                                       dtype=bool)
        pixels = batch.pop("pixels")
        batch["embedding"] = np.zeros((len(encode), self.dim), dtype=np.float32)
        if encode.any():
            batch["embedding"][encode] = self.embedder(torch.from_numpy(pixels[encode]))
        batch["encoded"] = encode
        return batch


_Rows = Callable[[list[int]], list[np.ndarray | None]]  # Committer.take's `encode`


def _results(dataset: Any, report: ActorReport) -> Iterator[tuple[list[Loaded], _Rows]]:
    """The actors' output, block by block, as (loaded files, their embeddings for Committer.take: None for a
    file the actor did not encode); notes in `report` what the actors did."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        loaded = []
        for index, digest, (size, mtime_ns, width, height, transient, capped), error in zip(
                batch["index"], batch["hash"], batch["stats"], batch["error"], strict=True):
            loaded.append(Loaded(int(index), None, b"" if error else digest.tobytes(), int(size), int(mtime_ns),
                                  int(width), int(height), error or None, bool(transient), bool(capped)))
        report.encoded += int(batch["encoded"].sum())
        good = batch["error"] == ""
        embeddings, encoded = batch["embedding"][good], batch["encoded"][good]
        yield loaded, functools.partial(_encoded_rows, embeddings, encoded)


def _encoded_rows(embeddings: np.ndarray, encoded: np.ndarray, rows: list[int]) -> list[np.ndarray | None]:
    return [embeddings[r] if encoded[r] else None for r in rows]
