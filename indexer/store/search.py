"""Read-only access to an index DB for queries and evaluation, as of one committed LMDB state.

    with SearchIndex.open(db_dir) as index:         # the live generation (generation=ID: another one)
        index.check_encoder(encoder)                  # IndexStoreError if the DB was built with another
        scores, ids = index.search(embeddings, k=10)  # (Q, k) float32 cosine, int64 LMDB ids (-1: none)
        items = index.items(ids[0])                   # Item records (path relative to index.root, label...)
        every = list(index.iter_items())              # bulk reads of the same snapshot (eval --db)
        vectors = index.vectors([it.id for it in every])
        for items, vectors in index.iter_batches(16384):  # the same in bounded memory (export, dedup)
            ...

The FAISS file is trusted only if its ids are exactly the LMDB snapshot's (ids digest). While an `index` run
is writing (or after one was killed, or when `index` left a large file lagging by a few percent, see
indexer.store.ann), it can lag behind: then ids LMDB no longer has are filtered out and items FAISS does not have
yet are searched exactly from their LMDB embeddings, a bounded chunk at a time, so results always match the
snapshot. A lossy FAISS index (IVF-PQ) has its candidates re-ranked with the exact LMDB embeddings. Nothing on
disk is modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from . import ann, generations
from .layout import EncoderInfo, Header, Item, ids_digest
from .lmdb_store import Snapshot, Store, require_encoder

if TYPE_CHECKING:
    from retrieval.encoder import Encoder


class SearchIndex:
    """Search an index DB as of one LMDB read snapshot; `refresh()` renews it, `close()` ends it.

    What a reader may hold: the snapshot is one LMDB read transaction, and while it is open LMDB cannot reuse
    any page a writer freed after it began, so every commit of an `index` run makes `data.mdb` grow. A short
    reader (`query`, `eval`) opens, searches and closes. A resident reader (`serve`) must call `refresh()`
    every few seconds: it ends the old transaction and starts a new one, and reloads FAISS and the lag
    bookkeeping only when the DB's generation or the FAISS file changed. Readers of a process killed with -9
    leave a stale slot in LMDB's reader table; writers clear those at the start of a run (Store.begin_run).
    Not thread-safe: use one SearchIndex from one thread at a time.
    """

    def __init__(self, store: Store, *, mmap: bool = True, gpu: bool = True, generation_id: int = 1):
        self.store = store
        self.generation_id = generation_id  # the index generation searched (indexer.store.generations)
        self._mmap, self._gpu = mmap, gpu
        self._snapshot_cm: contextlib.AbstractContextManager[Snapshot] | None = None
        self._snapshot: Snapshot
        self._ann_stamp: tuple[tuple[int, int] | None, ...] | None = None
        self._main: faiss.Index | None = None
        self._factory = "Flat"
        self._exclude = np.empty(0, np.int64)
        self._missing = np.empty(0, np.int64)  # ids FAISS does not have yet: searched exactly from LMDB
        self._by_label: dict[str, np.ndarray] | None = None  # label -> ids, read on first use per DB change
        try:
            self._renew(reload=True)
        except BaseException:
            self._end_snapshot()
            raise

    @classmethod
    def open(cls, db_dir: str | Path, *, generation: int | None = None, mmap: bool = True,
             gpu: bool = True) -> SearchIndex:
        """Open DB_DIR's live generation, or `generation`, read-only (IndexStoreError if there is none); mmap
        the FAISS file by default."""
        gen, path = generations.resolve(db_dir, generation)
        store = Store.open(path, readonly=True)
        try:
            return cls(store, mmap=mmap, gpu=gpu, generation_id=gen)
        except BaseException:
            store.close()
            raise

    def refresh(self) -> bool:
        """Renew the snapshot (a new read transaction); True when the DB or its FAISS file changed since the last
        one, and the index now answers from the new state."""
        return self._renew(reload=False)

    @property
    def generation(self) -> int:
        """The snapshot's commit counter (Header.generation: +1 per committed write transaction; not to be
        confused with generation_id, the index generation)."""
        return self.header.generation

    def _renew(self, *, reload: bool) -> bool:
        before = None if reload else self.header.generation
        self._end_snapshot()
        self._snapshot_cm = self.store.snapshot()
        self._snapshot = self._snapshot_cm.__enter__()
        header = self._snapshot.require_header()
        dim = header.encoder.dim
        stamp = ann.file_stamp(self.store.db_dir)
        if before == header.generation and stamp == self._ann_stamp:
            return False
        self._by_label = None
        meta = ann.read_meta(self.store.db_dir)  # read first: a writer replaces the index before its meta
        main = ann.load_bound(self.store.db_dir, header, mmap=self._mmap)
        if main is not None and main.d != dim:  # left from before a --reembed
            main = None
        factory = meta.factory if main is not None and meta is not None else "Flat"
        exclude, missing = _lag(main, self._snapshot)
        if main is not None and self._gpu:
            main = ann.to_gpu(main)
        self._main, self._factory, self._exclude, self._missing = main, factory, exclude, missing
        self._ann_stamp = stamp
        return True

    def _end_snapshot(self) -> None:
        if self._snapshot_cm is not None:
            cm, self._snapshot_cm = self._snapshot_cm, None
            cm.__exit__(None, None, None)

    @property
    def header(self) -> Header:
        return self._snapshot.require_header()

    @property
    def root(self) -> Path:
        """The indexed folder; item paths are relative to it."""
        return Path(self.header.root)

    def __len__(self) -> int:
        return self._snapshot.count()

    @property
    def lagging(self) -> bool:
        """True when the FAISS file is behind LMDB (an index run is going on, or was killed)."""
        return bool(len(self._exclude)) or bool(len(self._missing))

    @property
    def factory(self) -> str:
        """The FAISS index type searched ("Flat" when exact, also when there is no FAISS file yet)."""
        return self._factory

    @property
    def approximate(self) -> bool:
        """True when `search` may miss true nearest neighbours (IVF, HNSW, PQ...)."""
        return self._factory != "Flat"

    def check_encoder(self, encoder: Encoder | EncoderInfo) -> None:
        """IndexStoreError unless `encoder` (an Encoder or EncoderInfo) is the one the DB was built with."""
        info = encoder if isinstance(encoder, EncoderInfo) else EncoderInfo.of(encoder)
        require_encoder(self.header, info, self.store.db_dir)

    def search(self, queries: np.ndarray, k: int, *, only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query embedding, best first; rows padded with (-inf, -1) past the end.

        `only` (ids of this snapshot, e.g. ids_with_labels): a filter; each row holds the top k of those ids,
        min(k, len(only)) of them always. A few ids (<= ann.EXACT_CHUNK) are searched exactly from LMDB; more go
        to FAISS with an ID selector (exact for Flat), and rows an approximate index left short are redone
        exactly."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if only is not None and (self._main is None or len(only) <= ann.EXACT_CHUNK):
            return ann.exact_search(queries, k, only, self._snapshot.vectors)
        missing = self._missing if only is None else np.intersect1d(self._missing, only, assume_unique=True)
        parts = [ann.exact_search(queries, k, missing, self._snapshot.vectors)]
        if self._main is not None:
            refine = self._snapshot.vectors if ann.is_lossy(self._main) else None
            parts.append(ann.search(self._main, queries, k, exclude=self._exclude, include=only, refine=refine))
        scores, ids = ann.merge_top_k(parts, k)
        if only is not None:
            short = (ids >= 0).sum(axis=1) < min(k, len(only))
            if short.any():
                scores[short], ids[short] = ann.exact_search(queries[short], k, only, self._snapshot.vectors)
        return scores, ids

    def ids_with_labels(self, labels: Iterable[str]) -> np.ndarray:
        """Ids of the snapshot's items with any of these labels, ascending (labels read once per DB change)."""
        by_label = self._labels()
        parts = [by_label[label] for label in set(labels) if label in by_label]
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def label_counts(self) -> dict[str, int]:
        """Items per label in the snapshot."""
        return {label: len(ids) for label, ids in self._labels().items()}

    def _labels(self) -> dict[str, np.ndarray]:
        if self._by_label is None:
            groups: dict[str, list[int]] = {}
            for item in self._snapshot.iter_items():
                groups.setdefault(item.label, []).append(item.id)
            self._by_label = {label: np.asarray(ids, np.int64) for label, ids in groups.items()}
        return self._by_label

    def items(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """Item records for ids (None for -1 or an id not in this snapshot)."""
        return self._snapshot.items(np.asarray(ids, dtype=np.int64).ravel())

    def ids(self) -> np.ndarray:
        """Every item id of the snapshot, ascending (int64)."""
        return self._snapshot.ids()

    def iter_items(self) -> Iterator[Item]:
        """Every item of the snapshot, in id order."""
        return self._snapshot.iter_items()

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored embeddings (len(ids), dim) float32 of these ids, in the order given."""
        return self._snapshot.vectors(ids)

    def iter_batches(self, batch: int = 16384) -> Iterator[tuple[list[Item], np.ndarray]]:
        """Every item of the snapshot with its embedding (len, dim) float32, in id order, `batch` items at a time:
        bulk reads in memory bounded by the batch (export, dedup)."""
        for ids, vectors in self._snapshot.iter_vectors(batch):
            items = [item for item in self._snapshot.items(ids) if item is not None]  # ids of this snapshot: all
            yield items, vectors

    def close(self) -> None:
        try:
            self._end_snapshot()
        finally:
            self.store.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lag(main: faiss.Index | None, snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """(ids FAISS has that the snapshot lacks, ids the snapshot has that FAISS lacks)."""
    have = ann.index_ids(main) if main is not None else np.empty(0, np.int64)
    if main is not None and ids_digest(have) == snapshot.require_header().ids_digest and len(have) == snapshot.count():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    want = snapshot.ids()
    return np.setdiff1d(have, want, assume_unique=True), np.setdiff1d(want, have, assume_unique=True)
