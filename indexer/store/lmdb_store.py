"""The LMDB environment in DB_DIR: the index's source of truth.

Sub-databases (keys are bytes; ids are 8-byte big-endian so key order is id order):
  items     id -> item record (stat, size, label, content hash, path)          see layout.pack_item
  vectors   chunk number -> float32 rows of `chunk_rows` consecutive ids       (id // chunk_rows)
  paths     relative path -> (id, size, mtime_ns)                              what the scan is compared with
  hashes    content hash -> id (duplicates sorted)                             reuse for identical content
  failures  relative path -> {"reason", "size", "mtime_ns", "ctime_ns"}        files that could not be indexed
  meta      b"header" -> Header JSON (encoder, counters, ids digest)

Embeddings live in chunks rather than in each item's value: a 2-5 KB value would take its own overflow
page(s) and waste up to half of them, while a chunk of 64 rows wastes about 3% (measured with 512-d
embeddings: 2.4 KB of LMDB per image in all, of which 2 KB is the embedding itself).

Writers hold an exclusive POSIX record lock (fcntl/lockf) on DB_DIR/index.lock: a second writer gets a
"locked" IndexStoreError. Unlike a `flock`, a record lock belongs to the process alone: decode workers forked
by the writer do not inherit it, so the kernel drops it the moment the writer dies (even on kill -9), and
a run restarted at once is never told that a dead process holds the DB. Each batch is one LMDB transaction,
so a crash leaves the DB as of its last commit. Readers take a snapshot (one read transaction) and see the
last committed state while a writer goes on; while a snapshot is open its pages cannot be reused, so a
long-lived reader must renew it (see search.SearchIndex). The map grows by doubling when full.

Keys of `paths` and `failures` are layout.path_key(relpath): the path's bytes, or for paths over KEY_PREFIX
bytes a prefix + digest, with the whole path kept in the value. An embedding chunk is either dense (rows
for offsets 0..n-1, schema 1) or masked: an 8-byte bitmask of the offsets present, then their rows in order;
a chunk whose live rows fall under half of its stored rows is rewritten with only the live ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from retrieval.data.walk import printable
from retrieval.errors import IndexStoreError

from .layout import (
    KEY_PREFIX,
    SCHEMA_VERSION,
    EncoderInfo,
    Failure,
    Header,
    Item,
    NewItem,
    PathState,
    Raw,
    digest_update,
    id_key,
    key_id,
    new_uuid,
    pack_item,
    pack_path,
    path_key,
    unpack_item,
    unpack_path,
)

log = logging.getLogger(__name__)

_DBS = ("items", "vectors", "paths", "hashes", "failures", "meta")
_DUPSORT = ("hashes",)  # several ids per key, all 8 bytes (dupsort + dupfixed)
_HEADER = b"header"
LOCK_FILE = "index.lock"
DEFAULT_MAP_SIZE = 1 << 30
T = TypeVar("T")
_HELD_LOCKS: set[str] = set()  # lock files this process holds: POSIX locks do not exclude their own process


class Snapshot:
    """A consistent read-only view of the DB (one LMDB read transaction); use inside `Store.snapshot()`."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]):
        self._txn = txn
        self._dbs = dbs
        raw = txn.get(_HEADER, db=dbs["meta"])
        self.header: Header | None = Header.from_bytes(raw) if raw is not None else None

    def count(self) -> int:
        """Number of items."""
        return self._txn.stat(self._dbs["items"])["entries"]

    def failure_count(self) -> int:
        return self._txn.stat(self._dbs["failures"])["entries"]

    def ids(self) -> np.ndarray:
        """All item ids, ascending, int64."""
        with self._txn.cursor(self._dbs["items"]) as cur:
            keys = b"".join(cur.iternext(keys=True, values=False))
        return np.frombuffer(keys, dtype=">u8").astype(np.int64)

    def items(self, ids: Iterable[int]) -> list[Item | None]:
        """Item records for `ids`, in the same order; None where an id is not (or no longer) in the DB."""
        out: list[Item | None] = []
        for item_id in ids:
            if item_id < 0:
                out.append(None)
                continue
            raw = self._txn.get(id_key(int(item_id)), db=self._dbs["items"])
            out.append(unpack_item(int(item_id), raw) if raw is not None else None)
        return out

    def iter_items(self) -> Iterator[Item]:
        """Every item, in id order."""
        with self._txn.cursor(self._dbs["items"]) as cur:
            for key, raw in cur:
                yield unpack_item(key_id(key), raw)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Embeddings (len(ids), dim) float32 of items that are in the DB, in the order given."""
        header = self.require_header()
        rows, dim = header.chunk_rows, header.encoder.dim
        wanted = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(wanted), dim), dtype=np.float32)
        order = np.argsort(wanted, kind="stable")
        chunks = wanted[order] // rows
        for where in np.split(order, np.flatnonzero(np.diff(chunks)) + 1) if len(wanted) else []:
            chunk = int(wanted[where[0]] // rows)
            raw = self._txn.get(id_key(chunk), db=self._dbs["vectors"])
            offsets = wanted[where] - chunk * rows
            if len(where) == 1:  # random access (expansion's shortlist, hits): one row, no per-chunk arrays
                row = chunk_row(raw, dim, int(offsets[0]))
                if row is None:
                    raise IndexStoreError(f"embedding of item {int(wanted[where[0]])} is missing")
                out[where[0]] = row
                continue
            present, chunk_vectors = read_chunk(raw, dim, rows)
            if not present[offsets].all():
                raise IndexStoreError(f"embedding of item {int(wanted[where][np.argmin(present[offsets])])} is missing")
            out[where] = chunk_vectors[np.cumsum(present)[offsets] - 1]
        return out

    def iter_vectors(self, batch: int = 16384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings) of every item, in id order, `batch` at a time."""
        ids = self.ids()
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            yield part, self.vectors(part)

    def paths(self) -> Iterator[tuple[bytes, PathState]]:
        """(path key, state) of every item, in key order (the scan's order); state.path holds the whole path
        where the key is a prefix + digest."""
        with self._txn.cursor(self._dbs["paths"]) as cur:
            for key, raw in cur:
                yield bytes(key), unpack_path(raw)

    def path_state(self, relpath: str) -> PathState | None:
        raw = self._txn.get(path_key(relpath), db=self._dbs["paths"])
        return unpack_path(raw) if raw is not None else None

    def failures(self) -> Iterator[Failure]:
        """Every recorded failure, in key order (relpath as os.fsdecode gives it; see walk.printable)."""
        with self._txn.cursor(self._dbs["failures"]) as cur:
            for key, raw in cur:
                yield Failure.from_bytes(bytes(key), raw)

    def find_hashes(self, hashes: Iterable[bytes]) -> dict[bytes, int]:
        """For each content hash already in the DB, the id of an item with that content."""
        found = {}
        with self._txn.cursor(self._dbs["hashes"]) as cur:
            for digest in hashes:
                if cur.set_key(digest):
                    found[digest] = key_id(cur.value())
        return found

    def require_header(self) -> Header:
        if self.header is None:
            raise IndexStoreError("the index DB has no header yet (no index run has committed)")
        return self.header


