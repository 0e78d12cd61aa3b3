"""The one-command demo: generated birds -> pretrained baseline -> Circle Loss fine-tune -> index the unseen
test classes -> evaluate the index -> example queries -> before/after Recall@K table and an HTML report.

Everything lives under one output folder (nothing is downloaded):
  data/             the generated set (CUB format; reused when it already matches the settings)
  report-pretrained/  eval of the pretrained encoder on the test split
  run/              the fine-tune run directory (weights, encoder.json, metrics.json, curves.png)
  test-images/      one symbolic link per test class into data/images: what gets indexed
  db/               the index (LMDB + FAISS), built with the fine-tuned encoder
  report/           eval of the index, side by side with the pretrained result (report.html)
  queries/, query.html   new images of test classes (another seed) and their results
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from retrieval.errors import DataError
from retrieval.eval_config import DEFAULT_KS

if TYPE_CHECKING:  # the steps import their heavy modules when they run
    from indexer.query import QueryResult
    from retrieval.data.generate import GeneratedSet
    from retrieval.eval_dataset import EvalResult
    from retrieval.metrics import Metrics

T = TypeVar("T")

MARKER = "demo.json"
STEPS = ("generate data", "evaluate pretrained", "fine-tune", "index test split", "evaluate index", "query")
_OWNED = ("report-pretrained", "run", "test-images", "db", "report", "queries", "query.html", "query_thumbs")


@dataclass(frozen=True)
class DemoConfig:
    """Demo settings; the defaults take a few minutes on 2 CPU cores (3 epochs: most of the fine-tune default's
    gain on the generated set in 3/5 of its time)."""

    out: Path = Path("demo")
    classes: int = 40
    per_class: int = 30
    size: int = 160
    epochs: int = 3
    model: str = "lite0"
    seed: int = 0
    workers: int | None = None  # None: each step's own default (decode.default_workers)
    device: str = "cpu"
    k: int = 5  # results per example query
    n_queries: int = 4
    ks: tuple[int, ...] = DEFAULT_KS


@dataclass(frozen=True)
class DemoResult:
    out: Path
    before: Metrics
    after: Metrics
    table: str
    report: Path
    query_page: Path
    queries: list[QueryResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"out": str(self.out), "before": self.before, "after": self.after, "report": str(self.report),
                "query_page": str(self.query_page), "queries": [q.to_json() for q in self.queries],
                "seconds": self.seconds}


def run_demo(cfg: DemoConfig, *, progress: bool = False) -> DemoResult:
    """Run every step of the demo into cfg.out (see the module docstring) and return the before/after figures."""
    from tqdm import tqdm

    out = _prepare_out(Path(cfg.out))
    seconds: dict[str, float] = {}
    bar = tqdm(total=len(STEPS), desc="demo", unit="step", disable=not progress, position=0, leave=True)

    def step(name: str, fn: Callable[[], T]) -> T:
        bar.set_description(f"demo: {name}")
        start = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        bar.update()
        return value

    with bar:
        data = step(STEPS[0], lambda: _generate(cfg, out))
        before = step(STEPS[1], lambda: _evaluate_pretrained(cfg, data, out, progress))
        run_dir = step(STEPS[2], lambda: _finetune(cfg, data, out, progress))
        db = step(STEPS[3], lambda: _index(cfg, data, run_dir, out, progress))
        after = step(STEPS[4], lambda: _evaluate_index(cfg, db, out))
        queries = step(STEPS[5], lambda: _query(cfg, db, out))
    from retrieval.report import Comparison, metrics_table

    table = metrics_table(after.report.metrics, cfg.ks, compare=Comparison("pretrained", before.report.metrics),
                          name="fine-tuned")
    assert after.files is not None  # _evaluate_index always writes its report
    return DemoResult(out, before.report.metrics, after.report.metrics, table, after.files.html,
                      out / "query.html", queries, seconds)


def _prepare_out(out: Path) -> Path:
    """A new folder, or one a previous demo made (its outputs are replaced; the generated data is reused)."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DataError(out, "exists and is not a demo folder; pass a new or empty --out")
        for name in _OWNED:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"demo": "circle-retrieval"}) + "\n")
    return out


