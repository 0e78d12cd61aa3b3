"""The encoding stage of `index`: read + hash + decode in worker processes, encode, commit in a thread.

DataLoader workers read each file once, hash its bytes (blake2b-128) and decode it (JPEG draft() straight to
the encoder's resize size), then apply the encoder's eval transform up to uint8 pixels (see split_transform);
the main process scales and normalises the batch and encodes batch n under
`inference_mode` while the workers prepare batch n+1.. and a writer thread commits batch n-1 to LMDB (one
transaction per batch). Content already in the DB (same hash) reuses its stored embedding instead of being
encoded. Only this module imports torch, so a run with nothing to encode never pays for it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from indexer.store.layout import Failure, NewItem, limits_key
from indexer.store.lmdb_store import Store
from retrieval.compat import cpu_has_bf16, loader_workers, shutdown_loader
from retrieval.data.decode import decode_image
from retrieval.encoder import Encoder
from retrieval.encoder.engine import Runner, TorchRunner
from retrieval.errors import DecodeError, EncoderError, IndexStoreError

from .scan import TRANSIENT_ERRNOS, FileEntry

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")  # what torch runs; int8 is onnxruntime's
DEFAULT_MAX_FILE_MB = 256  # --max-file-mb: a file is read whole into memory, so larger ones are refused


@dataclass
class EncodeCounts:
    encoded: int = 0
    reused: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass
class Loaded:
    """What a worker returns for one file: a tensor, or the reason it could not make one."""

    index: int
    tensor: torch.Tensor | None = None
    content_hash: bytes = b""
    size: int = -1
    mtime_ns: int = -1
    width: int = 0
    height: int = 0
    error: str | None = None
    transient: bool = False  # the error is not the file's (I/O error, out of memory): retry it next run
    capped: bool = False  # the error is a cap's (pixels, file size): retry it when the caps change


CRASHED = "decoder crashed"  # the reason recorded for a file whose decode worker died on it


class ImageFiles(torch.utils.data.Dataset):
    """Reads, hashes and decodes the files to index; a bad file becomes an error string, never an exception.

    Every per-file step (read, decode, EXIF, convert, resize, crop, to-tensor) runs inside one guard, so no
    single file can stop a run; the files a decoder crashes on are found by encode_files instead.
    """

    def __init__(self, root: Path, entries: Sequence[FileEntry], transform: Callable, draft_size: int,
                 max_pixels: int, max_file_bytes: int = DEFAULT_MAX_FILE_MB << 20):
        """`entries` are what an int index reads; encode_files passes none and hands out (number, relpath)
        keys one batch at a time, so that no worker holds a copy of every file to encode."""
        self.root = root
        self.relpaths = [e.relpath for e in entries]
        self.transform = transform
        self.draft_size = draft_size
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.limits = limits_key(max_pixels, max_file_bytes)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, key: int | tuple[int, str]) -> Loaded:
        i, rel = (key, self.relpaths[key]) if isinstance(key, int) else key
        try:
            return self._load(i, rel)
        except MemoryError:
            return Loaded(i, error="out of memory while decoding", transient=True)
        except Exception as exc:  # noqa: BLE001 - the per-file guard: any failure is this file's failure
            return Loaded(i, error=f"cannot preprocess: {type(exc).__name__}: {exc}")

    def _load(self, i: int, rel: str) -> Loaded:
        try:
            data, st = read_file(self.root / rel, self.max_file_bytes)
        except OSError as exc:
            return Loaded(i, error=f"cannot read file: {exc.strerror or exc}", transient=exc.errno in TRANSIENT_ERRNOS)
        if data is None:
            return Loaded(i, size=st.st_size, mtime_ns=st.st_mtime_ns, capped=True,
                           error=f"file too large ({max(st.st_size, self.max_file_bytes + 1) / 2**20:,.1f} MiB; "
                                 f"the cap is --max-file-mb {self.max_file_bytes / 2**20:.3g})")
        out = Loaded(i, content_hash=hashlib.blake2b(data, digest_size=16).digest(), size=st.st_size,
                      mtime_ns=st.st_mtime_ns)
        try:
            decoded = decode_image(data, name=rel, draft_size=self.draft_size, max_pixels=self.max_pixels)
        except DecodeError as exc:
            out.error = exc.reason
            out.transient = isinstance(exc.__cause__, MemoryError)
            out.capped = exc.reason.startswith("too many pixels")
            return out
        del data
        short, long = sorted(decoded.image.size)
        resized = self.draft_size * math.ceil(long * self.draft_size / max(short, 1))
        if resized > self.max_pixels:  # a 1 x 80,000,000 strip would become a gigantic tensor
            out.capped = True
            out.error = (f"extreme aspect ratio ({decoded.width}x{decoded.height}): resized to {self.draft_size} "
                         f"px on its short side it would have {resized:,} pixels (cap max_pixels={self.max_pixels:,})")
            return out
        out.tensor = self.transform(decoded.image)
        out.width, out.height = decoded.width, decoded.height
        return out


def read_file(path: Path, max_bytes: int) -> tuple[bytes | None, os.stat_result]:
    """(the file's bytes, or None if it holds more than max_bytes; the stat of what was read)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())  # the stat of the bytes actually read
        if st.st_size > max_bytes:
            return None, st
        data = f.read(max_bytes + 1)
    return (None if len(data) > max_bytes else data), st


def split_transform(transform: Callable) -> tuple[Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """(per-image part for the workers, per-batch part for the encoding process) of an eval transform.

    When the transform ends with ToTensor + Normalize, workers stop at uint8 pixels (a quarter of the bytes
    to pass on, and less worker CPU), and the batch is scaled and normalised where it is encoded, by the same
    float32 operations in the same order, so values are identical. Any other transform runs whole in workers.
    """
    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return transform, lambda batch: batch
    mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(steps[-1].std, dtype=torch.float32).view(-1, 1, 1)

    def finish(batch: torch.Tensor) -> torch.Tensor:
        return batch.float().div(255).sub(mean.to(batch.device)).div(std.to(batch.device))

    return T.Compose([*steps[:-2], T.PILToTensor()]), finish


def _collate(batch: list[Loaded]) -> tuple[list[Loaded], torch.Tensor | None]:
    """Stack the good tensors (into shared memory, in the worker); records travel without them."""
    tensors = [x.tensor for x in batch if x.tensor is not None]
    for x in batch:
        x.tensor = None
    return batch, torch.utils.data.default_collate(tensors) if tensors else None


class _Writer:
    """A thread committing batches to the store, so that LMDB writes overlap encoding."""

    def __init__(self, store: Store, depth: int = 2):
        self._store = store
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def put(self, items: list[NewItem], failures: list[Failure]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put((items, failures), timeout=0.5)
                return
            except queue.Full:
                continue

    def flush(self) -> None:
        """Wait until every batch handed over so far is committed."""
        while self._queue.unfinished_tasks and self._thread.is_alive():
            time.sleep(0.01)
        self._raise_if_failed()

    def close(self) -> None:
        """Commit what is queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._store.commit_batch(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self._error = exc
            finally:
                self._queue.task_done()


class Embedder:
    """Preprocessed images -> embeddings: the batch part of the eval transform, then a runner
    (retrieval.encoder.engine: torch at fp32/bf16/fp16 by default, or the one given, e.g. ONNX Runtime). Whether a
    reduced precision keeps the rankings is decided before encoding (indexer.build.choose), not per batch."""

    def __init__(self, encoder: Encoder, device: str | torch.device, precision: str = "fp32", *,
                 runner: Runner | None = None):
        """Batches passed in must be made of `self.transform(image)` tensors (uint8 for the usual transforms,
        see split_transform). `runner` (what it runs: runner.spec) replaces the torch one of `precision`."""
        device = torch.device(device)
        if runner is None:
            require_precision(precision, device)
            runner = TorchRunner(encoder, precision)
        self.device = device
        self.transform, self._finish = split_transform(encoder.eval_transform())
        self.draft_size = encoder.config.resize_size  # decode JPEGs straight to (at least) this shorter side
        self.runner = runner
        self.precision = runner.spec.precision

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.runner(self.finish(images))

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """The batch part of the eval transform: what the runner takes."""
        with torch.inference_mode():
            return self._finish(images.to(self.device, non_blocking=True))


def encode_files(store: Store, root: Path, todo: Iterable[FileEntry], embedder: Embedder, *, batch_size: int,
                 workers: int, max_pixels: int, checkpoint: Callable[[], object], checkpoint_seconds: float,
                 progress: bool, max_file_bytes: int = DEFAULT_MAX_FILE_MB << 20,
                 total: int | None = None) -> EncodeCounts:
    """Read, decode, encode and commit every file of `todo` (`total` of them, for the progress bar);
    `checkpoint()` runs every checkpoint_seconds with everything so far committed.

    `todo` is consumed as the decoders need it: this process holds only the files handed out and not yet
    committed (a few batches per worker), and the workers receive them one batch at a time.
    When a decode worker dies (a decoder crash, the OOM killer), the files that were in flight are decoded
    again one by one in fresh worker processes: a file that kills its worker again is recorded as
    "decoder crashed" (not retried while unchanged), the others are indexed, and the run goes on. Only
    several files crashing in a row (the machine, not the files) stop the run. With workers=0 the files are
    decoded in this process, which no decoder crash survives.
    """
    dataset = ImageFiles(root, (), embedder.transform, embedder.draft_size, max_pixels, max_file_bytes)
    handout = _Handout(todo, batch_size)
    committer = Committer(store, total=total, limits=dataset.limits, checkpoint=checkpoint,
                          checkpoint_seconds=checkpoint_seconds, progress=progress)

    def take(loaded: list[Loaded], stacked: torch.Tensor | None) -> None:
        committer.take(handout.in_flight, loaded, functools.partial(_encode_rows, embedder, stacked))
        handout.done(loaded)

    try:
        while not handout.exhausted:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=handout, num_workers=workers, collate_fn=_collate,
                prefetch_factor=_PREFETCH if workers else None, pin_memory=embedder.device.type == "cuda",
                worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers else None)
            committer.flush()  # fork while the writer thread is idle (it holds no lock then)
            batches = iter(loader)  # workers fork here (the first time, before the writer thread exists)
            try:
                for loaded, stacked in batches:
                    take(loaded, stacked)
            except (RuntimeError, OSError, EOFError) as exc:
                dead = _dead_workers(loader_workers(batches))
                if not dead:
                    raise
                shutdown_loader(batches)
                log.warning("a decode worker died (%s); decoding the files in flight one by one",
                            ", ".join(f"pid {w.pid} exit code {w.exitcode}" for w in dead))
                committer.flush()  # fork while the writer thread is idle
                suspects = [(i, entry.relpath) for i, entry in sorted(handout.in_flight.items())]
                for loaded, stacked in _isolated_batches(dataset, suspects, batch_size, committer.counts, exc):
                    take(loaded, stacked)
    finally:
        committer.close()
    return committer.counts


class _Handout:
    """The DataLoader's batch sampler: numbers the files of `todo` and hands them out `batch_size` at a time
    as (number, relpath) keys, taken from `todo` only when the loader asks for the next batch; `in_flight`
    holds the files handed out and not yet committed (what a dead worker's files are recovered from)."""

    def __init__(self, todo: Iterable[FileEntry], batch_size: int):
        self._todo = enumerate(todo)
        self._batch_size = batch_size
        self.in_flight: dict[int, FileEntry] = {}
        self.exhausted = False

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        """Batches of keys until `todo` runs out (a new loader after a crash goes on where this one stopped)."""
        while True:
            batch = list(itertools.islice(self._todo, self._batch_size))
            if not batch:
                self.exhausted = True
                return
            self.in_flight.update(batch)
            yield [(i, entry.relpath) for i, entry in batch]

    def done(self, loaded: list[Loaded]) -> None:
        for x in loaded:
            del self.in_flight[x.index]


_PREFETCH = 2  # batches each decode worker prepares ahead
_MAX_CRASHES_IN_A_ROW = 3  # more files than this crashing their worker in a row: the machine, not the files


def _isolated_batches(dataset: ImageFiles, keys: list[tuple[int, str]], batch_size: int, counts: EncodeCounts,
                      cause: BaseException) -> Iterator[tuple[list[Loaded], torch.Tensor | None]]:
    """Decode the files of `keys` ((number, relpath), see _Handout) in fresh worker processes, one after
    another, and yield them in batches; a file whose worker dies while decoding it comes back as a CRASHED
    failure."""
    pending = list(keys)
    batch: list[Loaded] = []
    in_a_row = 0
    while pending:
        got, died = _decode_in_fresh_worker(dataset, pending)
        batch += got
        pending = pending[len(got):]
        in_a_row = 0 if got else in_a_row
        if died is not None:
            in_a_row += 1
            if in_a_row > _MAX_CRASHES_IN_A_ROW:
                done = counts.encoded + counts.reused
                raise IndexStoreError(
                    f"decode workers keep dying ({died}) on different files; the {done} images encoded so far "
                    "are kept: run the same command again to continue (if they are killed for memory: fewer "
                    "--workers or a smaller --batch-size)") from cause
            log.warning("%s: %s (%s); recorded, not retried until the file changes",
                        pending[0][1], CRASHED, died)
            batch.append(Loaded(pending.pop(0)[0], error=f"{CRASHED} ({died})"))
        while len(batch) >= batch_size or (batch and not pending):
            yield _collate(batch[:batch_size])
            batch = batch[batch_size:]


def _decode_in_fresh_worker(dataset: ImageFiles, keys: list[tuple[int, str]]) -> tuple[list[Loaded], str | None]:
    """Decode the files of `keys` in order in one new process until done or it dies: (what it sent, how it
    died or None).

    Results travel through a pipe in order, so everything before the file it died on has arrived."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_decode_worker, args=(dataset, keys, send, os.getpid()), daemon=True)
    proc.start()
    send.close()
    got: list[Loaded] = []
    try:
        while len(got) < len(keys):
            got.append(pickle.loads(receive.recv_bytes()))
    except EOFError:
        pass
    finally:
        receive.close()
        proc.join()
    if len(got) == len(keys):
        return got, None
    code = proc.exitcode or 0
    return got, (f"killed by signal {-code}" if code < 0 else f"exit code {code}")


def _decode_worker(dataset: ImageFiles, keys: list[tuple[int, str]], send: Connection, parent: int) -> None:
    _die_with_parent(parent)
    for key in keys:
        send.send_bytes(pickle.dumps(dataset[key]))
    send.close()


def _die_with_parent(parent: int, _worker_id: int = 0) -> None:
    """In a decode worker: be killed when the indexing process dies (Linux PR_SET_PDEATHSIG), so that a
    killed run leaves no orphan decoding on; exit at once if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's own watchdog ends orphans within seconds
        pass
    if os.getppid() != parent:
        os._exit(0)


def _dead_workers(workers: list, wait: float = 2.0) -> list:
    """The worker processes that have exited with an error, waiting a moment for one killed just now."""
    deadline = time.monotonic() + wait
    while True:
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            return dead
        try:
            time.sleep(0.05)
        except RuntimeError:  # torch's SIGCHLD handler reports the death here as well
            continue


class Committer:
    """The commit end of both encode paths (encode_files here, indexer.build.ray_encode on Ray): each batch's items
    come from _embed_batch (content reused by hash, failures recorded) and go to the writer thread, the
    progress bar moves, and `checkpoint()` runs every checkpoint_seconds once everything so far is committed.
    The writer thread and the bar start with the first batch: encode_files' decode workers fork before it."""

    def __init__(self, store: Store, *, total: int | None, limits: str, checkpoint: Callable[[], object],
                 checkpoint_seconds: float, progress: bool):
        self.counts = EncodeCounts()
        self._store, self._total, self._limits, self._progress = store, total, limits, progress
        self._checkpoint, self._checkpoint_seconds = checkpoint, checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._writer: _Writer | None = None
        self._bar: Any = None

    def take(self, todo: Sequence[FileEntry] | Mapping[int, FileEntry], loaded: list[Loaded],
             encode: Callable[[list[int]], Iterable[np.ndarray | None]]) -> list[Loaded]:
        """Commit one batch (`loaded[i].index` indexes `todo`; `encode` as in _embed_batch); returns the
        files left out because `encode` had no embedding for them."""
        from tqdm import tqdm

        if self._writer is None:
            self._writer = _Writer(self._store)
            self._bar = tqdm(total=self._total, unit="img", disable=not self._progress, smoothing=0.1,
                             dynamic_ncols=True)
        items, failures, missing = _embed_batch(self._store, todo, loaded, encode, self.counts, self._limits)
        self._writer.put(items, failures)
        self._bar.set_postfix(encoded=self.counts.encoded, reused=self.counts.reused,
                              failed=len(self.counts.failures), refresh=False)
        self._bar.update(len(loaded) - len(missing))
        if time.monotonic() - self._last_checkpoint > self._checkpoint_seconds:
            self.flush()
            self._checkpoint()
            self._last_checkpoint = time.monotonic()
        return missing

    def flush(self) -> None:
        """Wait until every batch taken so far is committed."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Commit what is queued and stop the writer thread (raising its error if it had one)."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _encode_rows(embedder: Embedder, stacked: torch.Tensor | None, rows: list[int]) -> np.ndarray:
    """The local path's `encode` for _embed_batch: embeddings of the batch's decoded images at `rows`."""
    assert stacked is not None  # rows are asked for only when some image of the batch decoded
    return embedder(stacked[rows])


def _embed_batch(store: Store, todo: Sequence[FileEntry] | Mapping[int, FileEntry], loaded: list[Loaded],
                 encode: Callable[[list[int]], Iterable[np.ndarray | None]], counts: EncodeCounts,
                 limits: str) -> tuple[list[NewItem], list[Failure], list[Loaded]]:
    """(items, failures, missing) for one batch: an embedding is reused by content hash where the DB has it,
    else taken from `encode(rows)` (rows: positions among the batch's decoded files). A None from `encode`
    (on Ray: the actor skipped content the DB held when it looked, which is gone by now) leaves that file out
    of the items; it comes back in `missing`, to be encoded again. `todo[x.index]` is the file of a loaded `x`:
    a window's list on the Ray path, the files in flight on the local one."""
    good = [x for x in loaded if x.error is None]
    failures = [Failure(todo[x.index].relpath, x.error, todo[x.index].size, todo[x.index].mtime_ns,
                        todo[x.index].ctime_ns, x.transient,  # the scan's stat: an unchanged bad file is not retried
                        limits if x.capped else "")
                for x in loaded if x.error is not None]
    counts.failures.extend(failures)
    with store.snapshot() as snap:
        known = snap.find_hashes({x.content_hash for x in good})
        reused = dict(zip(known, snap.vectors(list(known.values())), strict=True)) if known else {}
    fresh = [i for i, x in enumerate(good) if x.content_hash not in reused]
    vectors = dict(zip(fresh, encode(fresh), strict=True)) if fresh else {}
    missing = [good[i] for i in fresh if vectors[i] is None]
    counts.encoded += len(fresh) - len(missing)
    counts.reused += len(good) - len(fresh)
    items = []
    for i, x in enumerate(good):
        embedding = vectors[i] if i in vectors else reused[x.content_hash]
        if embedding is not None:
            entry = todo[x.index]
            items.append(NewItem(entry.relpath, entry.label, x.size, x.mtime_ns, x.width, x.height, x.content_hash,
                                 embedding))
    return items, failures, missing


def require_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise EncoderError(f"torch runs precision fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise EncoderError("--precision fp16 is for GPUs (--device cuda); on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise EncoderError("--precision bf16 needs a CPU with AVX512-BF16 or AMX (this one has neither): use fp32")
