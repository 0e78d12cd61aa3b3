"""The FAISS index in DB_DIR: derived from LMDB, keyed by LMDB ids, rebuildable at any time.

Files: `ann.faiss` (the chosen index, keyed by LMDB ids) and `ann.json` (AnnMeta: what it was built from).
Both are written atomically and durably (retrieval.files: temporary file, fsync, rename), the index first, so
a reader never sees a half-written file and a crash leaves at worst a stale (older) index; `ids_digest` tells
stale from current. ann.json also names the LMDB it was built from (the DB's random uuid, and its
generation): an index whose uuid is not the DB's (data.mdb deleted and built again, ids restarting at 0) is
never used, only rebuilt.

Index choice (`--ann`): `flat` exact search; `hnsw` (HNSW32: fast, no removal, so deletions rebuild it);
`ivf-flat` / `ivf-pq` (inverted lists trained on a sample; PQ compresses each vector to dim/8 bytes);
any other string is passed to `faiss.index_factory`. `auto` is exact Flat while n * dim <= FLAT_MAX_FLOATS,
where one Flat query still takes tens of milliseconds on a 2-core CPU (measured with scripts/bench_ann.py:
512-d, 100k vectors about 50 ms, 1M about 280 ms), then IVF-Flat while the vectors fit in a quarter of RAM,
then IVF-PQ. faiss-gpu, when installed with a GPU, trains IVF centroids and searches on the GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from retrieval.errors import IndexStoreError
from retrieval.files import atomic_path, remove_stale_temporaries, write_text_atomic

from .layout import ids_digest

if TYPE_CHECKING:
    from .layout import Header
    from .store import Snapshot

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
ANN_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
FLAT_MAX_FLOATS = 100_000 * 512  # auto: exact search up to here (n * dim), see module docstring
_TRAIN_PER_CENTROID = 64
_MAX_TRAIN = 200_000


@dataclass(frozen=True)
class AnnMeta:
    """What `ann.faiss` was built from; a reader trusts the index only as far as its ids match LMDB."""

    kind: str  # the --ann value it was built for
    factory: str  # faiss factory string of the inner index
    dim: int
    fingerprint: str  # encoder fingerprint of the embeddings
    ntotal: int
    ids_digest: int
    trained_on: int  # items in the DB when the index was (re)built
    file_size: int = 0  # stat of ann.faiss as written, to tell whether this meta describes the file
    file_mtime_ns: int = 0
    db_uuid: str = ""  # Header.uuid of the LMDB it was built from
    generation: int = 0  # Header.generation it was last brought level with

    def matches_file(self, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return (st.st_size, st.st_mtime_ns) == (self.file_size, self.file_mtime_ns)


@dataclass(frozen=True)
class Refresh:
    """What `refresh` did to ann.faiss: "unchanged", "synced" (ids added / removed) or "rebuilt" (and why)."""

    action: str
    factory: str
    ntotal: int
    reason: str | None = None
    added: int = 0
    removed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def choose_factory(kind: str, n: int, dim: int) -> str:
    """The faiss factory string (inner index, without IDMap2) for `kind` at n vectors of `dim`."""
    if kind == "auto":
        if n * dim <= FLAT_MAX_FLOATS:
            return "Flat"
        kind = "ivf-flat" if n * dim * 4 <= _physical_memory() // 4 else "ivf-pq"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivf-flat":
        return f"IVF{_nlist(n)},Flat"
    if kind == "ivf-pq":
        m = next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)  # sub-quantizers must divide dim
        nbits = max(1, min(8, int(math.log2(max(n // 39, 2)))))  # small sets cannot train 256 centroids
        return f"IVF{_nlist(n)},PQ{m}x{nbits}"
    return kind  # a faiss factory string, checked when the index is built


def check_kind(kind: str, dim: int) -> None:
    """IndexStoreError now, rather than after a long run, if `kind` is no index type faiss can build."""
    new_index(choose_factory(kind, 100_000, dim), dim)


def ivf_params(index: faiss.Index) -> int:
    """Default nprobe stored in an IVF index: 1/16 of the lists (at least 8, at most all)."""
    nlist = faiss.extract_index_ivf(index).nlist
    return min(nlist, max(8, nlist // 16))


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for `factory` (inner product) that takes LMDB ids: IVF indexes store ids themselves;
    anything else is wrapped in an IndexIDMap2. (IDMap2 over IVF would be wrong after a removal: IVF does not
    renumber its internal ids the way IDMap2 assumes.)"""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(exc).splitlines()[-1])
        raise IndexStoreError(f"--ann {factory!r}: not an index faiss can build ({detail}); use auto, flat, hnsw, "
                              f"ivf-flat, ivf-pq or a faiss index_factory string") from None
    return index if faiss.try_extract_index_ivf(index) is not None else faiss.IndexIDMap2(index)


