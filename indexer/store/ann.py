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
then IVF-PQ (its codes sized to fit that quarter), whose results are re-ranked exactly with the LMDB
embeddings of REFINE_FACTOR x k candidates (see search(refine=)). faiss-gpu, when installed with a GPU,
trains IVF centroids and searches on the GPU.

Bounded memory at scale: IVF is trained on a sample of at most TRAIN_BYTES of vectors, vectors are added in
chunks streamed from LMDB, and an update does not rewrite a large file for a small change: while the items
added and removed since ann.faiss was written stay within LAG_FRACTION of it (and it is over MERGE_MIN_BYTES),
the file is left as it is and readers search around the difference (indexer.store.search: ids gone are filtered
out, ids not in FAISS yet are searched exactly from LMDB in bounded chunks, exact_search). Past that, the
difference is merged in (remove the ids gone, add the new ones) and the file rewritten once, so a growing DB
rewrites it after every LAG_FRACTION of growth, not at every checkpoint. It is rebuilt only when the kind
changes, when the size calls for another number of IVF lists (4x up or down since training), or when the
lists drift (their imbalance grows DRIFT-fold since the build, as new content piles into a few lists).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
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
    from .lmdb_store import Snapshot

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
ANN_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
FLAT_MAX_FLOATS = 100_000 * 512  # auto: exact search up to here (n * dim), see module docstring
_TRAIN_PER_CENTROID = 64
_KMEANS_ITERATIONS = 10  # IVF centroids: faiss's 25 cost 2.5x the time for no measurable recall here
_MIN_PER_CENTROID = 39  # faiss warns below this many training points per list
TRAIN_BYTES = 1 << 30  # at most this much of training sample in memory (512-d: 524,288 vectors)
LAG_FRACTION = 0.05  # an update leaves ann.faiss as it is while the changes since are at most this share of it
MERGE_MIN_BYTES = 256 << 20  # smaller files are simply brought level at every update
DRIFT = 2.0  # rebuild IVF when its lists' imbalance factor has grown this much since the build
REFINE_FACTOR = 64  # IVF-PQ: candidates re-ranked exactly per wanted result (1M x 512, PQ64: recall@10 0.51 at
# 4, 0.84 at 16, 0.95 at 32, 0.996 at 64, all about 14 ms a query on a loaded 2-core CPU; scripts/bench_scale.py)
EXACT_CHUNK = 65_536  # vectors per block in exact_search (512-d: 128 MiB)


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
    imbalance: float = 0.0  # IVF lists' imbalance factor after the build (1.0: even), to notice drift
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
    """What `refresh` did to ann.faiss: "unchanged", "lagging" (left as it is: the changes since are few, see
    the module docstring), "synced" (ids added / removed) or "rebuilt" (and why)."""

    action: str
    factory: str
    ntotal: int
    reason: str | None = None
    added: int = 0
    removed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def choose_factory(kind: str, n: int, dim: int, *, memory: int | None = None) -> str:
    """The faiss factory string (inner index, without IDMap2) for `kind` at n vectors of `dim`; `memory`:
    bytes of RAM to plan for (default: this machine's), of which the index may take a quarter."""
    budget = (memory or _physical_memory()) // 4
    if kind == "auto":
        if n * dim <= FLAT_MAX_FLOATS:
            return "Flat"
        kind = "ivf-flat" if n * (dim * 4 + 8) <= budget else "ivf-pq"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivf-flat":
        return f"IVF{_nlist(n, dim)},Flat"
    if kind == "ivf-pq":
        m = _pq_bytes(n, dim, budget)
        nbits = max(1, min(8, int(math.log2(max(n // 39, 2)))))  # small sets cannot train 256 centroids
        return f"IVF{_nlist(n, dim)},PQ{m}x{nbits}"
    return kind  # a faiss factory string, checked when the index is built


def _pq_bytes(n: int, dim: int, budget: int) -> int:
    """PQ sub-quantizers (bytes per vector): dim / 8, halved while n codes (+ 8-byte ids) exceed `budget`,
    at least dim / 32; each must divide dim."""
    want = max(1, dim // 8)
    while want > max(1, dim // 32) and n * (want + 8) > budget:
        want //= 2
    return next(m for m in range(want, 0, -1) if dim % m == 0)


def is_lossy(index: faiss.Index) -> bool:
    """Whether the index stores compressed vectors (PQ, SQ...): its scores are approximate, so results are
    re-ranked with the exact embeddings (search(refine=))."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    return not isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat)


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
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        # polysemous codes serve only polysemous search (not used here), and training them took 36x longer
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]  # not in faiss's stub
    return index if ivf is not None else faiss.IndexIDMap2(index)


def build_index(factory: str, snapshot: Snapshot, *, seed: int = 0) -> faiss.Index:
    """Build an index of every item in `snapshot` (a store.Snapshot), training on a sample first."""
    dim = snapshot.require_header().encoder.dim
    index = new_index(factory, dim)
    if not index.is_trained:
        ids = snapshot.ids()
        if len(ids) == 0:
            raise IndexStoreError(f"--ann {factory!r} must be trained, and the DB has no embeddings yet")
        ivf = faiss.try_extract_index_ivf(index)
        most = _max_train(dim)
        want = most if ivf is None else min(most, max(_TRAIN_PER_CENTROID * ivf.nlist, 10_000))
        sample = np.sort(np.random.default_rng(seed).choice(ids, min(len(ids), want), replace=False))
        if ivf is not None:
            ivf.cp.niter = _KMEANS_ITERATIONS
        if ivf is not None and _gpu_count():
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))
        index.train(snapshot.vectors(sample))
        if ivf is not None:
            ivf.clustering_index = None  # type: ignore[assignment]  # faiss stub: a SWIG pointer may be None
            ivf.nprobe = ivf_params(index)
    for ids, vectors in snapshot.iter_vectors():  # bounded chunks, straight from LMDB
        index.add_with_ids(vectors, ids)
    return index


def _max_train(dim: int) -> int:
    return max(10_000, TRAIN_BYTES // (4 * dim))


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
    moved `kind` to another index type (IVF: when the DB grew or shrank 4x since training), when the index
    cannot remove ids (HNSW), or when its lists drifted. A large file whose difference from LMDB is within
    LAG_FRACTION is left as it is ("lagging": readers search around the difference). Returns what it did.
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
        lag = _small_lag(db_dir, meta, snapshot)
        if lag is not None:
            return Refresh("lagging", meta.factory, meta.ntotal, None, *lag)
        index = load_ann(db_dir, mmap=False)
        if index is None:
            reason = "ann.faiss unreadable"
        else:
            try:
                added, removed = sync_index(index, snapshot)
            except RuntimeError:
                reason = f"{meta.factory} cannot remove ids"
            else:
                reason = _drift_reason(meta, index)
    if reason is not None or index is None or meta is None:  # (a reason is always given then)
        log.info("building the FAISS index (%s): %s over %d vectors", reason, factory, n)
        index, added, removed = build_index(factory, snapshot), n, 0
        meta = AnnMeta(kind, factory, dim, fingerprint, 0, 0, trained_on=n, imbalance=_imbalance(index))
    if ids_digest(index_ids(index)) != header.ids_digest:
        raise IndexStoreError(f"{db_dir}: FAISS ids do not match LMDB after the update (please report this)")
    meta = write_ann(db_dir, index, AnnMeta(**{**asdict(meta), "ntotal": index.ntotal, "ids_digest": header.ids_digest,
                                               "db_uuid": header.uuid, "generation": header.generation}))
    return Refresh("rebuilt" if reason else "synced", meta.factory, meta.ntotal, reason, added, removed)


def _small_lag(db_dir: Path, meta: AnnMeta, snapshot: Snapshot) -> tuple[int, int] | None:
    """(added, removed) since ann.faiss was written, when the file is large and that is within LAG_FRACTION
    of it; None when the file should be brought level now."""
    if meta.file_size < MERGE_MIN_BYTES:
        return None
    index = load_ann(db_dir, mmap=True)
    if index is None:
        return None
    have, want = index_ids(index), snapshot.ids()
    missing = len(np.setdiff1d(want, have, assume_unique=True))
    extra = len(np.setdiff1d(have, want, assume_unique=True))
    return (missing, extra) if missing + extra <= LAG_FRACTION * max(meta.ntotal, 1) else None


def _imbalance(index: faiss.Index) -> float:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.invlists is None or not index.ntotal:
        return 0.0
    return float(ivf.invlists.imbalance_factor())


def _drift_reason(meta: AnnMeta, index: faiss.Index) -> str | None:
    """A reason to rebuild an IVF index whose lists became uneven since it was built (new content unlike the
    training sample piles into a few lists, and every query that probes them scans more)."""
    now = _imbalance(index)
    if meta.imbalance and now > DRIFT * meta.imbalance:
        return f"IVF lists drifted (imbalance {meta.imbalance:.2f} -> {now:.2f})"
    return None


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
           include: np.ndarray | None = None, nprobe: int | None = None,
           refine: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query row; ids -1 where fewer than k. `exclude`: ids to leave out; `include`: the
    only ids to consider (a filter; `exclude` is then ignored).
    `refine`: ids -> their exact embeddings; when given, REFINE_FACTOR x k candidates are re-ranked with them
    (for lossy indexes, whose own scores are approximate).

    Parameters are passed per call (never set on a shared index).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.ntotal == 0:
        return _empty(len(queries), k)
    if refine is not None:
        _, candidates = search(index, queries, k * REFINE_FACTOR, exclude=exclude, include=include, nprobe=nprobe)
        return _rerank(queries, candidates, refine, k)
    sel: faiss.IDSelector | None = None
    if include is not None:
        sel = faiss.IDSelectorBatch(include)
    elif exclude is not None and len(exclude):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude))
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


def _empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf, np.float32), np.full((rows, k), -1, np.int64)


def _rerank(queries: np.ndarray, candidates: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row's candidate ids by exact inner product with their embeddings, reading the embeddings
    of at most EXACT_CHUNK candidates at a time."""
    scores = np.full(candidates.shape, -np.inf, np.float32)
    rows = max(1, EXACT_CHUNK // max(1, candidates.shape[1]))
    for start in range(0, len(queries), rows):
        part = candidates[start:start + rows]
        valid = part >= 0
        unique = np.unique(part[valid])
        if len(unique):
            vectors = vectors_of(unique)[np.searchsorted(unique, np.where(valid, part, unique[0]))]
            exact = np.einsum("qd,qcd->qc", queries[start:start + rows], vectors)
            scores[start:start + rows] = np.where(valid, exact, -np.inf)
    return merge_top_k([(scores, candidates)], k)


def exact_search(queries: np.ndarray, k: int, ids: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
                 *, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) over `ids`, reading their embeddings `chunk` at a time (bounded memory:
    one chunk of vectors and k candidates per query at any moment)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best, chunk = _empty(len(queries), k), chunk or EXACT_CHUNK
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        scores = queries @ vectors_of(part).T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = merge_top_k([best, (np.take_along_axis(scores, top, axis=1), part[top])], k)
    return best


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores, ids) result sets for the same queries; (-inf, -1) padding."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if scores.shape[1] < k:
        pad = _empty(len(scores), k - scores.shape[1])
        scores, ids = np.concatenate([scores, pad[0]], axis=1), np.concatenate([ids, pad[1]], axis=1)
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


def _nlist(n: int, dim: int) -> int:
    """Power of two near 2 * sqrt(n), with at least 39 points of the (bounded) training sample per list.

    Training k-means costs sample x lists x dim; with nprobe = lists / 16 a query scans 1/16 of the vectors
    whatever the number of lists, so on a CPU fewer, larger lists than faiss's usual 4 * sqrt(n) build 4x
    faster (1M x 512: 2,048 lists trained in 74 s on one loaded core) for much the same search cost."""
    target = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return max(1, min(target, min(n, _max_train(dim)) // _MIN_PER_CENTROID))


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "index_cpu_to_all_gpus") else 0


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

