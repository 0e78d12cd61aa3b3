"""Compare a scan with what the DB holds: which files to (re)encode, which are unchanged, which are gone.

A pure merge of two lists sorted by path key (the scan and the DB's `paths`), so it costs one pass and no
file reads: a file is unchanged when its (size, mtime) equal the stored ones; a file that failed before is
retried when its (size, mtime, ctime) changed (ctime also moves on chmod, so fixing permissions counts), and
on every run when its failure was transient (an I/O error is not a property of the file), and when the caps
it failed against (--max-pixels, --max-file-mb) are not the run's.
Items below a folder the scan could not reach are kept as they are: an unreachable folder is not a deletion.
"""

from __future__ import annotations

import os
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
    removed_items: int = 0  # how many of `removed` hold an item (the rest are failures)
    unreachable_kept: int = 0  # items kept because they lie below a folder the scan could not reach


def make_plan(scan: ScanResult, stored: Iterable[tuple[bytes, PathState]], failures: Iterable[Failure],
              limits: str = "") -> Plan:
    """What to do for each scanned file, given the DB's paths (sorted by key), recorded failures and the
    run's caps (layout.limits_key)."""
    failed = {path_key(f.relpath): f for f in failures}
    still_bad = {path_key(f.relpath) for f in scan.failures}  # recorded again by the run; not "removed"
    unknown = tuple(os.fsencode(d) + b"/" for d in scan.unreachable)
    todo: list[FileEntry] = []
    removed: list[bytes] = []
    unchanged = known_failures = kept = 0
    files = iter(scan.files)
    pending = next(files, None)

    def take_new(entry: FileEntry) -> None:
        nonlocal known_failures
        old = failed.pop(path_key(entry.relpath), None)
        if (old is not None and not old.transient and (not old.limits or old.limits == limits)
                and (old.size, old.mtime_ns, old.ctime_ns) == (entry.size, entry.mtime_ns, entry.ctime_ns)):
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
        elif (state.path or key).startswith(unknown):
            kept += 1
        elif key not in still_bad:
            removed.append(key)
    while pending is not None:
        take_new(pending)
        pending = next(files, None)
    n_items = len(removed)
    removed.extend(key for key, f in failed.items()  # files gone
                   if key not in still_bad and not os.fsencode(f.relpath).startswith(unknown))
    return Plan(todo, unchanged + kept, known_failures, removed, n_items, kept)
