"""The encoding stage of `index`: read + hash + decode in worker processes, encode, commit in a thread.

DataLoader workers read each file once, hash its bytes (blake2b-128) and decode it (JPEG draft() straight to
the encoder's resize size), then apply the encoder's eval transform up to uint8 pixels (see split_transform);
the main process scales and normalises the batch and encodes batch n under
`inference_mode` while the workers prepare batch n+1.. and a writer thread commits batch n-1 to LMDB (one
transaction per batch). Content already in the DB (same hash) reuses its stored embedding instead of being
encoded. Only this module imports torch, so a run with nothing to encode never pays for it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from retrieval.data.decode import decode_image
from retrieval.encoder import Encoder
from retrieval.errors import DecodeError, EncoderError, IndexStoreError

from .layout import Failure, NewItem
from .scan import FileEntry
from .store import Store

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
MIN_COSINE = 0.999  # reduced precision is kept only if every first-batch embedding is this close to fp32


@dataclass
class EncodeCounts:
    encoded: int = 0
    reused: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass
class _Loaded:
    """What a worker returns for one file: a tensor, or the reason it could not make one."""

    index: int
    tensor: torch.Tensor | None = None
    content_hash: bytes = b""
    size: int = -1
    mtime_ns: int = -1
    width: int = 0
    height: int = 0
    error: str | None = None


class _Files(torch.utils.data.Dataset):
    """Reads, hashes and decodes the files to index; a bad file becomes an error string, never an exception."""

    def __init__(self, root: Path, entries: Sequence[FileEntry], transform: Callable, draft_size: int,
                 max_pixels: int):
        self.root = root
        self.relpaths = [e.relpath for e in entries]
        self.transform = transform
        self.draft_size = draft_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> _Loaded:
        rel = self.relpaths[i]
        try:
            with open(self.root / rel, "rb") as f:
                st = os.fstat(f.fileno())  # the stat of the bytes actually read
                data = f.read()
        except OSError as exc:
            return _Loaded(i, error=f"cannot read file: {exc.strerror or exc}")
        out = _Loaded(i, content_hash=hashlib.blake2b(data, digest_size=16).digest(), size=st.st_size,
                      mtime_ns=st.st_mtime_ns)
        try:
            decoded = decode_image(data, name=rel, draft_size=self.draft_size, max_pixels=self.max_pixels)
        except DecodeError as exc:
            out.error = exc.reason
            return out
        out.tensor = self.transform(decoded.image)
        out.width, out.height = decoded.width, decoded.height
        return out


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


def _collate(batch: list[_Loaded]) -> tuple[list[_Loaded], torch.Tensor | None]:
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
    """Preprocessed images -> embeddings: the batch part of the eval transform, then the encoder at the
    requested precision in channels-last memory format (about 1.5x faster for EfficientNet on a CPU, same
    embeddings to 1e-6). Reduced precision is checked against fp32 on the first batch and dropped if any
    embedding is further than MIN_COSINE from it."""

    def __init__(self, encoder: Encoder, device: str | torch.device, precision: str, *, verify: bool = True):
        """Batches passed in must be made of `self.transform(image)` tensors (uint8 for the usual transforms,
        see split_transform). verify=False skips the first-batch comparison (to measure reduced precision)."""
        device = torch.device(device)
        _require_precision(precision, device)
        self.device = device
        self.transform, self._finish = split_transform(encoder.eval_transform())
        self.draft_size = encoder.config.resize_size  # decode JPEGs straight to (at least) this shorter side
        self.precision = precision
        self.min_cosine: float | None = None
        self._encoder = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
        self._fp32: Encoder | None = None
        if precision != "fp32":
            self._fp32 = self._encoder if verify else None
            self._encoder = copy.deepcopy(self._encoder).to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        images = self._finish(images.to(self.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        out = self._encoder(images)
        if self._fp32 is not None:
            reference = self._fp32(images)
            self.min_cosine = float((out * reference).sum(dim=1).min())
            if self.min_cosine < MIN_COSINE:
                log.warning("--precision %s: min cosine to fp32 %.5f < %s on the first batch; using fp32",
                            self.precision, self.min_cosine, MIN_COSINE)
                self._encoder, self.precision, out = self._fp32, "fp32", reference
            self._fp32 = None
        return out.float().cpu().numpy()


def encode_files(store: Store, root: Path, todo: list[FileEntry], embedder: Embedder, *, batch_size: int,
                 workers: int, max_pixels: int, checkpoint: Callable[[], object], checkpoint_seconds: float,
                 progress: bool) -> EncodeCounts:
    """Read, decode, encode and commit every file of `todo`; `checkpoint()` runs every checkpoint_seconds
    with everything so far committed."""
    from tqdm import tqdm

    counts = EncodeCounts()
    dataset = _Files(root, todo, embedder.transform, embedder.draft_size, max_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        prefetch_factor=2 if workers else None, pin_memory=embedder.device.type == "cuda")
    batches = iter(loader)  # workers fork here, before the writer thread exists
    writer = _Writer(store)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    last_checkpoint = time.monotonic()
    try:
        for loaded, stacked in batches:
            writer.put(*_embed_batch(store, todo, loaded, stacked, embedder, counts))
            bar.set_postfix(encoded=counts.encoded, reused=counts.reused, failed=len(counts.failures), refresh=False)
            bar.update(len(loaded))
            if time.monotonic() - last_checkpoint > checkpoint_seconds:
                writer.flush()
                checkpoint()
                last_checkpoint = time.monotonic()
    except (RuntimeError, OSError, EOFError) as exc:
        _raise_if_a_worker_died(getattr(batches, "_workers", []), counts, exc)
        raise
    finally:
        bar.close()
        writer.close()
    return counts


def _raise_if_a_worker_died(workers: list, counts: EncodeCounts, exc: BaseException) -> None:
    """Turn a dead decode worker (killed for memory, say) into a one-line error that says what is kept and
    what to do; the batches committed so far stay, and a re-run continues from them.

    A dead worker surfaces as whatever the main process was doing (torch's SIGCHLD handler raising anywhere,
    a reset connection or EOF while receiving a batch), so the workers' exit codes decide."""
    dead = _dead_workers(workers)
    if dead:
        how = ", ".join(f"pid {w.pid} exit code {w.exitcode}" for w in dead)
        done = counts.encoded + counts.reused
        raise IndexStoreError(f"a decode worker died ({how}); the {done} images encoded so far are kept: run the "
                              "same command again to continue (if it was killed for memory: fewer --workers or a "
                              "smaller --batch-size)") from exc