def _generate(cfg: DemoConfig, out: Path) -> GeneratedSet:
    from retrieval.data.generate import GenerateConfig, make_dataset

    return make_dataset(GenerateConfig(out / "data", cfg.classes, cfg.per_class, cfg.size, cfg.seed))


def _evaluate_pretrained(cfg: DemoConfig, data: GeneratedSet, out: Path, progress: bool) -> EvalResult:
    from retrieval.data.decode import default_workers
    from retrieval.eval_config import DatasetEvalConfig
    from retrieval.eval_dataset import evaluate_dataset

    return evaluate_dataset(DatasetEvalConfig(
        dataset="cub", root=data.root, model=cfg.model, split="test", ks=cfg.ks,
        workers=default_workers(cfg.device, minimum=0) if cfg.workers is None else cfg.workers,
        device=cfg.device, report=out / "report-pretrained", progress=progress))


def _finetune(cfg: DemoConfig, data: GeneratedSet, out: Path, progress: bool) -> Path:
    from retrieval.finetune import FinetuneConfig, run_finetune

    run_finetune(FinetuneConfig(   # P is lowered by finetune itself when there are fewer train classes
        out=out / "run", dataset="cub", root=data.root, model=cfg.model, epochs=cfg.epochs,
        workers=cfg.workers, seed=cfg.seed, device=cfg.device,
        head_init="fixed",   # starts from the encoder step 2 evaluated, so "before" is the run's own epoch 0
        val_fraction=0.0,    # all 20 train classes train; the test split chooses the kept epoch (the log says so)
    ), progress=progress)
    return out / "run"


def _index(cfg: DemoConfig, data: GeneratedSet, run_dir: Path, out: Path, progress: bool) -> Path:
    """Index a folder holding only the test classes: one relative symbolic link per class folder."""
    from indexer.build.pipeline import IndexConfig, run_index
    from retrieval.data import load_records, split_records

    images = data.root / "images"
    folder = out / "test-images"
    folder.mkdir()
    test_classes = sorted({r.path.parent.name for r in split_records(load_records("cub", data.root), "test")})
    for name in test_classes:
        os.symlink(os.path.relpath(images / name, folder), folder / name, target_is_directory=True)
    db = out / "db"
    run_index(IndexConfig(folder=folder, db_dir=db, model=str(run_dir), workers=cfg.workers, device=cfg.device),
              progress=progress)
    return db


def _evaluate_index(cfg: DemoConfig, db: Path, out: Path) -> EvalResult:
    from indexer.eval_db import DbEvalConfig, evaluate_db

    return evaluate_db(DbEvalConfig(db=db, ks=cfg.ks, report=out / "report",
                                    compare=out / "report-pretrained" / "report.json", device=cfg.device))


def _query(cfg: DemoConfig, db: Path, out: Path) -> list[QueryResult]:
    """New pictures of test classes (drawn with another seed, so not in the index) as example queries."""
    from indexer.query import QueryConfig, expand_queries, run_query, write_query_html
    from retrieval.data import load_records, split_records
    from retrieval.data.generate import GenerateConfig, make_dataset

    fresh = make_dataset(GenerateConfig(out / "queries", cfg.classes, 1, cfg.size, cfg.seed + 1))
    test = split_records(load_records("cub", fresh.root), "test")
    step = max(1, len(test) // cfg.n_queries)
    paths = expand_queries([r.path for r in test[::step][: cfg.n_queries]])
    results = run_query(QueryConfig(db=db, images=paths, k=cfg.k, device=cfg.device))
    write_query_html(results, out / "query.html")
    return results
