"""What `serve` computes, without the HTTP layer: the DB's encoder and a refreshed SearchIndex behind one
micro-batching worker thread (indexer.serve.batcher), so neither is ever used from two threads at once.

    engine = Engine(ServeConfig(db=Path("db")))
    answer = engine.batcher.submit(Query(engine.transform(image), k=10)).result()  # uploads, batched
    found = engine.batcher.call(lambda: engine.similar(item_id, 10)).result()
    engine.close()

Fresh data: the worker renews the index snapshot every `refresh_s` (SearchIndex.refresh), so an `index` run's
commits are answered within about that time and the service never pins old LMDB pages for long.

A switch of the DB's live generation (indexer.store.generations): the worker notices the pointer at a tick,
a loader thread opens the new generation and loads its encoder off the request path, and a later tick swaps
index and encoder together between two batches. A batch is thus embedded and searched by one generation, and
every answer names it (generation id + fingerprint). An upload preprocessed for the old encoder and answered
after the swap is preprocessed again from its decoded image. The old index is closed at the swap; its encoder
is freed with the last reference (no request can hold one: they all run on the worker).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.store.expand import Expansion, expanded_search
from indexer.store.generations import read_pointer
from indexer.store.layout import Item
from indexer.store.read import Hit, embed_tensors, hits_of, load_db_encoder, load_db_runner
from indexer.store.search import SearchIndex
from retrieval.data.decode import DEFAULT_MAX_PIXELS

from .batcher import Busy, MicroBatcher

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from retrieval.encoder import Encoder
    from retrieval.encoder.engine import Runner

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
    max_batch: int = 8  # images per encoder batch (larger ones were slower per image on 2 cores); 1: no batching
    batch_window_ms: float = 5.0  # how long the first waiting upload waits for others to join its batch
    queue_size: int = 64  # uploads in the server (and jobs waiting for the worker) beyond this get 503 + Retry-After
    max_wait_ms: float = 5000.0  # a request still waiting this long after it arrived gets 503, is not computed
    decode_threads: int | None = None  # uploads decoded at once; None: the CPUs this process may use
    refresh_s: float = 1.0  # how often the index snapshot is renewed
    thumb_px: int = 160  # longest side of a thumbnail
    thumb_cache: int = 4096  # thumbnails kept in memory (ids never change content, so they never go stale)
    drain_s: int = 30  # on SIGTERM, how long requests in flight may take to finish
    api_key: str | None = field(default=None, repr=False)  # required as a Bearer token on /api/* and /metrics
    no_auth: bool = False  # the user's explicit choice to serve a non-loopback host without a key
    show_paths: bool = False  # absolute file paths and encoder run directories in answers (else relative / names)
    tta: str | None = None  # test-time augmentation of queries; None: the DB's own (another one is refused)
    precision: str | None = None  # None: as the DB's vectors were made (see store.read.load_db_runner)
    engine: str | None = None


@dataclass(frozen=True)
class Query:
    pixels: torch.Tensor  # the decoded upload after the encoder's eval transform (a CHW tensor), made off the worker
    k: int
    labels: tuple[str, ...] = ()  # only items with one of these labels (none: every item)
    expand: int = 0  # query expansion with this many top hits (indexer.store.expand); 0: off
    fingerprint: str = ""  # the encoder whose transform made `pixels`
    image: Image.Image | None = None  # the decoded upload: preprocessed again if another encoder answers it


@dataclass(frozen=True)
class ServedBy:
    """The index generation that answered, and its encoder's fingerprint."""

    generation: int
    fingerprint: str


@dataclass(frozen=True)
class Status:
    """What the worker serves now, readable from any thread (replaced whole on each change)."""

    items: int
    generation: int
    lagging: bool  # FAISS is behind LMDB
    encoder_name: str  # public_spec of the DB's encoder
    fingerprint: str
    index_generation: int = 1  # the index generation served (indexer.store.generations)


@dataclass(frozen=True)
class Answer:
    hits: tuple[Hit, ...]
    embed_ms: float
    search_ms: float
    batch: int  # uploads embedded in the same encoder batch
    served_by: ServedBy


