"""Walk an image folder with `stat` only: what is there, how big, when changed; nothing is read.

Symbolic links are followed (files and folders); a folder reached twice (a link loop, or two links to one
folder) is walked once, keyed by its real (device, inode). Hidden files and folders (name starting with '.')
are skipped, like the folder reader's. Files the indexer cannot take are returned as failures with a reason:
a broken link, a name that is not valid UTF-8, a folder or file that cannot be stat'ed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.data.folder import IMAGE_EXTENSIONS
from retrieval.errors import DataError

from .layout import path_key


@dataclass(frozen=True)
class FileEntry:
    """An image file found by the scan; `relpath` uses '/' and is relative to the scanned folder."""

    relpath: str
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


@dataclass(frozen=True)
class ScanResult:
    files: list[FileEntry]  # sorted by path_key(relpath): the order of LMDB keys
    failures: list[ScanFailure]
    unlisted: list[str] = field(default_factory=list)  # folders that could not be listed (their files unknown)


def scan_folder(root: str | Path) -> ScanResult:
    """Every image file under `root`, stat'ed, in deterministic order, plus what could not be taken."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder (index needs a folder of images)")
    files: list[FileEntry] = []
    failures: list[ScanFailure] = []
    unlisted: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    root_stat = root.stat()
    seen_dirs.add((root_stat.st_dev, root_stat.st_ino))
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel_dir:
                raise DataError(root, f"cannot list folder: {exc.strerror or exc}") from exc
            failures.append(ScanFailure(rel_dir, f"cannot list folder: {exc.strerror or exc}"))
            unlisted.append(rel_dir)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                st = entry.stat()  # follows symbolic links
            except OSError as exc:
                if is_image:
                    broken = entry.is_symlink() and not os.path.exists(entry.path)
                    failures.append(ScanFailure(rel, "broken symbolic link" if broken else
                                                f"cannot stat: {exc.strerror or exc}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) not in seen_dirs:
                    seen_dirs.add((st.st_dev, st.st_ino))
                    subdirs.append(rel)
            elif is_image and stat.S_ISREG(st.st_mode):
                if _valid_name(rel):
                    files.append(FileEntry(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                else:
                    failures.append(ScanFailure(rel, "file name is not valid UTF-8 (rename the file)"))
        stack.extend(reversed(subdirs))
    files.sort(key=lambda f: path_key(f.relpath))
    failures.sort(key=lambda f: path_key(f.relpath))
    return ScanResult(files, failures, sorted(unlisted))


def _valid_name(relpath: str) -> bool:
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (surrogateescape)
        return False
    return True
