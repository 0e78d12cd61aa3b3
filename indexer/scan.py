"""Walk an image folder with `stat` only: what is there, how big, when changed; nothing is read.

The walk is retrieval.data.walk's (the training reader's too): sorted, hidden entries skipped, links followed
once. Files the indexer cannot take are returned as failures with a reason (a broken link, a file that
cannot be stat'ed), and what the walk could not reach (a folder that cannot be listed, a link whose target is
gone) as `unreachable`: the items stored below it are kept, because a vanished sub-tree (an unmounted share,
a dangling folder link) is not a request to delete it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.data.folder import IMAGE_EXTENSIONS
from retrieval.data.walk import walk

from .layout import path_key

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
class ScanResult:
    files: list[FileEntry]  # sorted by path_key(relpath): the order of LMDB keys
    failures: list[ScanFailure]
    unreachable: list[str] = field(default_factory=list)  # folders (or dangling links) whose contents are unknown


def scan_folder(root: str | Path) -> ScanResult:
    """Every image file under `root`, stat'ed, in LMDB key order, plus what could not be taken or reached."""
    files: list[FileEntry] = []
    failures: list[ScanFailure] = []
    unreachable: list[str] = []
    for found in walk(root):
        is_image = found.suffix in IMAGE_EXTENSIONS
        if found.stat is not None:
            if is_image:
                files.append(FileEntry(found.relpath, found.stat.st_size, found.stat.st_mtime_ns,
                                       found.stat.st_ctime_ns))
            continue
        if found.folder or is_image:  # a folder that cannot be listed, or an image that cannot be taken
            failures.append(ScanFailure(found.relpath, found.problem or "", found.errno in TRANSIENT_ERRNOS))
        if not is_image or found.folder:  # might be a folder: keep what is stored below it
            unreachable.append(found.relpath)
    files.sort(key=lambda f: path_key(f.relpath))  # walk order, but long paths sharing a key prefix by digest
    failures.sort(key=lambda f: path_key(f.relpath))
    return ScanResult(files, failures, unreachable)
