"""`export`: the DB's embeddings in the layout clip-retrieval's `inference` writes, which autofaiss,
embedding-reader and many notebooks read:

    OUT/img_emb/img_emb_{N}.npy          (rows, dim) float32 (or float16), L2-normalised
    OUT/metadata/metadata_{N}.parquet    image_path (relative to the indexed folder), id, label, width, height,
                                         content_hash (hex), one row per embedding row, in the same order

Partitions hold `rows` items each (the last fewer), in id order; N is zero-padded to the width of the last
partition's number so that file-name order (what readers sort by) is partition order. OUT is written under a
temporary name beside it and renamed into place at the end (retrieval.files.atomic_dir): a killed export
leaves no file under OUT. Memory stays bounded by one read batch: the .npy is written through a memory map and
the parquet file one row group per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.data.walk import printable
from retrieval.errors import IndexStoreError, RetrievalError

if TYPE_CHECKING:
    import numpy as np

    from .store.layout import Item

DTYPES = ("float32", "float16")
EMB_DIR, META_DIR = "img_emb", "metadata"


@dataclass(frozen=True)
class ExportConfig:
    db: Path
    out: Path
    rows: int = 1_000_000  # items per partition
    dtype: str = "float32"
    batch: int = 16384  # items read from LMDB at a time (bounds memory)
    progress: bool = False


@dataclass(frozen=True)
class ExportResult:
    out: Path
    items: int
    dim: int
    dtype: str
    partitions: int

    def to_json(self) -> dict:
        """The `export --json` summary."""
        return {"out": str(self.out), "items": self.items, "dim": self.dim, "dtype": self.dtype,
                "partitions": self.partitions, "embeddings": EMB_DIR, "metadata": META_DIR}


def run_export(cfg: ExportConfig) -> ExportResult:
    """Write the DB's live items to cfg.out (which must not exist, or be empty).

    RetrievalError for a bad option or an occupied OUT, IndexStoreError for a missing or empty DB.
    """
    from tqdm import tqdm

    from retrieval.files import atomic_dir, remove_orphaned_temporaries

    from .store.search import SearchIndex

    if cfg.rows < 1:
        raise RetrievalError(f"--rows must be at least 1, got {cfg.rows}")
    if cfg.dtype not in DTYPES:
        raise RetrievalError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.out.exists() and not (cfg.out.is_dir() and not any(cfg.out.iterdir())):
        raise RetrievalError(f"{cfg.out} already exists: export into a new folder (or remove it first)")
    remove_orphaned_temporaries(cfg.out)   # a killed export's folder (its PID is gone)
    with SearchIndex.open(cfg.db, gpu=False) as index:
        total, dim = len(index), index.header.encoder.dim
        if total == 0:
            raise IndexStoreError(f"the index DB at {cfg.db} is empty: nothing to export")
        names = partition_names(total, cfg.rows)
        with atomic_dir(cfg.out) as tmp, tqdm(total=total, unit="item", desc="export",
                                               disable=not cfg.progress) as bar:
            (tmp / EMB_DIR).mkdir()
            (tmp / META_DIR).mkdir()
            part: _Partition | None = None
            written = 0
            for items, vectors in index.iter_batches(cfg.batch):
                start = 0
                while start < len(items):
                    number, offset = divmod(written, cfg.rows)
                    if offset == 0:
                        part = _Partition(tmp, names[number], min(cfg.rows, total - written), dim, cfg.dtype)
                    assert part is not None
                    take = min(len(items) - start, part.rows - offset)
                    part.write(offset, items[start:start + take], vectors[start:start + take])
                    start, written = start + take, written + take
                    if offset + take == part.rows:
                        part.close()
                bar.update(len(items))
            if written != total:  # one snapshot: cannot happen unless the store is inconsistent
                raise IndexStoreError(f"read {written} items of the {total} the DB counts")
    return ExportResult(cfg.out, total, dim, cfg.dtype, len(names))


def partition_names(total: int, rows: int) -> list[str]:
    """The partitions' numbers as file-name suffixes, zero-padded so that name order is number order."""
    count = -(-total // rows)
    width = len(str(count - 1))
    return [f"{n:0{width}d}" for n in range(count)]


class _Partition:
    """One img_emb_N.npy (a memory-mapped .npy of known shape) and its metadata_N.parquet, filled in order."""

    def __init__(self, folder: Path, name: str, rows: int, dim: int, dtype: str):
        import numpy as np
        import pyarrow.parquet as pq

        self.rows = rows
        self._array: Any = np.lib.format.open_memmap(folder / EMB_DIR / f"img_emb_{name}.npy", mode="w+",
                                                     dtype=np.dtype(dtype), shape=(rows, dim))
        self._parquet = pq.ParquetWriter(folder / META_DIR / f"metadata_{name}.parquet", _schema())

    def write(self, offset: int, items: Sequence[Item], vectors: np.ndarray) -> None:
        import pyarrow as pa

        self._array[offset:offset + len(items)] = vectors
        columns = {
            "image_path": [printable(it.relpath) for it in items],  # parquet strings are UTF-8: odd bytes escaped
            "id": [it.id for it in items],
            "label": [printable(it.label) for it in items],
            "width": [it.width for it in items],
            "height": [it.height for it in items],
            "content_hash": [it.content_hash.hex() for it in items],
        }
        self._parquet.write_table(pa.table(columns, schema=_schema()))

    def close(self) -> None:
        self._array.flush()
        del self._array
        self._parquet.close()


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("image_path", pa.string()), ("id", pa.int64()), ("label", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("content_hash", pa.string())])