class Store:
    """An open index DB. `Store.open(db_dir)` for queries; `Store.open(db_dir, readonly=False)` to write."""

    def __init__(self, db_dir: Path, env: lmdb.Environment, dbs: dict, readonly: bool, lock_fd: int | None):
        self.db_dir = db_dir
        self.readonly = readonly
        self._env = env
        self._dbs = dbs
        self._lock_fd = lock_fd
        self._txn_lock = threading.Lock()  # no transaction may be open while the map is resized

    @classmethod
    def open(cls, db_dir: str | Path, *, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE) -> Store:
        """Open DB_DIR; for writing, create it if needed and take the writer lock (IndexStoreError if held)."""
        db_dir = Path(db_dir)
        if readonly and not (db_dir / "data.mdb").is_file():
            raise IndexStoreError(f"no index DB at {db_dir} "
                                  f"(create one with: python cli.py index FOLDER --db {db_dir})")
        lock_fd = None if readonly else acquire_lock(db_dir / LOCK_FILE)
        try:
            env = lmdb.open(str(db_dir), readonly=readonly, max_dbs=len(_DBS), map_size=map_size,
                            lock=True)
            dbs = {name: env.open_db(name.encode(), create=not readonly, dupsort=name in _DUPSORT,
                                     dupfixed=name in _DUPSORT) for name in _DBS}
        except lmdb.Error as exc:
            if lock_fd is not None:
                release_lock(db_dir / LOCK_FILE, lock_fd)
            detail = "sub-databases missing" if isinstance(exc, lmdb.NotFoundError) else str(exc)
            raise IndexStoreError(f"{db_dir} cannot be opened as an index DB: {detail}") from None
        store = cls(db_dir, env, dbs, readonly, lock_fd)
        if not readonly:
            try:
                store._migrate()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self._env.close()
        if self._lock_fd is not None:
            release_lock(self.db_dir / LOCK_FILE, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """A consistent view of the last committed state, for as long as the `with` block lasts."""
        with self._txn_lock:
            txn = self._begin(write=False)
            try:
                yield Snapshot(txn, self._dbs)
            finally:
                txn.abort()

    def header(self) -> Header | None:
        with self.snapshot() as snap:
            return snap.header

    def disk_bytes(self) -> int:
        """Bytes of the LMDB data file actually in use (last page * page size)."""
        info, stat = self._env.info(), self._env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    # -- writing (readonly=False) -------------------------------------------------------------------------

    def begin_run(self, encoder: EncoderInfo, root: str, *, first_id: int = 0) -> Header:
        """Bind the DB to `encoder`: IndexStoreError if it holds items embedded by another (a new encoder gets a
        new generation: indexer.store.generations; a DB is never emptied in place). A new DB numbers its items
        from `first_id`."""
        self._env.reader_check()  # free the reader slots of dead processes, which would pin old pages forever

        def run(txn: lmdb.Transaction) -> Header:
            header = _read_header(txn, self._dbs)
            now = _now()
            if header is None:
                header = Header(encoder=encoder, root=root, uuid=new_uuid(), created=now, next_id=first_id)
            elif header.schema != SCHEMA_VERSION:
                raise IndexStoreError(f"{self.db_dir} has index schema {header.schema}, this version reads "
                                      f"{SCHEMA_VERSION}; rebuild it into a new --db")
            elif header.encoder.fingerprint != encoder.fingerprint and txn.stat(self._dbs["items"])["entries"]:
                raise IndexStoreError(_mismatch_message(self.db_dir, header.encoder, encoder))
            if header.root != root:
                log.info("index root changes from %s to %s", header.root, root)
            header = replace(header, encoder=encoder, root=root, updated=now, generation=header.generation + 1)
            _write_header(txn, self._dbs, header)
            return header

        return self._write(run)

    def finish_run(self) -> Header:
        """Clear the mark an in-place --reembed of an older version left, once every file has been seen."""
        return self._write(lambda txn: self._update_header(txn, [], [], reembed_pending=False))

    def commit_batch(self, items: Sequence[NewItem], failures: Sequence[Failure]) -> list[int]:
        """Store `items` under new ids and record `failures`, replacing whatever their paths held before
        (except that a transient failure keeps the path's item: its old embedding stays until a new one is
        committed). One transaction: after a crash either the whole batch is in the DB or none of it.
        """

        def run(txn: lmdb.Transaction) -> list[int]:
            header = _current_header(txn, self._dbs)
            replaced = [path_key(x.relpath) for x in items] + [path_key(f.relpath) for f in failures
                                                               if not f.transient]
            removed = self._drop_paths(txn, replaced, header)
            ids = list(range(header.next_id, header.next_id + len(items)))
            for item_id, item in zip(ids, items, strict=True):
                key = path_key(item.relpath)
                whole = os.fsencode(item.relpath) if len(key) > KEY_PREFIX else b""
                txn.put(id_key(item_id), pack_item(item), db=self._dbs["items"])
                txn.put(key, pack_path(PathState(item_id, item.size, item.mtime_ns, whole)), db=self._dbs["paths"])
                txn.put(item.content_hash, id_key(item_id), db=self._dbs["hashes"])
                txn.delete(key, db=self._dbs["failures"])
            if items:
                self._put_vectors(txn, header, ids, np.stack([x.embedding for x in items]))
            for failure in failures:
                txn.put(path_key(failure.relpath), failure.to_bytes(), db=self._dbs["failures"])
            self._update_header(txn, ids, removed, next_id=header.next_id + len(items))
            return ids

        return self._write(run)

    def remove_paths(self, keys: Sequence[bytes]) -> int:
        """Remove the items and failures of these paths (files that are gone); returns items removed."""

        def run(txn: lmdb.Transaction) -> int:
            removed = self._drop_paths(txn, keys, _current_header(txn, self._dbs))
            for key in keys:
                txn.delete(key, db=self._dbs["failures"])
            self._update_header(txn, [], removed)
            return len(removed)

        return self._write(run) if keys else 0

    def put_failures(self, failures: Sequence[Failure]) -> None:
        """Record failures found by the scan (they hold no item: a path's item is removed separately)."""
        if failures:
            self.commit_batch([], failures)

    # -- internals ----------------------------------------------------------------------------------------

    def _begin(self, *, write: bool) -> lmdb.Transaction:
        try:
            return self._env.begin(write=True) if write else self._env.begin(buffers=True)  # zero-copy reads
        except lmdb.MapResizedError:  # another process grew the map: adopt its size
            self._env.set_mapsize(0)
            return self._env.begin(write=True) if write else self._env.begin(buffers=True)

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        if self.readonly:
            raise IndexStoreError(f"{self.db_dir} was opened read-only")
        while True:
            with self._txn_lock:
                try:
                    txn = self._begin(write=True)
                    try:
                        result = fn(txn)
                    except BaseException:
                        txn.abort()
                        raise
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    size = self._env.info()["map_size"] * 2
                    log.info("LMDB map full: growing it to %.2f MiB", size / 2**20)
                    self._env.set_mapsize(size)

    def _drop_paths(self, txn: lmdb.Transaction, keys: Iterable[bytes], header: Header) -> list[int]:
        """Delete the items these paths hold (record, path, hash, and the embedding chunk once empty)."""
        removed = []
        for key in keys:
            raw = txn.pop(key, db=self._dbs["paths"])
            if raw is None:
                continue
            item_id = unpack_path(raw).id
            raw_item = txn.pop(id_key(item_id), db=self._dbs["items"])
            if raw_item is None:
                raise IndexStoreError(f"{self.db_dir} is damaged: path {printable(os.fsdecode(key))} holds item "
                                      f"{item_id}, which is missing")
            item = unpack_item(item_id, raw_item)
            txn.delete(item.content_hash, id_key(item_id), db=self._dbs["hashes"])
            removed.append(item_id)
        rows, dim = header.chunk_rows, header.encoder.dim
        with txn.cursor(self._dbs["items"]) as cur:
            for chunk in sorted({i // rows for i in removed}):
                live = []
                if cur.set_range(id_key(chunk * rows)):
                    for item_key in cur.iternext(keys=True, values=False):
                        if key_id(item_key) >= (chunk + 1) * rows:
                            break
                        live.append(key_id(item_key) - chunk * rows)
                if not live:
                    txn.delete(id_key(chunk), db=self._dbs["vectors"])
                    continue
                present, vectors = read_chunk(txn.get(id_key(chunk), db=self._dbs["vectors"]), dim, rows)
                if 2 * len(live) < len(vectors):  # mostly deleted rows: keep only the live ones
                    keep = np.zeros(rows, dtype=bool)
                    keep[live] = True
                    txn.put(id_key(chunk), write_chunk(keep, vectors[np.cumsum(present)[keep] - 1]),
                            db=self._dbs["vectors"])
        return removed

    def _put_vectors(self, txn: lmdb.Transaction, header: Header, ids: list[int], vectors: np.ndarray) -> None:
        rows, dim = header.chunk_rows, header.encoder.dim
        if vectors.shape[1] != dim:
            raise IndexStoreError(f"embedding has {vectors.shape[1]} dimensions, the DB holds {dim}")
        ids_arr = np.asarray(ids)
        for chunk in np.unique(ids_arr // rows):
            where = np.flatnonzero(ids_arr // rows == chunk)
            present, old = read_chunk(txn.get(id_key(int(chunk)), db=self._dbs["vectors"]), dim, rows)
            block = np.zeros((rows, dim), dtype="<f4")
            block[present] = old
            block[ids_arr[where] - chunk * rows] = vectors[where]
            present[ids_arr[where] - chunk * rows] = True
            txn.put(id_key(int(chunk)), write_chunk(present, block[present]), db=self._dbs["vectors"])

    def _migrate(self) -> None:
        """Bring a schema-1 DB to this schema in one transaction: re-key paths longer than KEY_PREFIX bytes
        (schema 1 stored them whole, up to LMDB's 511) and give the DB its uuid. Chunks are read either way."""

        def run(txn: lmdb.Transaction) -> None:
            header = _read_header(txn, self._dbs)
            if header is None or header.schema != 1:
                return
            for name in ("paths", "failures"):
                with txn.cursor(self._dbs[name]) as cur:
                    long = [(bytes(k), bytes(v)) for k, v in cur if len(k) > KEY_PREFIX]
                for key, value in long:
                    txn.delete(key, db=self._dbs[name])
                    if name == "paths":
                        value = pack_path(replace(unpack_path(value), path=key))
                    else:
                        value = Failure.from_bytes(key, value).to_bytes()
                    txn.put(path_key(key), value, db=self._dbs[name])
            log.info("%s: index schema 1 migrated to %d", self.db_dir, SCHEMA_VERSION)
            _write_header(txn, self._dbs, replace(header, schema=SCHEMA_VERSION, uuid=header.uuid or new_uuid(),
                                                  generation=header.generation + 1, updated=_now()))

        self._write(run)

    def _update_header(self, txn: lmdb.Transaction, added: Sequence[int], removed: Sequence[int],
                       **changes: Any) -> Header:
        header = _current_header(txn, self._dbs)
        header = replace(header, generation=header.generation + 1, updated=_now(),
                         ids_digest=digest_update(header.ids_digest, np.asarray(added, dtype=np.int64),
                                                  np.asarray(removed, dtype=np.int64)), **changes)
        _write_header(txn, self._dbs, header)
        return header


def _read_header(txn: lmdb.Transaction, dbs: dict) -> Header | None:
    raw = txn.get(_HEADER, db=dbs["meta"])
    return Header.from_bytes(raw) if raw is not None else None


def _current_header(txn: lmdb.Transaction, dbs: dict) -> Header:
    """The header a write after `begin_run` finds (IndexStoreError if there is none)."""
    header = _read_header(txn, dbs)
    if header is None:
        raise IndexStoreError("the index DB has no header: begin_run must commit before items are written")
    return header


def _write_header(txn: lmdb.Transaction, dbs: dict, header: Header) -> None:
    txn.put(_HEADER, header.to_bytes(), db=dbs["meta"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def require_encoder(header: Header, encoder: EncoderInfo, db_dir: str | Path) -> None:
    """IndexStoreError unless `encoder` is the one the DB was built with (queries must use the same)."""
    if header.encoder.fingerprint != encoder.fingerprint:
        raise IndexStoreError(_mismatch_message(Path(db_dir), header.encoder, encoder))


def _mismatch_message(db_dir: Path, stored: EncoderInfo, given: EncoderInfo) -> str:
    if stored.spec == given.spec and (stored.tta or "none") != given.tta and (
            stored.crop_pct is None or (stored.crop_pct, stored.resize_mode) == (given.crop_pct, given.resize_mode)):
        return (f"{db_dir} was built with --tta {stored.tta or 'none'}, not --tta {given.tta}: leave --tta out to "
                f"use the DB's, or pass --reembed to re-encode every image, or use another --db")
    if stored.spec == given.spec and stored.crop_pct is not None and (stored.crop_pct, stored.resize_mode) != (
            given.crop_pct, given.resize_mode):
        return (f"{db_dir} was built with encoder {stored.spec!r} at --crop-pct {stored.crop_pct:g} --resize-mode "
                f"{stored.resize_mode}, not --crop-pct {given.crop_pct:g} --resize-mode {given.resize_mode}: "
                f"leave them out to use the DB's, or pass --reembed to re-encode every image, or use another --db")
    return (f"{db_dir} was built with encoder {stored.spec!r} (fingerprint {stored.fingerprint[:12]}), "
            f"not {given.spec!r} ({given.fingerprint[:12]}): pass --model {stored.spec} (or none), "
            f"or index the folder with --model {given.spec}: that builds a new generation and switches to it")


def read_chunk(raw: Raw | None, dim: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(which offsets of the chunk are present: bool (rows,), their embeddings in offset order) of a stored
    chunk, dense (schema 1: offsets 0..n-1) or masked (8-byte bitmask, then the rows present)."""
    present = np.zeros(rows, dtype=bool)
    if raw is None:
        return present, np.empty((0, dim), dtype=np.float32)
    if len(raw) % (4 * dim) == 0:  # dense: a masked value is 8 bytes longer, and 4 * dim > 8
        vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dim)
    else:
        bits = int.from_bytes(bytes(raw[:8]), "little")
        present[:] = (np.uint64(bits) >> np.arange(rows, dtype=np.uint64)) & np.uint64(1)
        vectors = np.frombuffer(raw, dtype="<f4", offset=8).reshape(-1, dim)
        return present, vectors
    present[: len(vectors)] = True
    return present, vectors


def chunk_row(raw: Raw | None, dim: int, offset: int) -> np.ndarray | None:
    """The embedding at `offset` of a stored chunk (None when absent): read_chunk's format for one row, by bit
    arithmetic on the mask instead of arrays over the whole chunk (about half the time of a random read)."""
    if raw is None:
        return None
    if len(raw) % (4 * dim) == 0:  # dense
        row, start = offset, 0
        if offset >= len(raw) // (4 * dim):
            return None
    else:
        bits = int.from_bytes(bytes(raw[:8]), "little")
        if not bits >> offset & 1:
            return None
        row, start = (bits & ((1 << offset) - 1)).bit_count(), 8
    return np.frombuffer(raw, dtype="<f4", count=dim, offset=start + 4 * dim * row)


def write_chunk(present: np.ndarray, vectors: np.ndarray) -> bytes:
    """A masked chunk value: bitmask of the present offsets, then their rows (float32, offset order)."""
    bits = sum(1 << int(i) for i in np.flatnonzero(present))
    return bits.to_bytes(8, "little") + np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def acquire_lock(path: Path, *, what: str = "another index run") -> int:
    """A POSIX record lock on the file `path` (created if needed): held by this process only (a fork does not
    inherit it), released by the kernel when the process ends however it ends. IndexStoreError "locked"
    (naming `what` holds it) when another process, or this one, holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD_LOCKS:  # closing a second descriptor would drop this process's lock: never open one
        raise _locked(path.parent, str(os.getpid()), what)
    fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise IndexStoreError(f"cannot lock {key}: {exc.strerror or exc}") from None
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise _locked(path.parent, holder, what) from None
    _HELD_LOCKS.add(key)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(path: Path, fd: int) -> None:
    _HELD_LOCKS.discard(str(path.resolve()))
    os.close(fd)  # drops the record lock


def _locked(db_dir: Path, holder: str, what: str) -> IndexStoreError:
    return IndexStoreError(f"{db_dir} is locked: {what} (pid {holder}) is writing to it; "
                           f"wait for it to finish or use another --db")
