"""Compare a scan with what the DB holds: which files to (re)encode, which are unchanged, which are gone.

A streamed merge of two sequences sorted by path key: the scan (indexer.scan.scan_stream) and the DB's
`paths` and `failures` (LMDB keeps keys sorted). It costs one pass, no file reads, and memory for one entry
of each side: what it finds goes to files on disk (`Spool`), read back a chunk at a time by the stages that
act on it, and the counts the run reports accumulate. Because the whole plan exists before anything is
written, the removal guard (pipeline._limit_removals) sees the exact number of removals first, and the
removals themselves can then be committed in bounded transactions.

A file is unchanged when its (size, mtime) equal the stored ones; a file that failed before is retried when
its (size, mtime, ctime) changed (ctime also moves on chmod, so fixing permissions counts), and on every run
when its failure was transient (an I/O error is not a property of the file), and when the caps it failed
against (--max-pixels, --max-file-mb) are not the run's. Items below a folder the scan could not reach are
kept as they are: an unreachable folder is not a deletion.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Generic, TypeVar

from indexer.store.layout import Failure, PathState, path_key
from retrieval.errors import IndexStoreError

from .scan import FileEntry, ScanFailure, Scanned, Unreachable

T = TypeVar("T")
SPOOL_CHUNK = 4096  # entries per pickled chunk: what a spool holds in memory while written or read


class Spool(Generic[T]):
    """An append-only list kept in an anonymous temporary file (gone when closed, or when the process dies,
    even by kill -9), written and read back in chunks of SPOOL_CHUNK."""

    def __init__(self, folder: str | Path | None = None):
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder)
        self._chunk: list[T] = []
        self._len = 0

    def append(self, value: T) -> None:
        self._chunk.append(value)
        self._len += 1
        if len(self._chunk) >= SPOOL_CHUNK:
            self._flush()

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        """Every value, in the order appended (one reader at a time)."""
        self._flush()
        self._file.seek(0)
        while True:
            try:
                chunk = pickle.load(self._file)
            except EOFError:
                return
            yield from chunk

    def batches(self, size: int) -> Iterator[list[T]]:
        """The values in lists of at most `size`."""
        batch: list[T] = []
        for value in self:
            batch.append(value)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        self._file.close()

    def _flush(self) -> None:
        if self._chunk:
            self._file.seek(0, os.SEEK_END)
            pickle.dump(self._chunk, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._chunk = []


@dataclass
class Plan:
    """What a run has to do. Lists that grow with the collection are spools on disk; close() frees them."""

    todo: Spool[FileEntry]  # new, changed, or bad-but-changed files: read, decode, encode
    failures: Spool[ScanFailure]  # what the scan could not take: recorded again by the run
    removed: Spool[bytes]  # path keys whose item or failure belongs to a file that is gone
    unchanged: int = 0  # files whose stored item is current (and items kept below unreachable folders)
    known_failures: int = 0  # bad files unchanged since they failed: not retried, still counted as failed
    removed_items: int = 0  # how many of `removed` hold an item (the rest hold only a failure)
    removed_from: Counter[str] = field(default_factory=Counter)  # top folder ('.' for the root) -> items removed
    unreachable_kept: int = 0  # items kept because they lie below a folder the scan could not reach
    unreachable: list[str] = field(default_factory=list)  # folders (or dangling links) whose contents are unknown
    files: int = 0  # what the scan found: image files and failures

    def close(self) -> None:
        for spool in (self.todo, self.failures, self.removed):
            spool.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Stored = tuple[bytes, PathState | None, Failure | None]  # a key of the DB: its item's state, its failure


def make_plan(scan: Iterable[Scanned], stored: Iterable[tuple[bytes, PathState]], failures: Iterable[Failure],
              limits: str = "", spool_dir: str | Path | None = None) -> Plan:
    """What to do for each scanned file, given the scan and the DB's paths and failures (each in key order),
    and the run's caps (layout.limits_key). IndexStoreError if the scan is not in key order (merging it
    anyway would take stored items for deleted files)."""
    plan = Plan(Spool(spool_dir), Spool(spool_dir), Spool(spool_dir))
    try:
        _merge(plan, scan, _by_key(stored, failures), limits)
    except BaseException:
        plan.close()
        raise
    return plan


def _merge(plan: Plan, scan: Iterable[Scanned], db: Iterator[Stored], limits: str) -> None:
    unknown: tuple[bytes, ...] = ()  # byte prefixes of the unreachable folders seen so far
    last = b""
    held = next(db, None)
    for entry in scan:
        if isinstance(entry, Unreachable):  # comes before anything stored below it (scan.in_key_order)
            plan.unreachable.append(entry.relpath)
            unknown += (os.fsencode(entry.relpath) + b"/",)
            continue
        key = path_key(entry.relpath)
        if key <= last:
            raise IndexStoreError(f"the scan is not in LMDB key order ({key[:80]!r} after {last[:80]!r}): a bug in "
                                  "the walk; nothing was removed")
        last = key
        plan.files += 1
        while held is not None and held[0] < key:
            _gone(plan, held, unknown)
            held = next(db, None)
        state = failure = None
        if held is not None and held[0] == key:
            _, state, failure = held
            held = next(db, None)
        if isinstance(entry, ScanFailure):  # recorded again by the run: neither removed nor retried
            plan.failures.append(entry)
        elif state is not None:
            if (state.size, state.mtime_ns) == (entry.size, entry.mtime_ns):
                plan.unchanged += 1
            else:
                plan.todo.append(entry)
        elif (failure is not None and not failure.transient and (not failure.limits or failure.limits == limits)
              and (failure.size, failure.mtime_ns, failure.ctime_ns) == (entry.size, entry.mtime_ns, entry.ctime_ns)):
            plan.known_failures += 1
        else:
            plan.todo.append(entry)
    while held is not None:
        _gone(plan, held, unknown)
        held = next(db, None)


def _gone(plan: Plan, stored: Stored, unknown: tuple[bytes, ...]) -> None:
    """A DB key the scan did not find: removed, unless it lies below an unreachable folder."""
    key, state, failure = stored
    if state is not None:
        whole = state.path or key  # the whole path: a long path's key holds only a prefix
    else:
        assert failure is not None
        whole = os.fsencode(failure.relpath)
    if whole.startswith(unknown):
        if state is not None:
            plan.unreachable_kept += 1
            plan.unchanged += 1
        return
    plan.removed.append(key)
    if state is not None:
        plan.removed_items += 1
        plan.removed_from[os.fsdecode(key.partition(b"/")[0]) if b"/" in key else "."] += 1


def _by_key(paths: Iterable[tuple[bytes, PathState]], failures: Iterable[Failure]) -> Iterator[Stored]:
    """The DB's paths and failures, each in key order, merged into one stream of keys (a key may hold both:
    a transient failure keeps the path's item)."""
    merged = heapq.merge(paths, ((path_key(f.relpath), f) for f in failures), key=lambda pair: pair[0])
    for key, group in itertools.groupby(merged, key=lambda pair: pair[0]):
        state: PathState | None = None
        failure: Failure | None = None
        for _, value in group:
            if isinstance(value, PathState):
                state = value
            elif isinstance(value, Failure):
                failure = value
        yield key, state, failure
