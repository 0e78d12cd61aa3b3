"""The encoding stage of `index --ray`: the same files, decoding and commits as indexer.encode, on Ray Data.

The driver plans exactly as a local run does and hands only the files to encode to a Ray Dataset:
  read + hash + decode   CPU tasks running the indexer's own `_Files` (so a bad file gets the same reason);
  encode                 `map_batches` over an actor pool: the encoder is shipped once and built once per
                         actor in `__init__`, one GPU per actor when the cluster has GPUs, the CPU otherwise;
  commit                 the driver consumes the results with `iter_batches` and commits them through
                         the local path's `_embed_batch` and writer thread: the same store calls, failure
                         ledger (with transient and capped failures) and content-hash reuse.
LMDB stays the single writer and the source of truth: a killed Ray worker is retried by Ray (a batch it was
encoding is done again; the store replaces by path, so an image is never stored twice), and a killed driver
is resumed from LMDB by the next run, which plans only what is not committed yet.

Content reuse happens at commit: a file whose content the DB already holds keeps the stored embedding, as on
the local path, but the actor has encoded it anyway (workers cannot see the DB, which lives with the driver).
The files, and the DB's folder, are read by path: every node must see them at the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.encoder import Encoder
from retrieval.errors import IndexStoreError

from .encode import Embedder, EncodeCounts, _embed_batch, _Files, _Loaded, _Writer
from .layout import limits_key
from .scan import FileEntry
from .store import Store

log = logging.getLogger(__name__)

_BATCHES_PER_BLOCK = 2  # batches of files per input block: Ray streams and spreads work block by block
_CPU_THREADS = 4  # torch threads per encode actor on a CPU-only cluster (fewer when the cluster is smaller)
_DECODE_CPUS = 0.5  # CPUs a decode task reserves: decoding a photo costs about 1/10 of encoding it on a CPU


@dataclass
class Precision:
    """The precision the actors encoded at: the requested one unless an actor fell back to fp32 (each actor
    checks its own first batch against fp32, as the local Embedder does), and the lowest cosine they saw."""

    name: str
    min_cosine: float | None = None

    def note(self, name: str, min_cosine: float) -> None:
        if name == "fp32":
            self.name = "fp32"
        if not np.isnan(min_cosine):
            self.min_cosine = min_cosine if self.min_cosine is None else min(self.min_cosine, min_cosine)


@dataclass(frozen=True)
class RayPlan:
    """How the encode stage is spread over the cluster (see plan_actors)."""

    actors: int  # size of the encode actor pool
    gpus_per_actor: int  # 1 on a cluster with GPUs, else 0
    threads_per_actor: int  # torch threads of a CPU actor (0: leave torch's default, for GPU actors)
    decode_tasks: int  # decode tasks at a time: the CPUs the actors' threads leave (at least 1)


def plan_actors(cluster: dict[str, float], actors: int | None = None) -> RayPlan:
    """One actor per GPU when the cluster has GPUs; otherwise one CPU actor per _CPU_THREADS CPUs, each
    reserving one CPU for Ray's scheduler (the others are left to the decode tasks, which need far less: about
    3 CPU-ms per photo against 34 to encode it on a CPU) but running _CPU_THREADS torch threads. Decode tasks
    run at most as many at a time as there are CPUs the actors do not keep busy (on a CPU-only cluster at least
    1/8 of the CPUs), so they do not take the encoder's cores (on 2 CPUs: one decode task beside one 2-thread
    actor, as the local path's one worker)."""
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus:
        n = actors or gpus
        return RayPlan(n, 1, 0, max(1, cpus - n))
    n = actors or max(1, cpus // _CPU_THREADS)
    threads = max(1, min(_CPU_THREADS, cpus // n))
    return RayPlan(n, 0, threads, max(1, cpus - n * threads, cpus // 8))  # decoding: ~1/10 of encoding's CPU


def encode_files_ray(store: Store, root: Path, todo: list[FileEntry], encoder: Encoder, *, precision: str,
                     batch_size: int, max_pixels: int, max_file_bytes: int, address: str | None,
                     actors: int | None, checkpoint: Callable[[], object], checkpoint_seconds: float,
                     progress: bool) -> tuple[EncodeCounts, Precision]:
    """Encode and commit every file of `todo` on Ray (`address`: None starts a local Ray unless this process
    already joined one; "auto" joins the cluster of `ray start`). Returns the counts and the precision the
    actors encoded at."""
    ray = _import_ray()
    counts, used = EncodeCounts(), Precision(precision)
    embedder = Embedder(encoder, "cpu", "fp32")  # for its transform and sizes; encoding happens in the actors
    # Ray prints its cluster's messages (a worker died, ...) on stdout: keep them off `index --json`'s output
    with contextlib.redirect_stdout(sys.stderr):
        started = _connect(ray, address)
        try:
            plan = plan_actors(ray.cluster_resources(), actors)
            log.info("ray: %s, %s", plan, ray.cluster_resources())
            dataset = _dataset(ray, root, todo, encoder, embedder, precision, batch_size, max_pixels, max_file_bytes,
                               plan)
            _commit(store, todo, _results(dataset, batch_size, used), counts, limits_key(max_pixels, max_file_bytes),
                    checkpoint, checkpoint_seconds, progress)
        except ray.exceptions.RayError as exc:
            done = counts.encoded + counts.reused
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IndexStoreError(f"the Ray encode stage failed ({first}); the {done} images committed so far "
                                  "are kept: run the same command again to continue") from exc
        finally:
            if started:
                ray.shutdown()
    return counts, used


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
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise IndexStoreError(f"cannot join Ray at {address!r}: {str(exc).splitlines()[0]} (start one with "
                              "`ray start --head`, or leave out --ray-address for a local Ray)") from None
    return True


def _dataset(ray: Any, root: Path, todo: list[FileEntry], encoder: Encoder, embedder: Embedder, precision: str,
             batch_size: int, max_pixels: int, max_file_bytes: int, plan: RayPlan) -> Any:
    """files -> (CPU tasks) decoded pixels -> (actor pool) embeddings, as a lazy Ray Dataset."""
    import pyarrow as pa  # type: ignore[import-untyped]  # (comes with ray[data])

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's per-run INFO lines on stderr
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    probe = embedder.transform(_blank(encoder.image_size))  # shape and dtype of one decoded image
    rows = batch_size * _BATCHES_PER_BLOCK  # a larger block is decoded by one task and streams out all at once
    blocks = [pa.table({"index": np.arange(start, min(start + rows, len(todo)), dtype=np.int64),
                        "relpath": [e.relpath for e in todo[start:start + rows]]})
              for start in range(0, len(todo), rows)]
    decoded = ray.data.from_arrow(blocks).map_batches(
        _decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=_DECODE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks),
        fn_kwargs={"root": str(root), "transform": embedder.transform, "draft_size": embedder.draft_size,
                   "max_pixels": max_pixels, "max_file_bytes": max_file_bytes,
                   "shape": tuple(probe.shape), "dtype": str(probe.numpy().dtype)})
    return decoded.map_batches(
        _EncodeActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor, num_cpus=1,
        # the local path's OpenMP policy (pipeline.prefer_passive_openmp): idle threads sleep, beside decode tasks
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
        fn_constructor_kwargs={"encoder": encoder, "precision": precision, "threads": plan.threads_per_actor})


def _blank(size: int) -> Image.Image:
    return Image.new("RGB", (size, size))


def _decode_batch(batch: dict[str, np.ndarray], *, root: str, transform: Callable, draft_size: int, max_pixels: int,
                  max_file_bytes: int, shape: tuple[int, ...], dtype: str) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files with the local path's `_Files` (in a Ray CPU task)."""
    rels = [str(r) for r in batch["relpath"]]
    files = _Files(Path(root), [FileEntry(rel, -1, -1, -1) for rel in rels], transform, draft_size, max_pixels,
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
    """One member of the encode actor pool: the encoder built once, on this actor's GPU if it has one."""

    def __init__(self, encoder: Encoder, precision: str, threads: int):
        if threads:
            torch.set_num_threads(threads)
        import ray

        self.dim = encoder.embed_dim
        self.embedder = Embedder(encoder, "cuda" if ray.get_gpu_ids() else "cpu", precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["error"] == ""
        pixels = batch.pop("pixels")
        batch["embedding"] = np.zeros((len(good), self.dim), dtype=np.float32)
        if good.any():
            batch["embedding"][good] = self.embedder(torch.from_numpy(pixels[good]))
        batch["precision"] = np.array([self.embedder.precision] * len(good), dtype=object)
        batch["min_cosine"] = np.full(len(good), np.nan if self.embedder.min_cosine is None
                                      else self.embedder.min_cosine, dtype=np.float64)
        return batch


def _results(dataset: Any, batch_size: int, used: Precision) -> Iterator[tuple[list[_Loaded], torch.Tensor]]:
    """The actors' output as (loaded files, embeddings of the good ones) batches for commit_batches; notes
    in `used` the precision the actors encoded at."""
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        loaded = []
        for index, digest, (size, mtime_ns, width, height, transient, capped), error in zip(
                batch["index"], batch["hash"], batch["stats"], batch["error"], strict=True):
            loaded.append(_Loaded(int(index), None, b"" if error else digest.tobytes(), int(size), int(mtime_ns),
                                  int(width), int(height), error or None, bool(transient), bool(capped)))
        for precision, cosine in zip(batch["precision"], batch["min_cosine"], strict=True):
            used.note(str(precision), float(cosine))
        good = batch["error"] == ""
        yield loaded, torch.from_numpy(batch["embedding"][good])


def _commit(store: Store, todo: list[FileEntry], batches: Iterator[tuple[list[_Loaded], torch.Tensor]],
            counts: EncodeCounts, limits: str, checkpoint: Callable[[], object], checkpoint_seconds: float,
            progress: bool) -> None:
    """Commit the actors' batches as encode_files commits the local path's: the same _embed_batch (content
    reuse, failures) handed to the same writer thread, FAISS brought level every checkpoint_seconds."""
    from tqdm import tqdm

    writer = _Writer(store)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    last_checkpoint = time.monotonic()
    try:
        for loaded, embeddings in batches:
            writer.put(*_embed_batch(store, todo, loaded, embeddings, _as_array, counts, limits))
            bar.update(len(loaded))
            if time.monotonic() - last_checkpoint > checkpoint_seconds:
                writer.flush()
                checkpoint()
                last_checkpoint = time.monotonic()
    finally:
        bar.close()
        writer.close()


def _as_array(embeddings: torch.Tensor) -> np.ndarray:
    """The "encoder" of the driver: its rows were encoded by the actors already."""
    return embeddings.numpy()
