"""Crash-safe writes: a file or folder appears complete under its final name, or not at all.

Everything is written under a temporary name beside the target (same file system), fsync'd, renamed over the
target, and then the parent folder is fsync'd so the rename itself survives a power cut. A reader, or a process
killed at any instant, sees the old version or the new one, never a torn one.

    with atomic_path(run_dir / "model.safetensors") as tmp:   # for any writer that takes a path
        save_file(tensors, str(tmp))
    write_text_atomic(run_dir / "encoder.json", text)
    with atomic_dir(data_dir) as tmp:                          # a whole folder, renamed into place at the end
        write_everything(tmp)

Temporary names are `.NAME.tmp-PID-RANDOM[suffix]`, so a writer holding a lock can delete the ones a killed
writer left (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TEMP_MARK = ".tmp-"


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside `path`: .NAME.tmp-PID-RANDOM followed by `suffix`."""
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporary files of `path` that killed writers left (call only while no other writer runs)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}{_TEMP_MARK}*"):
        stale.unlink(missing_ok=True)


def remove_orphaned_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries of `path` (files or folders) whose writer process is gone, e.g. killed with -9;
    safe beside a running writer, whose PID is in its temporary's name. Returns what was removed."""
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f".{glob.escape(path.name)}{_TEMP_MARK}*"):
        pid = stale.name[len(path.name) + 1 + len(_TEMP_MARK):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on a clean exit it replaces `path` durably.

    `suffix` ends the temporary name (for writers that choose the format by extension, e.g. ".png"). On an
    exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace the text file `path` with `text` (UTF-8), durably and all at once."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path`; on a clean exit, every file written in it is fsync'd and the folder
    is renamed to `path`, which must be absent or empty (OSError otherwise, e.g. when another process got there
    first). The temporary folder is removed whatever happens.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        for folder, _, names in os.walk(tmp):
            for name in names:
                fsync(os.path.join(folder, name))
            fsync(folder)
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync(path.parent)


def save_figure(fig: Any, png: Path) -> Path:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(png, suffix=png.suffix) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return png
