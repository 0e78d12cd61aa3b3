"""The one folder walker: every reader of image folders (training data, the indexer's scan, query folders).

    for entry in walk(root):           # Found(relpath, stat, problem), in sorted path order
        ...

Rules, the same for every caller:
- order: entries come in the byte order of their relative paths ('/'-separated, os.fsencode bytes), the
  order of the index's LMDB keys, so a caller can merge the walk with sorted keys as it goes (a folder
  sorts as its name + '/', which makes a depth-first walk come out in full-path order);
- hidden files and folders (name starting with '.') are skipped;
- symbolic links are followed, files and folders alike; a folder reached twice (a link loop, or two links
  to one folder) is walked once, keyed by its real (device, inode);
- nothing is raised for one bad entry: a folder that cannot be listed, a broken link, or an entry that
  cannot be stat'ed is yielded with a `problem` (and no stat), so callers can tell "gone" from "unreachable";
- names are kept as the file system gives them: a name that is not valid UTF-8 arrives as os.fsdecode makes
  it (surrogate escapes), which round-trips to the same bytes through os.fsencode and opens the same file.
Only an unreadable `root` itself raises (DataError).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

UNLISTABLE = "cannot list folder"
BROKEN_LINK = "broken symbolic link"


@dataclass(frozen=True)
class Found:
    """A walk entry: a regular file (with its stat), or something the walk could not take (with `problem`)."""

    relpath: str  # relative to the walked root, '/'-separated
    stat: os.stat_result | None  # of the file (links followed); None when `problem` is set
    problem: str | None = None  # "cannot list folder: ...", "broken symbolic link", "cannot stat: ..."
    folder: bool = False  # the problem is a folder's: what lies below `relpath + '/'` is unknown
    errno: int = 0  # of the OSError behind `problem` (0 for a broken link)

    @property
    def suffix(self) -> str:
        """The lower-case file extension, with its dot ('' if none)."""
        return os.path.splitext(self.relpath.rpartition("/")[2])[1].lower()


def walk(root: str | Path) -> Iterator[Found]:
    """Every regular file below `root` and every entry that could not be taken, in sorted path order."""
    root = Path(root)
    try:
        root_stat = root.stat()
        top = _listing(root, "")
    except OSError as exc:
        raise DataError(root, f"cannot list folder: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(root_stat.st_mode):
        raise DataError(root, "not a folder")
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [iter(top)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        rel, st, problem, code = entry
        if st is None:
            yield Found(rel, None, problem, folder=False, errno=code)
        elif stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                stack.append(iter(_listing(root / rel, rel)))
            except OSError as exc:
                yield Found(rel, None, f"{UNLISTABLE}: {exc.strerror or exc}", folder=True, errno=exc.errno or 0)
        elif stat.S_ISREG(st.st_mode):
            yield Found(rel, st)


_Entry = tuple[str, "os.stat_result | None", "str | None", int]


def _listing(folder: Path, rel_dir: str) -> list[_Entry]:
    """(relpath, stat or None, problem or None, errno) of the visible entries of one folder, in path order."""
    out: list[_Entry] = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                out.append((rel, entry.stat(), None, 0))  # follows symbolic links
            except OSError as exc:
                broken = entry.is_symlink() and not os.path.exists(entry.path)
                out.append((rel, None, BROKEN_LINK if broken else f"cannot stat: {exc.strerror or exc}",
                            0 if broken else exc.errno or 0))
    out.sort(key=lambda e: os.fsencode(e[0]) + (b"/" if e[1] is not None and stat.S_ISDIR(e[1].st_mode) else b""))
    return out


def printable(path: str | Path) -> str:
    """A path for text, JSON and HTML: bytes that are not valid UTF-8 shown as backslash escapes (\\xff)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
