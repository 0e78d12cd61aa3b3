"""Walk an image folder with `stat` only: what is there, how big, when changed; nothing is read.

The walk is retrieval.data.walk's (the training reader's too): sorted, hidden entries skipped, links followed
once. It is streamed: `scan_stream` yields one entry at a time in LMDB key order (layout.path_key), holding in
memory one folder's listing (the walk's) and, rarely, one run of long paths sharing a key prefix, so that
indexer.build.plan can merge it with the DB's sorted keys as it goes. Files the indexer cannot take come as
failures with a reason (a broken link, a file that cannot be stat'ed), and what the walk could not reach (a
folder that cannot be listed, a link whose target is gone) as `Unreachable`: the items stored below it are
kept, because a vanished sub-tree (an unmounted share, a dangling folder link) is not a request to delete it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from indexer.store.layout import KEY_PREFIX, path_key
from retrieval.data.folder import IMAGE_EXTENSIONS
from retrieval.data.walk import Found, walk

# errno values that say something about the moment (a network share, the machine's load), not about the file
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                              errno.ETIMEDOUT, errno.EINTR, errno.EBUSY, errno.ENOLCK, errno.ECONNRESET,
                              errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH})


@dataclass(frozen=True)
class FileEntry:
    """An image file found by the scan; `relpath` uses '/' and is relative to the scanned folder."""

    relpath: str  # os.fsdecode form: a name that is not UTF-8 holds surrogate escapes (see layout.path_key)
    size: int
    mtime_ns: int
    ctime_ns: int  # changes with chmod too, so a file made readable again is retried

    @property
    def label(self) -> str:
        """The class folder: first folder level below the scanned folder ('' for files directly in it)."""
        head, sep, _ = self.relpath.partition("/")
        return head if sep else ""


@dataclass(frozen=True)
class ScanFailure:
    relpath: str
    reason: str
    transient: bool = False  # an I/O error that may pass (see TRANSIENT_ERRNOS): retried, keeps the old item


@dataclass(frozen=True)
class Unreachable:
    """A folder (or a dangling link that may have been one) whose contents are unknown."""

    relpath: str


Scanned = FileEntry | ScanFailure | Unreachable


@dataclass(frozen=True)
class ScanResult:
    files: list[FileEntry]  # sorted by path_key(relpath): the order of LMDB keys
    failures: list[ScanFailure]
    unreachable: list[str] = field(default_factory=list)  # folders (or dangling links) whose contents are unknown


def scan_stream(root: str | Path) -> Iterator[Scanned]:
    """Every image file under `root`, stat'ed, and what could not be taken or reached, in LMDB key order."""
    return in_key_order(scanned(walk(root)))


def scan_folder(root: str | Path) -> ScanResult:
    """scan_stream's entries collected in lists (for query folders and tools; the indexer streams them)."""
    out = ScanResult([], [])
    for entry in scan_stream(root):
        if isinstance(entry, FileEntry):
            out.files.append(entry)
        elif isinstance(entry, ScanFailure):
            out.failures.append(entry)
        else:
            out.unreachable.append(entry.relpath)
    return out


def scanned(found: Iterable[Found]) -> Iterator[Scanned]:
    """The walk's entries as the indexer takes them: image files, failures, and unreachable folders (a
    folder that cannot be listed is both a failure and unreachable)."""
    for entry in found:
        is_image = entry.suffix in IMAGE_EXTENSIONS
        if entry.stat is not None:
            if is_image:
                yield FileEntry(entry.relpath, entry.stat.st_size, entry.stat.st_mtime_ns, entry.stat.st_ctime_ns)
            continue
        if entry.folder or is_image:  # a folder that cannot be listed, or an image that cannot be taken
            yield ScanFailure(entry.relpath, entry.problem or "", entry.errno in TRANSIENT_ERRNOS)
        if not is_image or entry.folder:  # might be a folder: keep what is stored below it
            yield Unreachable(entry.relpath)


def in_key_order(entries: Iterable[Scanned]) -> Iterator[Scanned]:
    """Entries in path order (the walk's) -> the same entries in key order.

    The two orders differ only among paths longer than KEY_PREFIX bytes that share their first KEY_PREFIX
    bytes (keyed by prefix + digest, see layout.path_key), and such paths are neighbours in path order: each
    run of them is buffered and sorted by key. In a run, unreachable folders come first, so that whatever the
    DB holds below them is known to be unreachable before any of its keys is compared.
    """
    run: list[Scanned] = []
    for entry in entries:
        key = path_key(entry.relpath)
        if run and key[:KEY_PREFIX + 1] != path_key(run[0].relpath)[:KEY_PREFIX + 1]:
            yield from _sorted_run(run)
            run = []
        if len(key) > KEY_PREFIX:
            run.append(entry)
        else:
            yield entry
    yield from _sorted_run(run)


def _sorted_run(run: list[Scanned]) -> list[Scanned]:
    return sorted(run, key=lambda e: (not isinstance(e, Unreachable), path_key(e.relpath)))