def build_index(factory: str, snapshot: Snapshot, *, seed: int = 0) -> faiss.Index:
    """Build an index of every item in `snapshot` (a store.Snapshot), training on a sample first."""
    dim = snapshot.require_header().encoder.dim
    index = new_index(factory, dim)
    if not index.is_trained:
        ids = snapshot.ids()
        if len(ids) == 0:
            raise IndexStoreError(f"--ann {factory!r} must be trained, and the DB has no embeddings yet")
        ivf = faiss.try_extract_index_ivf(index)
        want = _MAX_TRAIN if ivf is None else min(_MAX_TRAIN, max(_TRAIN_PER_CENTROID * ivf.nlist, 10_000))
        sample = np.sort(np.random.default_rng(seed).choice(ids, min(len(ids), want), replace=False))
        if ivf is not None and _gpu_count():
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
        index.train(snapshot.vectors(sample))
        if ivf is not None:
            ivf.clustering_index = None  # type: ignore[assignment]  # faiss stub: a SWIG pointer may be None
            ivf.nprobe = ivf_params(index)
    for ids, vectors in snapshot.iter_vectors():
        index.add_with_ids(vectors, ids)
    return index


def sync_index(index: faiss.Index, snapshot: Snapshot) -> tuple[int, int]:
    """Make `index` hold exactly the snapshot's items: remove ids it lost, add ids it gained.

    Content per id never changes, so equal id sets mean equal indexes. Returns (added, removed); raises
    RuntimeError when the index type cannot remove (HNSW): then rebuild it.
    """
    have, want = index_ids(index), snapshot.ids()
    extra = np.setdiff1d(have, want, assume_unique=True)
    missing = np.setdiff1d(want, have, assume_unique=True)
    if len(extra):
        index.remove_ids(extra)  # type: ignore[arg-type]  # faiss stub: the Python wrapper takes an id array
    for start in range(0, len(missing), 16384):
        part = missing[start:start + 16384]
        index.add_with_ids(snapshot.vectors(part), part)
    return len(missing), len(extra)


def refresh(db_dir: Path, snapshot: Snapshot, kind: str, *, rebuild: bool = False) -> Refresh:
    """Bring ann.faiss level with the LMDB `snapshot`: nothing if current, else sync it or rebuild it.

    Rebuilds when asked, when there is no usable file, when the encoder or `kind` changed, when the size
    moved `kind` to another index type (IVF: when the DB grew or shrank 4x since training), or when the index
    cannot remove ids (HNSW). Returns what it did.
    """
    header, n = snapshot.require_header(), snapshot.count()
    dim, fingerprint = header.encoder.dim, header.encoder.fingerprint
    factory = choose_factory(kind, n, dim) if n else "Flat"  # an empty DB cannot train anything
    meta = read_meta(db_dir)
    reason = (_rebuild_reason(meta, kind, factory, n, dim, fingerprint, header.uuid)
              or ("asked (--rebuild-ann)" if rebuild else None))
    index, added, removed = None, 0, 0
    if meta is not None and reason is None:
        if meta.ids_digest == header.ids_digest and meta.ntotal == n:
            return Refresh("unchanged", meta.factory, n)
        index = load_ann(db_dir, mmap=False)
        if index is None:
            reason = "ann.faiss unreadable"
        else:
            try:
                added, removed = sync_index(index, snapshot)
            except RuntimeError:
                reason = f"{meta.factory} cannot remove ids"
    if reason is not None or index is None or meta is None:  # (a reason is always given then)
        log.info("building the FAISS index (%s): %s over %d vectors", reason, factory, n)
        index, added, removed = build_index(factory, snapshot), n, 0
        meta = AnnMeta(kind, factory, dim, fingerprint, 0, 0, trained_on=n)
    if ids_digest(index_ids(index)) != header.ids_digest:
        raise IndexStoreError(f"{db_dir}: FAISS ids do not match LMDB after the update (please report this)")
    meta = write_ann(db_dir, index, AnnMeta(**{**asdict(meta), "ntotal": index.ntotal, "ids_digest": header.ids_digest,
                                               "db_uuid": header.uuid, "generation": header.generation}))
    return Refresh("rebuilt" if reason else "synced", meta.factory, meta.ntotal, reason, added, removed)


