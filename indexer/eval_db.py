"""`eval --db`: every labelled item of an index DB queries the rest of the DB (itself excluded).

The stored embeddings are ranked exactly (`metrics.rank_leave_one_out`); when the DB's FAISS index is
approximate (IVF, HNSW, PQ), the same queries also go through FAISS, and the report shows both and the gap.
Both rankings are scored by `metrics.ranking_metrics`, the function `finetune` and `eval --dataset` use.
Unlabelled items (files directly in the indexed folder) are never queries but stay in the database as
distractors.

With `expand` (alpha query expansion, indexer.store.expand) each query is expanded with its top hits of the
plain leave-one-out ranking (so never with itself), and that ranking's shortlist (`Expansion.width`) is ranked
again by the expanded query, as `query` and `serve` rank it; the plain metrics become the side-by-side
comparison of the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import IndexStoreError, RetrievalError
from retrieval.eval_config import DEFAULT_KS
from retrieval.eval_dataset import SAMPLE_TOP, EvalResult, make_result
from retrieval.metrics import neighbour_width, rank_leave_one_out, ranking_metrics
from retrieval.report import Comparison, Ranking, load_comparison

from .store.expand import Expansion, expanded_ranking

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
    expand: Expansion = Expansion()  # k = 0: plain search only
    generation: int | None = None  # an index generation other than the live one (e.g. a candidate before a switch)


def evaluate_db(cfg: DbEvalConfig) -> EvalResult:
    """Leave-one-out Recall@K, MAP@R, R-Precision of the DB's labelled items, through its FAISS index."""
    from indexer.store.search import SearchIndex

    if cfg.compare is not None and cfg.expand.k:
        raise RetrievalError("--expand shows plain search side by side, in the place of --compare: pass one of them")
    if cfg.compare is not None:
        load_comparison(cfg.compare)  # fail before the slow part
    with SearchIndex.open(cfg.db, generation=cfg.generation) as index:
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
        width = neighbour_width(labels, cfg.ks, SAMPLE_TOP)
        fetch = cfg.expand.width(width) if cfg.expand.k else width  # expansion re-ranks a wider shortlist
        queries, scores, neighbours = rank_leave_one_out(vectors, labels, cfg.ks, top=fetch, device=cfg.device)
        rankings = [(scores, neighbours)]  # exact first; FAISS's own when the index is approximate
        if index.approximate:
            rankings.append(_faiss_neighbours(index, ids, vectors[queries], queries, fetch))
        if cfg.expand.k:
            plain = ranking_metrics(labels, queries, rankings[-1][1][:, :width], cfg.ks)
            rankings = [expanded_ranking(vectors[queries], s, rows, vectors.__getitem__, cfg.expand, width)
                        for s, rows in rankings]
        header, factory, root, gen = index.header, index.factory, index.root, index.generation_id
    scores, neighbours = rankings[-1]
    metrics = ranking_metrics(labels, queries, neighbours, cfg.ks)
    exact_metrics = ranking_metrics(labels, queries, rankings[0][1], cfg.ks) if len(rankings) > 1 else None
    ranking = Ranking([str(root / it.relpath) for it in items], labels, class_names, queries, neighbours, scores)
    source = {"db": str(cfg.db), "root": header.root, "model": header.encoder.spec,
              "fingerprint": header.encoder.fingerprint, "index": factory, "generation": str(gen),
              "engine": f"{header.encoder.engine} {header.encoder.precision}"}
    title = (f"index {Path(cfg.db).name} generation {gen} "
             f"(encoder {Path(header.encoder.spec).name or header.encoder.spec})")
    comparison: Path | Comparison | None = cfg.compare
    if cfg.expand.k:
        source["expand"] = f"k={cfg.expand.k} alpha={cfg.expand.alpha:g}"
        title += f", query expansion k={cfg.expand.k} alpha={cfg.expand.alpha:g}"
        comparison = Comparison("plain search", plain)
    return make_result(title, source, cfg.ks, metrics, ranking, exact=exact_metrics, report_dir=cfg.report,
                       compare=comparison, embeddings=vectors)


def _faiss_neighbours(index: SearchIndex, ids: np.ndarray, query_vectors: np.ndarray, queries: np.ndarray,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-`width` of each query vector (indices into `ids`), the query's own row left out."""
    scores, found = index.search(query_vectors, width + 1)
    rows = np.where(found >= 0, np.searchsorted(ids, found), -1)  # ids are ascending (LMDB key order)
    return _drop_own(scores, rows, queries, width)


def _drop_own(scores: np.ndarray, rows: np.ndarray, queries: np.ndarray,
              width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first `width` columns (of `width` + 1) that are not its own query row."""
    keep = rows != queries[:, None]
    keep[keep.all(axis=1), -1] = False  # self not among the results: drop the extra one instead
    return scores[keep].reshape(len(queries), width), rows[keep].reshape(len(queries), width)
