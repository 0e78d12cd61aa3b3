"""Compare a scan with what the DB holds: which files to (re)encode, which are unchanged, which are gone.

A pure merge of two lists sorted by path key (the scan and the DB's `paths`), so it costs one pass and no
file reads: a file is unchanged when its (size, mtime) equal the stored ones; a file that failed before is
retried only when its (size, mtime, ctime) changed (ctime also moves on chmod, so fixing permissions counts).
Items under a folder the scan could not list are kept as they are: an unreadable folder is not a deletion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .layout import Failure, PathState, path_key
from .scan import FileEntry, ScanResult


@dataclass(frozen=True)
class Plan:
    todo: list[FileEntry]  # new, changed, or bad-but-changed files: read, decode, encode
    unchanged: int  # files whose stored item is current
    known_failures: int  # bad files unchanged since they failed: not retried, still counted as failed
    removed: list[bytes]  # path keys whose item or failure belongs to a file that is gone


def make_plan(scan: ScanResult, stored: Iterable[tuple[bytes, PathState]], failures: Iterable[Failure]) -> Plan:
    """What to do for each scanned file, given the DB's paths (sorted by key) and recorded failures."""
    failed = {path_key(f.relpath): f for f in failures}
    still_bad = {path_key(f.relpath) for f in scan.failures}  # recorded again by the run; not "removed"
    unknown = tuple(path_key(d) + b"/" for d in scan.unlisted)
    todo: list[FileEntry] = []
    removed: list[bytes] = []
    unchanged = known_failures = 0
    files = iter(scan.files)
    pending = next(files, None)

    def take_new(entry: FileEntry) -> None:
        nonlocal known_failures
        old = failed.pop(path_key(entry.relpath), None)
        if old is not None and (old.size, old.mtime_ns, old.ctime_ns) == (entry.size, entry.mtime_ns, entry.ctime_ns):
            known_failures += 1
        else:
            todo.append(entry)

    for key, state in stored:
        while pending is not None and path_key(pending.relpath) < key:
            take_new(pending)
            pending = next(files, None)
        if pending is not None and path_key(pending.relpath) == key:
            if (state.size, state.mtime_ns) == (pending.size, pending.mtime_ns):
                unchanged += 1
            else:
                todo.append(pending)
            failed.pop(key, None)
            pending = next(files, None)
        elif key.startswith(unknown):
            unchanged += 1
        elif key not in still_bad:
            removed.append(key)
    while pending is not None:
        take_new(pending)
        pending = next(files, None)
    removed.extend(key for key in failed if key not in still_bad and not key.startswith(unknown))  # files gone
    return Plan(todo, unchanged, known_failures, removed)