def _rebuild_reason(meta: AnnMeta | None, kind: str, factory: str, n: int, dim: int, fingerprint: str,
                    db_uuid: str) -> str | None:
    if meta is None:
        return "no index yet"
    if meta.db_uuid != db_uuid:
        return "built from another DB (its uuid differs)"
    if meta.fingerprint != fingerprint or meta.dim != dim:
        return "encoder changed"
    if meta.kind != kind:
        return f"--ann changed from {meta.kind} to {kind}"
    if meta.factory != factory and not (same_factory_family(meta.factory, factory)
                                        and meta.trained_on / 4 <= n <= meta.trained_on * 4):
        return f"{n} vectors call for {factory} instead of {meta.factory}"
    return None


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index made by new_index holds (int64, in no particular order)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    lists = faiss.extract_index_ivf(index).invlists
    if lists is None:
        raise IndexStoreError("the FAISS index has neither an id map nor inverted lists (not made by new_index)")
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)]
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)


def search(index: faiss.Index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
           nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query row; ids -1 where fewer than k. `exclude`: ids to leave out.

    Parameters are passed per call (never set on a shared index).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.ntotal == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude)) if exclude is not None and len(exclude) else None
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    # faiss stubs: SWIG constructors take their fields as keywords; SearchParametersHNSW is not declared
    params: faiss.SearchParameters | None
    if faiss.try_extract_index_ivf(inner) is not None:
        params = faiss.SearchParametersIVF(  # type: ignore[call-arg]
            sel=sel, nprobe=nprobe or faiss.extract_index_ivf(inner).nprobe)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            sel=sel, efSearch=max(inner.hnsw.efSearch, 2 * k))
    else:
        params = faiss.SearchParameters(sel=sel) if sel is not None else None  # type: ignore[call-arg]
    scores, ids = index.search(queries, k, params=params)
    return scores, ids


def write_ann(db_dir: Path, index: faiss.Index, meta: AnnMeta) -> AnnMeta:
    """Atomically replace ann.faiss, then ann.json (so the meta never describes a file not yet there).

    Only the writer (holding the DB lock) calls this, so temporary files already there are left by a killed
    run: they are deleted first.
    """
    path = db_dir / ANN_FILE
    remove_stale_temporaries(path)
    remove_stale_temporaries(db_dir / ANN_META)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    st = path.stat()
    meta = AnnMeta(**{**asdict(meta), "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns})
    write_text_atomic(db_dir / ANN_META, json.dumps(asdict(meta), indent=1))
    return meta


def read_meta(db_dir: Path) -> AnnMeta | None:
    """ann.json if it exists and describes the current ann.faiss, else None."""
    try:
        meta = AnnMeta(**json.loads((db_dir / ANN_META).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return meta if meta.matches_file(db_dir / ANN_FILE) else None


def load_bound(db_dir: str | Path, header: Header, *, mmap: bool = True) -> faiss.Index | None:
    """ann.faiss if the last ann.json written names this DB (`header`: its layout.Header), else None.

    ann.faiss is always renamed into place before its ann.json, so once an ann.json names this DB's uuid the
    file holds this DB's index, current or lagging (which the ids digest tells); one named by another DB
    (data.mdb deleted and created again, a backup restored beside another DB) is never searched."""
    try:
        named = json.loads((Path(db_dir) / ANN_META).read_text()).get("db_uuid")
    except (OSError, ValueError, AttributeError):
        named = None
    if named != header.uuid:
        if (Path(db_dir) / ANN_FILE).is_file():
            log.info("%s: ann.faiss was not built from this DB; searching LMDB exactly until `index` rebuilds it",
                     db_dir)
        return None
    return load_ann(db_dir, mmap=mmap)


def file_stamp(db_dir: str | Path) -> tuple[tuple[int, int] | None, ...]:
    """(size, mtime_ns) of ann.faiss and of ann.json (None for a missing one): a reader reloads the index when
    this changes (both are replaced by rename)."""
    out: list[tuple[int, int] | None] = []
    for name in (ANN_FILE, ANN_META):
        try:
            st = (Path(db_dir) / name).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def load_ann(db_dir: str | Path, *, mmap: bool = True) -> faiss.Index | None:
    """ann.faiss, or None if there is none yet. mmap: map the vectors read-only (fast start, no edits)."""
    path = Path(db_dir) / ANN_FILE
    if not path.is_file():
        return None
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        log.warning("ignoring unreadable %s (%s); it is rebuilt from LMDB", path, str(exc).splitlines()[-1])
        return None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss has some and supports this index type, else unchanged."""
    if not _gpu_count():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU version: search on the CPU
        log.info("searching on the CPU: %s", str(exc).splitlines()[-1])
        return index


def same_factory_family(a: str, b: str) -> bool:
    """True for two IVF factories that differ only in list count / code size (no rebuild needed)."""
    return a.split(",")[0][:3] == b.split(",")[0][:3] == "IVF" and a.split(",")[1:] == b.split(",")[1:]


def _nlist(n: int) -> int:
    """Power of two near 4 * sqrt(n), with at least 39 training points per list."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(target, n // 39))


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "index_cpu_to_all_gpus") else 0


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

