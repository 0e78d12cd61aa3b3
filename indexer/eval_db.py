"""`eval --db`: every labelled item of an index DB queries the rest of the DB (itself excluded).

The stored embeddings are ranked exactly (`metrics.rank_leave_one_out`); when the DB's FAISS index is
approximate (IVF, HNSW, PQ), the same queries also go through FAISS, and the report shows both and the gap.
Both rankings are scored by `metrics.ranking_metrics`, the function `finetune` and `eval --dataset` use.
Unlabelled items (files directly in the indexed folder) are never queries but stay in the database as
distractors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import IndexStoreError
from retrieval.eval_config import DEFAULT_KS
from retrieval.eval_dataset import SAMPLE_TOP, EvalResult, make_result
from retrieval.metrics import neighbour_width, rank_leave_one_out, ranking_metrics
from retrieval.report import Ranking, load_comparison

if TYPE_CHECKING:
    from indexer.store.search import SearchIndex


@dataclass(frozen=True)
class DbEvalConfig:
    """`eval --db`: which index DB, which Ks, and where the report goes."""

    db: Path
    ks: tuple[int, ...] = DEFAULT_KS
    report: Path | None = None
    compare: Path | None = None
    device: str = "cpu"


def evaluate_db(cfg: DbEvalConfig) -> EvalResult:
    """Leave-one-out Recall@K, MAP@R, R-Precision of the DB's labelled items, through its FAISS index."""
    from indexer.store.search import SearchIndex

    if cfg.compare is not None:
        load_comparison(cfg.compare)  # fail before the slow part
    with SearchIndex.open(cfg.db) as index:
        items = list(index.iter_items())
        if not items:
            raise IndexStoreError(f"the index DB at {cfg.db} is empty: index a folder into it first")
        ids = np.array([it.id for it in items], dtype=np.int64)
        vectors = index.vectors(ids)
        class_names = sorted({it.label for it in items if it.label})
        if not class_names:
            raise IndexStoreError(f"{cfg.db}: no item has a label; eval needs images in class folders "
                                  f"(FOLDER/<class>/<image>) when the folder is indexed")
        code = {name: i for i, name in enumerate(class_names)}
        labels = np.array([code.get(it.label, -1) for it in items], dtype=np.int64)
        queries, scores, neighbours = rank_leave_one_out(vectors, labels, cfg.ks, top=SAMPLE_TOP, device=cfg.device)
        metrics, exact = ranking_metrics(labels, queries, neighbours, cfg.ks), None
        if index.approximate:
            scores, neighbours = _faiss_neighbours(index, ids, vectors, queries, neighbour_width(labels, cfg.ks))
            metrics, exact = ranking_metrics(labels, queries, neighbours, cfg.ks), metrics
        header, factory, root = index.header, index.factory, index.root
    ranking = Ranking([str(root / it.relpath) for it in items], labels, class_names, queries, neighbours, scores)
    source = {"db": str(cfg.db), "root": header.root, "model": header.encoder.spec,
              "fingerprint": header.encoder.fingerprint, "index": factory,
              "engine": f"{header.encoder.engine} {header.encoder.precision}"}
    title = f"index {Path(cfg.db).name} (encoder {Path(header.encoder.spec).name or header.encoder.spec})"
    return make_result(title, source, cfg.ks, metrics, ranking, exact=exact, report_dir=cfg.report,
                       compare=cfg.compare, embeddings=vectors)


def _faiss_neighbours(index: SearchIndex, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-`width` of each query row (indices into `ids`), the query itself left out."""
    scores, found = index.search(vectors[queries], width + 1)
    rows = np.where(found >= 0, np.searchsorted(ids, found), -1)  # ids are ascending (LMDB key order)
    keep = rows != queries[:, None]
    keep[keep.all(axis=1), -1] = False  # self not among the results: drop the extra one instead
    return scores[keep].reshape(len(queries), width), rows[keep].reshape(len(queries), width)
