"""Typed errors raised by library code; the CLI turns each into a one-line message and exit 1."""

from __future__ import annotations

from pathlib import Path


class RetrievalError(Exception):
    """Base class: anything the user can fix (bad input, missing file, wrong model)."""


class DataError(RetrievalError):
    """A data set file is missing or malformed; names the file and, where known, the line."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None):
        self.path = Path(path)
        self.reason = reason
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


class DecodeError(RetrievalError):
    """An image could not be decoded (truncated, empty, not an image, too many pixels...)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class EncoderError(RetrievalError):
    """An encoder spec cannot be resolved or its weights cannot be loaded."""


class IndexStoreError(RetrievalError):
    """The index database is missing, locked, or built with another encoder."""
