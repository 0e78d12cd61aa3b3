"""Line-oriented parsing of data set index files, with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError


def read_table(path: Path, columns: tuple[str, ...], *, last_takes_rest: bool = False) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line of a whitespace-separated file.

    `last_takes_rest` lets the last column contain spaces (file names). Raises DataError when the file is
    missing or unreadable, or a line has the wrong number of fields.
    """
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read: {exc}") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=len(columns) - 1) if last_takes_rest else line.split()
        if len(fields) != len(columns):
            raise DataError(
                path, f"expected {len(columns)} fields ({' '.join(columns)}), got {len(fields)}: {line!r}", lineno
            )
        rows.append((lineno, fields))
    return rows


def to_int(path: Path, lineno: int, value: str, what: str) -> int:
    """`value` as an int, or DataError naming the field, the file and the line."""
    try:
        return int(value)
    except ValueError:
        raise DataError(path, f"{what} must be an integer, got {value!r}", lineno) from None


def to_float(path: Path, lineno: int, value: str, what: str) -> float:
    """`value` as a finite float, or DataError naming the field, the file and the line."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise DataError(path, f"{what} must be a finite number, got {value!r}", lineno)
    return number


def require_dir(path: Path) -> Path:
    """`path` if it is a directory, else DataError."""
    if not path.is_dir():
        raise DataError(path, "directory not found" if not path.exists() else "not a directory")
    return path
