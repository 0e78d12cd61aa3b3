"""What `serve` computes, without the HTTP layer: the DB's encoder and a refreshed SearchIndex behind one
micro-batching worker thread (indexer.serve.batcher), so neither is ever used from two threads at once.

    engine = Engine(ServeConfig(db=Path("db")))
    answer = engine.batcher.submit(Query(engine.transform(image), k=10)).result()  # uploads, batched
    found = engine.batcher.call(lambda: engine.similar(item_id, 10)).result()
    engine.close()

Fresh data: the worker renews the index snapshot every `refresh_s` (SearchIndex.refresh), so an `index` run's
commits are answered within about that time and the service never pins old LMDB pages for long.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.store.layout import Item
from indexer.store.read import Hit, embed_tensors, hits_of, load_db_encoder, load_db_runner
from indexer.store.search import SearchIndex
from retrieval.data.decode import DEFAULT_MAX_PIXELS

from .batcher import MicroBatcher

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

MAX_K = 1000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    db: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # see retrieval.device.resolve_device
    k: int = 10  # results when a request does not say
    max_upload_bytes: int = 20 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS  # the indexer's own cap on width * height
    cors: str | None = None  # one allowed origin; None: no CORS headers at all
    max_batch: int = 32  # images per encoder batch; 1 turns micro-batching off
    batch_window_ms: float = 5.0  # how long the first waiting upload waits for others to join its batch
    queue_size: int = 64  # waiting requests beyond this get 503 + Retry-After
    refresh_s: float = 1.0  # how often the index snapshot is renewed
    thumb_px: int = 160  # longest side of a thumbnail
    thumb_cache: int = 4096  # thumbnails kept in memory (ids never change content, so they never go stale)
    drain_s: int = 30  # on SIGTERM, how long requests in flight may take to finish
    api_key: str | None = field(default=None, repr=False)  # required as a Bearer token on /api/* and /metrics
    no_auth: bool = False  # the user's explicit choice to serve a non-loopback host without a key
    show_paths: bool = False  # absolute file paths and encoder run directories in answers (else relative / names)
    precision: str | None = None  # None: as the DB's vectors were made (see store.read.load_db_runner)
    engine: str | None = None


@dataclass(frozen=True)
class Query:
    pixels: torch.Tensor  # the decoded upload after the encoder's eval transform (a CHW tensor), made off the worker
    k: int
    labels: tuple[str, ...] = ()  # only items with one of these labels (none: every item)


@dataclass(frozen=True)
class Status:
    """What the worker serves now, readable from any thread (replaced whole on each change)."""

    items: int
    generation: int
    lagging: bool  # FAISS is behind LMDB
    encoder_name: str  # public_spec of the DB's encoder
    fingerprint: str


@dataclass(frozen=True)
class Answer:
    hits: tuple[Hit, ...]
    embed_ms: float
    search_ms: float
    batch: int  # uploads embedded in the same encoder batch


class Engine:
    """The index and its encoder; every method but `close` runs on the batcher's worker thread."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.index = SearchIndex.open(cfg.db)
        try:
            self.encoder = load_db_encoder(self.index, device=cfg.device)
            self.runner = load_db_runner(self.index, self.encoder, precision=cfg.precision, engine=cfg.engine)
        except BaseException:
            self.index.close()
            raise
        self.fingerprint = self.index.header.encoder.fingerprint  # checked by load_db_encoder
        self.transform = self.encoder.eval_transform()
        self.device = str(next(self.encoder.parameters()).device)
        self._stats: dict | None = None
        self.on_batch: Callable[[int], None] | None = None  # told each encoder batch's size (serve's metrics)
        self.status = self._status()
        self.batcher = MicroBatcher(self.run_batch, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000,
                                    queue_size=cfg.queue_size, tick_s=cfg.refresh_s, on_tick=self.refresh,
                                    name="serve-worker")

    @property
    def draft_size(self) -> int:
        """JPEG draft size of the indexer's decoding (so an indexed image uploaded finds itself)."""
        return self.encoder.config.resize_size

    def run_batch(self, queries: Sequence[Query]) -> list[Answer]:
        """Embed the uploads in one forward and search them in one call."""
        start = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(queries))
        embeddings = embed_tensors(self.encoder, [q.pixels for q in queries], self.runner)
        embedded = time.perf_counter()
        groups: dict[tuple[str, ...], list[int]] = {}  # one search per label filter
        for row, q in enumerate(queries):
            groups.setdefault(q.labels, []).append(row)
        hits: dict[int, tuple[Hit, ...]] = {}
        for labels, rows in groups.items():
            scores, ids = self.index.search(embeddings[rows], max(queries[r].k for r in rows), only=self._only(labels))
            for r, s, i in zip(rows, scores, ids, strict=True):
                hits[r] = hits_of(self.index, s[: queries[r].k], i[: queries[r].k])
        done = time.perf_counter()
        embed_ms, search_ms = 1000 * (embedded - start), 1000 * (done - embedded)
        return [Answer(hits[r], embed_ms, search_ms, len(queries)) for r in range(len(queries))]

    def _only(self, labels: tuple[str, ...]) -> np.ndarray | None:
        return self.index.ids_with_labels(labels) if labels else None

    def item(self, item_id: int) -> Item | None:
        return self.index.items([item_id])[0]

    def file_of(self, item: Item) -> Path:
        """The indexed file of an item: the DB's root joined with its stored path (never a client's path)."""
        return self.index.root / item.relpath

    def similar(self, item_id: int, k: int, labels: tuple[str, ...] = ()) -> tuple[Item, tuple[Hit, ...], float] | None:
        """(item, its k nearest other items (with one of `labels`, if any), search ms) from the stored embedding;
        None for an unknown id."""
        item = self.item(item_id)
        if item is None:
            return None
        start = time.perf_counter()
        scores, ids = self.index.search(self.index.vectors([item_id]), k + 1, only=self._only(labels))
        keep = ids[0] != item_id
        hits = hits_of(self.index, scores[0][keep][:k], ids[0][keep][:k])
        return item, hits, 1000 * (time.perf_counter() - start)

    def stats(self) -> dict:
        """Counts, labels, encoder, FAISS kind and lag, computed once per DB generation."""
        if self._stats is None:
            from indexer.store import ann

            header = self.index.header
            labels = self.index.label_counts()
            meta = ann.read_meta(self.index.store.db_dir)
            self._stats = {
                "items": len(self.index),
                "labels": [{"label": label, "count": n} for label, n in sorted(labels.items())],
                "encoder": {"spec": public_spec(header.encoder.spec, self.cfg.show_paths),
                            "fingerprint": header.encoder.fingerprint, "dim": header.encoder.dim,
                            "image_size": header.encoder.image_size, "engine": str(self.runner.spec)},
                "ann": None if meta is None else {"kind": meta.kind, "factory": meta.factory},
                "generation": header.generation,
                "faiss_lags": self.index.lagging,
                "device": self.device,
            }
        return self._stats

    def refresh(self) -> None:
        """Renew the snapshot; on a change drop cached stats, and reload the encoder if the DB changed it."""
        if not self.index.refresh():
            return
        self._stats = None
        if self.index.header.encoder.fingerprint != self.fingerprint:
            log.warning("the DB was re-embedded with %s: loading it", self.index.header.encoder.spec)
            self.encoder = load_db_encoder(self.index, device=self.device)
            self.runner = load_db_runner(self.index, self.encoder, precision=self.cfg.precision, engine=self.cfg.engine)
            self.transform = self.encoder.eval_transform()
            self.fingerprint = self.index.header.encoder.fingerprint
        self.status = self._status()

    def _status(self) -> Status:
        encoder = self.index.header.encoder
        return Status(len(self.index), self.index.generation, self.index.lagging,
                      public_spec(encoder.spec, self.cfg.show_paths), encoder.fingerprint)

    def close(self) -> None:
        self.batcher.close()
        self.index.close()


def public_spec(spec: str, show_paths: bool) -> str:
    """An encoder spec as a client may see it: a run directory by its name only (unless show_paths)."""
    return spec if show_paths or not Path(spec).is_absolute() else Path(spec).name


def thumbnail_jpeg(path: Path, side: int, max_pixels: int) -> bytes:
    """A JPEG of the image at `path` with its longest side at most `side`, decoded as the indexer decodes.

    DecodeError if the file is gone or no longer decodes."""
    from retrieval.data.decode import load_image

    image = load_image(path, draft_size=side, max_pixels=max_pixels).image
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()

