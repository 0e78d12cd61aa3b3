"""`eval --dataset`: embed one split, rank it leave-one-out, and build the result (and report) `eval` prints.

The split is embedded with `embed.embed_records` and scored with `metrics.rank_leave_one_out` +
`metrics.ranking_metrics`, exactly as `finetune` scores each epoch. `eval --db` (indexer/eval_db.py) scores
stored embeddings with the same two functions and shares `EvalResult` / `make_result`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.eval_config import DatasetEvalConfig
from retrieval.metrics import Metrics, rank_leave_one_out, ranking_metrics
from retrieval.report import Comparison, Ranking, Report, ReportFiles, build_report, load_comparison, write_report

SAMPLE_TOP = 5  # results per sample query in the HTML grid


@dataclass(frozen=True)
class EvalResult:
    """Metrics (and exact-search metrics when the search was approximate), the optional comparison, and the
    report files when a report folder was asked for."""

    report: Report
    compare: Comparison | None = None
    files: ReportFiles | None = None

    def to_json(self) -> dict:
        """The `eval --json` object: the metrics flat, then "exact" and "gap" when the index is approximate."""
        out: dict = dict(self.report.metrics)
        if self.report.exact is not None:
            out["exact"] = dict(self.report.exact)
            out["gap"] = {k: self.report.exact[k] - v for k, v in self.report.metrics.items()
                          if k.startswith("recall@") and k in self.report.exact}
        if self.compare is not None:
            out["compare"] = {"name": self.compare.name, "metrics": self.compare.metrics}
        if self.files is not None:
            out["report"] = str(self.files.html)
        return out


def make_result(title: str, source: dict[str, str], ks: Sequence[int], metrics: Metrics, ranking: Ranking, *,
                exact: Metrics | None = None, report_dir: Path | None = None,
                compare: Path | Comparison | None = None, embeddings: np.ndarray | None = None) -> EvalResult:
    """Build the report (and write it when `report_dir` is given), with the comparison when asked for (its
    metrics, or a path to read them from: see load_comparison); with the `embeddings` the report also draws
    each query's hardest negative vs hardest positive (pairs.png)."""
    comparison = compare if compare is None or isinstance(compare, Comparison) else load_comparison(compare)
    report = build_report(title, source, ks, metrics, ranking, exact=exact, top=SAMPLE_TOP)
    files = None
    if report_dir is not None:
        pairs = None
        if embeddings is not None:
            from retrieval.pairs import hardest_pairs

            pairs = hardest_pairs(embeddings[ranking.queries], ranking.labels[ranking.queries])
        files = write_report(report, report_dir, compare=comparison, pairs=pairs)
    return EvalResult(report, comparison, files)


def evaluate_dataset(cfg: DatasetEvalConfig) -> EvalResult:
    """Embed one split of a data set and score it leave-one-out (the numbers `finetune` reports per epoch)."""
    from retrieval.data import load_records, split_records

    records = split_records(load_records(cfg.dataset, cfg.root, crop=cfg.crop, train_fraction=cfg.train_fraction),
                            cfg.split)
    if cfg.compare is not None:
        load_comparison(cfg.compare)  # fail before the slow part
    from retrieval.embed import embed_records
    from retrieval.encoder import load_encoder

    encoder = load_encoder(cfg.model, device=cfg.device, crop_pct=cfg.crop_pct, resize_mode=cfg.resize_mode,
                           tta=cfg.tta)
    embeddings, labels = embed_records(encoder, records, batch_size=cfg.batch_size, workers=cfg.workers,
                                       device=cfg.device, progress=cfg.progress)
    queries, scores, neighbours = rank_leave_one_out(embeddings, labels, cfg.ks, top=SAMPLE_TOP, device=cfg.device)
    metrics = ranking_metrics(labels, queries, neighbours, cfg.ks)
    names = {r.label: r.class_name for r in records}
    ranking = Ranking([str(r.path) for r in records], labels, _names_list(names), queries, neighbours, scores)
    source = {"dataset": cfg.dataset, "root": str(cfg.root), "split": cfg.split, "model": encoder.spec,
              "fingerprint": encoder.fingerprint()}
    return make_result(f"{Path(encoder.spec).name or encoder.spec} on {cfg.dataset}/{cfg.split}", source, cfg.ks,
                       metrics, ranking, report_dir=cfg.report, compare=cfg.compare, embeddings=embeddings)


def _names_list(names: dict[int, str]) -> list[str]:
    """Class names indexed by label (labels are dense over the whole data set, so a split has gaps)."""
    out = [""] * (max(names) + 1)
    for label, name in names.items():
        out[label] = name
    return out