class Engine:
    """The index and its encoder; every method but `close` runs on the batcher's worker thread."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.index = SearchIndex.open(cfg.db)
        try:
            self.encoder = load_db_encoder(self.index, device=cfg.device, tta=cfg.tta)
            self.runner = load_db_runner(self.index, self.encoder, precision=cfg.precision, engine=cfg.engine)
        except BaseException:
            self.index.close()
            raise
        self.fingerprint = self.index.header.encoder.fingerprint  # checked by load_db_encoder
        self.transform = self.encoder.eval_transform()
        self.device = str(next(self.encoder.parameters()).device)
        self._front = (self.transform, self.fingerprint, self.encoder.config.resize_size)  # what uploads are made for
        self._next: Future[tuple[SearchIndex, Encoder, Runner]] | None = None  # a generation loading, off requests
        self._stats: dict | None = None
        self.on_batch: Callable[[int], None] | None = None  # told each encoder batch's size (serve's metrics)
        self.status = self._status()
        self.batcher = MicroBatcher(self.run_batch, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000,
                                    queue_size=cfg.queue_size, tick_s=cfg.refresh_s, on_tick=self.refresh,
                                    name="serve-worker")

    def make_query(self, data: bytes, name: str, k: int, labels: tuple[str, ...], max_pixels: int,
                   expand: int = 0) -> Query:
        """Decode an upload as the indexer does and preprocess it for the encoder served now (any thread)."""
        from retrieval.data.decode import decode_image

        transform, fingerprint, draft_size = self._front  # one read: a swap replaces the three together
        image = decode_image(data, name=name, draft_size=draft_size, max_pixels=max_pixels).image
        return Query(transform(image), k, labels, expand, fingerprint, image)

    def run_batch(self, queries: Sequence[Query]) -> list[Answer]:
        """Embed the uploads in one forward and search them in one call per label filter and expansion."""
        start = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(queries))
        pixels = [q.pixels if q.fingerprint in ("", self.fingerprint) or q.image is None else self.transform(q.image)
                  for q in queries]
        embeddings = embed_tensors(self.encoder, pixels, self.runner)
        embedded = time.perf_counter()
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}  # one search per label filter and expansion
        for row, q in enumerate(queries):
            groups.setdefault((q.labels, q.expand), []).append(row)
        hits: dict[int, tuple[Hit, ...]] = {}
        for (labels, expand), rows in groups.items():
            scores, ids = expanded_search(self.index, embeddings[rows], max(queries[r].k for r in rows),
                                          Expansion(expand), only=self._only(labels))
            for r, s, i in zip(rows, scores, ids, strict=True):
                hits[r] = hits_of(self.index, s[: queries[r].k], i[: queries[r].k])
        done = time.perf_counter()
        embed_ms, search_ms = 1000 * (embedded - start), 1000 * (done - embedded)
        served = self.served_by()
        return [Answer(hits[r], embed_ms, search_ms, len(queries), served) for r in range(len(queries))]

    def served_by(self) -> ServedBy:
        return ServedBy(self.index.generation_id, self.fingerprint)

    def _only(self, labels: tuple[str, ...]) -> np.ndarray | None:
        return self.index.ids_with_labels(labels) if labels else None

    def item(self, item_id: int) -> Item | None:
        return self.index.items([item_id])[0]

    def file_of(self, item: Item) -> Path:
        """The indexed file of an item: the DB's root joined with its stored path (never a client's path)."""
        return self.index.root / item.relpath

    def similar(self, item_id: int, k: int,
                labels: tuple[str, ...] = ()) -> tuple[Item, tuple[Hit, ...], float, ServedBy] | None:
        """(item, its k nearest other items (with one of `labels`, if any), search ms, who answered) from the
        stored embedding; None for an unknown id."""
        item = self.item(item_id)
        if item is None:
            return None
        start = time.perf_counter()
        scores, ids = self.index.search(self.index.vectors([item_id]), k + 1, only=self._only(labels))
        keep = ids[0] != item_id
        hits = hits_of(self.index, scores[0][keep][:k], ids[0][keep][:k])
        return item, hits, 1000 * (time.perf_counter() - start), self.served_by()

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
                            "image_size": header.encoder.image_size, "engine": str(self.runner.spec),
                            "crop_pct": self.encoder.config.crop_pct, "resize_mode": self.encoder.config.resize_mode,
                            "tta": self.encoder.config.tta},
                "ann": None if meta is None else {"kind": meta.kind, "factory": meta.factory},
                "generation": header.generation,
                "faiss_lags": self.index.lagging,
                "device": self.device,
                "served_by": {"generation": self.index.generation_id, "fingerprint": self.fingerprint},
            }
        return self._stats

    def refresh(self) -> None:
        """Follow a switch of the live generation; renew the snapshot; on a change drop cached stats, and reload
        the encoder if the DB changed it (an empty DB bound to another encoder)."""
        if self._follow_live():
            return
        if not self.index.refresh():
            return
        self._stats = None
        if self.index.header.encoder.fingerprint != self.fingerprint:
            log.warning("the DB was bound to %s: loading it", self.index.header.encoder.spec)
            encoder = load_db_encoder(self.index, device=self.device)
            self._use(self.index, encoder, load_db_runner(self.index, encoder))
        self.status = self._status()

    def _follow_live(self) -> bool:
        """Start loading the live generation when the pointer names another one; swap it in once loaded (True)."""
        if self._next is not None:
            if not self._next.done():
                return False
            pending, self._next = self._next, None
            try:
                index, encoder, runner = pending.result()
            except Exception:  # noqa: BLE001 - serving goes on with the generation loaded; retried at the next tick
                log.exception("cannot load generation %d", read_pointer(self.cfg.db).live)
                return False
            if index.generation_id != read_pointer(self.cfg.db).live:  # switched again meanwhile
                index.close()
                return False
            old = self.index
            self._use(index, encoder, runner)
            old.close()
            log.warning("now serving generation %d (%s)", index.generation_id, index.header.encoder.spec)
            return True
        live = read_pointer(self.cfg.db).live
        if live != self.index.generation_id:
            self._next = Future()
            threading.Thread(target=_load_generation, args=(self._next, self.cfg.db, live, self.device, self._wake),
                             name="serve-loader", daemon=True).start()
        return False

    def _wake(self) -> None:
        """Ask the worker to swap now rather than at its next tick (when the queue is full the tick will)."""
        with contextlib.suppress(Busy):
            self.batcher.call(self.refresh)

    def _use(self, index: SearchIndex, encoder: Encoder, runner: Runner) -> None:
        """Serve `index` with `encoder` run by `runner` from the next batch on (worker thread, between batches)."""
        self.index, self.encoder, self.runner = index, encoder, runner
        self.transform = encoder.eval_transform()
        self.fingerprint = index.header.encoder.fingerprint
        self._front = (self.transform, self.fingerprint, encoder.config.resize_size)
        self._stats = None
        self.status = self._status()

    def _status(self) -> Status:
        encoder = self.index.header.encoder
        return Status(len(self.index), self.index.generation, self.index.lagging,
                      public_spec(encoder.spec, self.cfg.show_paths), encoder.fingerprint, self.index.generation_id)

    def close(self) -> None:
        self.batcher.close()
        self.index.close()
        if self._next is not None and self._next.done() and self._next.exception() is None:
            self._next.result()[0].close()


def _load_generation(future: Future, db: Path, gen: int, device: str, done: Callable[[], None]) -> None:
    """Open generation `gen` of `db` and load its encoder (a loader thread): the result goes to `future`, then
    `done()` is called."""
    try:
        index = SearchIndex.open(db, generation=gen)
        try:
            encoder = load_db_encoder(index, device=device)   # a generation is served as it was built
            future.set_result((index, encoder, load_db_runner(index, encoder)))
        except BaseException:
            index.close()
            raise
    except BaseException as exc:  # noqa: BLE001 - handed to the worker, which logs it and tries again
        future.set_exception(exc)
    done()


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