def _dead_workers(workers: list) -> list:
    """The worker processes that have exited with an error, waiting a moment for one killed just now."""
    for w in workers:
        for _ in range(2):
            try:
                w.join(timeout=2)
                break
            except RuntimeError:   # torch's SIGCHLD handler reports the death inside the wait as well
                continue
    return [w for w in workers if w.exitcode not in (None, 0)]


def _embed_batch(store: Store, todo: list[FileEntry], loaded: list[_Loaded], stacked: torch.Tensor | None,
                 embedder: Embedder, counts: EncodeCounts) -> tuple[list[NewItem], list[Failure]]:
    """Items for one batch: the embedding reused by content hash where the DB has it, else encoded."""
    good = [x for x in loaded if x.error is None]
    failures = [Failure(todo[x.index].relpath, x.error, todo[x.index].size, todo[x.index].mtime_ns,
                        todo[x.index].ctime_ns)  # the scan's stat: an unchanged bad file is not retried
                for x in loaded if x.error is not None]
    counts.failures.extend(failures)
    with store.snapshot() as snap:
        known = snap.find_hashes({x.content_hash for x in good})
        reused = dict(zip(known, snap.vectors(list(known.values())), strict=True)) if known else {}
    fresh = [i for i, x in enumerate(good) if x.content_hash not in reused]
    # stacked holds the images that decoded (None when none did, and then nothing is fresh either)
    vectors = dict(zip(fresh, embedder(stacked[fresh]), strict=True)) if fresh and stacked is not None else {}
    counts.encoded += len(fresh)
    counts.reused += len(good) - len(fresh)
    items = []
    for i, x in enumerate(good):
        entry = todo[x.index]
        embedding = vectors[i] if i in vectors else reused[x.content_hash]
        items.append(NewItem(entry.relpath, entry.label, x.size, x.mtime_ns, x.width, x.height, x.content_hash,
                             embedding))
    return items, failures


def _require_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise EncoderError("--precision fp16 is for GPUs (--device cuda); on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise EncoderError("--precision bf16 needs a CPU with AVX512-BF16 or AMX (this one has neither): use fp32")
