"""Evaluation reports: report.json, report.md, a Recall@K curve PNG and report.html with thumbnails.

The HTML page is safe to open from anywhere: every file name is escaped, and every link or image points
to a file written inside the report folder (small JPEG thumbnails, never the originals).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from retrieval.data.walk import printable
from retrieval.errors import DecodeError, RetrievalError

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CURVE_PNG = "recall_at_k.png"
THUMBS = "thumbs"
THUMB_SIZE = 96
SUMMARY_KEYS = ("map@r", "r_precision")
COUNT_KEYS = ("n_queries", "n_classes")
_PAIRS = "pairs.png"   # retrieval.pairs.PAIRS_PNG, named here without importing the plotting module


@dataclass(frozen=True)
class Ranking:
    """Who retrieved whom in one evaluation: enough to draw sample queries and per-class scores.

    `neighbours[i]` are indices into `paths`/`labels` for the query `paths[queries[i]]`, best first;
    a label of -1 marks an unlabelled item (never relevant to any query).
    """

    paths: Sequence[str]
    labels: np.ndarray
    class_names: Sequence[str]
    queries: np.ndarray
    neighbours: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Cell:
    """One retrieved item in a grid row; `hit` is None when the query has no label."""

    rank: int
    path: str
    label: str
    score: float
    hit: bool | None


@dataclass(frozen=True)
class Row:
    """A query image and its top results."""

    query: str
    label: str | None
    results: tuple[Cell, ...]


@dataclass(frozen=True)
class ClassScore:
    """Per-class retrieval quality (classes are ranked worst first in a report)."""

    name: str
    n_queries: int
    recall_at_1: float
    recall_at_k: float
    k: int


@dataclass(frozen=True)
class Report:
    """Everything a report shows; `exact` holds exact-search metrics when the index is approximate."""

    title: str
    source: dict[str, str]
    ks: tuple[int, ...]
    metrics: dict[str, float]
    classes: tuple[ClassScore, ...] = ()
    samples: tuple[Row, ...] = ()
    exact: dict[str, float] | None = None


@dataclass(frozen=True)
class Comparison:
    """Metrics of another result to show side by side (a report.json or a fine-tune run's metrics.json)."""

    name: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by `write_report`."""

    json: Path
    markdown: Path
    curve: Path
    html: Path
    thumbnails: tuple[Path, ...] = field(default=())
    pairs: Path | None = None


def class_scores(ranking: Ranking, k: int) -> list[ClassScore]:
    """Recall@1 and Recall@k per query class, worst first (ties broken by name, so the order is stable)."""
    query_labels = ranking.labels[ranking.queries]
    found = _neighbour_labels(ranking) == query_labels[:, None]
    k = min(k, found.shape[1])
    out = []
    for label in np.unique(query_labels):
        rows = found[query_labels == label]
        out.append(
            ClassScore(
                name=ranking.class_names[int(label)],
                n_queries=len(rows),
                recall_at_1=float(rows[:, 0].mean()),
                recall_at_k=float(rows[:, :k].any(axis=1).mean()),
                k=k,
            )
        )
    return sorted(out, key=lambda c: (c.recall_at_1, c.recall_at_k, c.name))


def sample_rows(ranking: Ranking, *, n: int = 12, top: int = 5, seed: int = 0) -> list[Row]:
    """Sample queries for the HTML grid: half misses at rank 1 (the instructive ones), half hits, seeded."""
    query_labels = ranking.labels[ranking.queries]
    hit1 = _neighbour_labels(ranking)[:, 0] == query_labels
    rng = np.random.default_rng(seed)
    misses, hits = np.flatnonzero(~hit1), np.flatnonzero(hit1)
    n_miss = min(len(misses), max(n // 2, n - len(hits)))
    chosen = np.concatenate([rng.permutation(misses)[:n_miss], rng.permutation(hits)[: n - n_miss]])
    return [_row(ranking, int(i), top) for i in sorted(chosen)]


def build_report(
    title: str,
    source: dict[str, str],
    ks: Sequence[int],
    metrics: dict[str, float],
    ranking: Ranking | None = None,
    *,
    exact: dict[str, float] | None = None,
    n_samples: int = 12,
    top: int = 5,
    n_worst: int = 10,
) -> Report:
    """Bundle metrics with per-class scores and sample queries drawn from `ranking` (when given)."""
    ks = tuple(ks)
    classes = tuple(class_scores(ranking, max(ks))[:n_worst]) if ranking is not None else ()
    samples = tuple(sample_rows(ranking, n=n_samples, top=top)) if ranking is not None else ()
    return Report(title, dict(source), ks, dict(metrics), classes, samples, exact)


def load_comparison(path: str | Path) -> Comparison:
    """Read the metrics to compare against: a report.json, a run's metrics.json, or a folder holding either.

    For a fine-tune run its "best" epoch is used (the weights the run directory keeps); a bare list of
    epochs gives the one with the best Recall@1.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / REPORT_JSON, path / "metrics.json"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise RetrievalError(f"{path}: no {REPORT_JSON} or metrics.json to compare with")
        path = found[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RetrievalError(f"{path}: cannot read metrics to compare with ({exc})") from None
    name = path.parent.name or str(path.parent)
    metrics = _metrics_in(data)
    if metrics is None:
        raise RetrievalError(f"{path}: no Recall@K metrics found to compare with")
    if isinstance(data, dict) and isinstance(data.get("title"), str):
        name = data["title"]
    return Comparison(name, metrics)


def metrics_table(
    metrics: dict[str, float],
    ks: Sequence[int],
    *,
    compare: Comparison | None = None,
    exact: dict[str, float] | None = None,
    name: str = "this",
) -> str:
    """A Markdown table (also readable on a terminal): one row per metric, optional comparison and delta."""
    header, rows = metric_rows(metrics, ks, compare=compare, exact=exact, name=name)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(_md_cell(cell) for cell in line) + " |" for line in lines)


def metric_rows(
    metrics: dict[str, float],
    ks: Sequence[int],
    *,
    compare: Comparison | None = None,
    exact: dict[str, float] | None = None,
    name: str = "this",
) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: metric, value, [exact search, gap = exact - value], [other, delta]."""
    header = ["metric", name]
    if exact is not None:
        header += ["exact search", "gap"]
    if compare is not None:
        header += [compare.name, "delta"]
    rows = []
    for key in [f"recall@{k}" for k in ks] + list(SUMMARY_KEYS) + list(COUNT_KEYS):
        if key not in metrics:
            continue
        cells = [key, _fmt(metrics[key])]
        if exact is not None:
            cells += [_fmt(exact.get(key)), _delta(exact.get(key), metrics.get(key), key)]
        if compare is not None:
            other = compare.metrics.get(key)
            cells += [_fmt(other), _delta(metrics.get(key), other, key)]
        rows.append(cells)
    return header, rows


def write_report(
    report: Report, out_dir: str | Path, *, compare: Comparison | None = None, thumb_size: int = THUMB_SIZE,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> ReportFiles:
    """Write report.json, report.md, the Recall@K curve PNG and report.html (+ thumbs/) into `out_dir`; with
    `pairs` ((s_n, s_p) per query, see retrieval.pairs) also pairs.png, shown in both pages."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    thumbs = _Thumbnailer(out, THUMBS, thumb_size)
    files = ReportFiles(out / REPORT_JSON, out / REPORT_MD, out / CURVE_PNG, out / REPORT_HTML)
    files.json.write_text(json.dumps(_report_dict(report, compare), indent=2) + "\n")
    plot_recall_curve(report, files.curve, compare=compare)
    pairs_png = None
    if pairs is not None:
        from .losses import LOSS_DEFAULTS
        from .pairs import PAIRS_PNG, plot_pairs

        m = float(LOSS_DEFAULTS["circle"]["m"])   # type: ignore[arg-type]
        pairs_png = plot_pairs({report.title: pairs}, out / PAIRS_PNG, m=m, margin=m,
                               title="each query: hardest negative vs hardest positive cosine")
    files.markdown.write_text(_markdown(report, compare, pairs_png is not None))
    files.html.write_text(_html(report, compare, thumbs, pairs_png is not None))
    return ReportFiles(files.json, files.markdown, files.curve, files.html, tuple(thumbs.written), pairs_png)


def write_query_page(rows: Sequence[Row], html_file: str | Path, *, thumb_size: int = THUMB_SIZE,
                     title: str = "Query results", lead: str = "query") -> Path:
    """A stand-alone page of query images and their top results; thumbnails go to `<name>_thumbs/` beside it.
    `lead` names each row's first image (dedup: the member kept)."""
    html_file = Path(html_file)
    html_file.parent.mkdir(parents=True, exist_ok=True)
    thumbs = _Thumbnailer(html_file.parent, f"{html_file.stem}_thumbs", thumb_size)
    body = f"<h1>{html.escape(title)}</h1>\n" + _grid(rows, thumbs, lead)
    html_file.write_text(_page(title, body))
    return html_file


def plot_recall_curve(report: Report, png: Path, *, compare: Comparison | None = None) -> Path:
    """Recall@K against K (log2 axis) for this result, its exact-search variant and the comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    series = [(report.title, report.metrics, "o-")]
    if report.exact is not None:
        series.append(("exact search", report.exact, "s--"))
    if compare is not None:
        series.append((compare.name, compare.metrics, "^-"))
    for name, metrics, style in series:
        ks = [k for k in report.ks if f"recall@{k}" in metrics]
        ax.plot(ks, [metrics[f"recall@{k}"] for k in ks], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(report.ks), [str(k) for k in report.ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


# -- internals -------------------------------------------------------------------------------------------


def _neighbour_labels(ranking: Ranking) -> np.ndarray:
    """Labels of the neighbours; a missing neighbour (-1) gets a label no query has."""
    labels = np.where(ranking.neighbours >= 0, ranking.labels[np.maximum(ranking.neighbours, 0)], -2)
    return labels


def _row(ranking: Ranking, i: int, top: int) -> Row:
    q = int(ranking.queries[i])
    q_label = int(ranking.labels[q])
    cells = []
    for rank, (j, score) in enumerate(zip(ranking.neighbours[i, :top], ranking.scores[i, :top], strict=True), start=1):
        if j < 0:
            break
        label = int(ranking.labels[j])
        name = ranking.class_names[label] if label >= 0 else ""
        cells.append(Cell(rank, str(ranking.paths[j]), name, float(score), label == q_label))
    return Row(str(ranking.paths[q]), ranking.class_names[q_label], tuple(cells))


def _metrics_in(data: object) -> dict[str, float] | None:
    """Find a flat {"recall@1": ...} dict in a report.json or a fine-tune metrics.json (best epoch)."""
    if isinstance(data, dict):
        if any(str(k).startswith("recall@") for k in data):
            keys = set(SUMMARY_KEYS) | set(COUNT_KEYS)
            return {k: v for k, v in data.items() if (k.startswith("recall@") or k in keys) and _number(v)}
        for key in ("metrics", "best", "epochs"):  # report.json; metrics.json of a fine-tune run
            if key in data and (found := _metrics_in(data[key])) is not None:
                return found
        return None
    if isinstance(data, list):
        candidates = [m for m in (_metrics_in(x) for x in data) if m is not None]
        return max(candidates, key=lambda m: m.get("recall@1", 0.0), default=None)
    return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and value > 1):
        return str(int(value))
    return f"{float(value):.4f}"


def _delta(a: float | None, b: float | None, key: str) -> str:
    if a is None or b is None or key in COUNT_KEYS:
        return ""
    return f"{float(a) - float(b):+.4f}"


def _report_dict(report: Report, compare: Comparison | None) -> dict:
    data = asdict(report)
    data["ks"] = list(report.ks)
    data["compare"] = asdict(compare) if compare is not None else None
    return data


def _markdown(report: Report, compare: Comparison | None, pairs: bool = False) -> str:
    parts = [f"# {report.title}", ""]
    parts += [f"- {key}: `{value}`" for key, value in report.source.items()]
    table = metrics_table(report.metrics, report.ks, compare=compare, exact=report.exact, name=report.title)
    parts += ["", table, ""]
    parts += [f"![Recall@K]({CURVE_PNG})", ""]
    if pairs:
        parts += [f"![each query's hardest negative vs hardest positive cosine]({_PAIRS})", ""]
    parts += [f"Sample queries with thumbnails: [{REPORT_HTML}]({REPORT_HTML})", ""]
    if report.classes:
        k = report.classes[0].k
        parts += ["## Worst classes", "", f"| class | queries | recall@1 | recall@{k} |", "|---|---|---|---|"]
        parts += [
            f"| {_md_cell(c.name)} | {c.n_queries} | {c.recall_at_1:.4f} | {c.recall_at_k:.4f} |"
            for c in report.classes
        ]
        parts.append("")
    return "\n".join(parts)


def _html(report: Report, compare: Comparison | None, thumbs: _Thumbnailer, pairs: bool = False) -> str:
    e = html.escape
    source = "".join(f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in report.source.items())
    body = [f"<h1>{e(report.title)}</h1>", f"<ul>{source}</ul>", _html_metrics(report, compare)]
    body.append(f'<p><img src="{CURVE_PNG}" alt="Recall@K curve"></p>')
    if pairs:
        body.append(f'<p><img src="{_PAIRS}" alt="hardest negative vs hardest positive cosine per query"></p>')
    body.append(f'<p>Also: <a href="{REPORT_MD}">{REPORT_MD}</a> · <a href="{REPORT_JSON}">{REPORT_JSON}</a></p>')
    if report.samples:
        body += ["<h2>Sample queries</h2>", "<p>✓ green: same class as the query; ✗ red: another class.</p>"]
        body.append(_grid(report.samples, thumbs))
    if report.classes:
        k = report.classes[0].k
        rows = "".join(
            f"<tr><td>{e(c.name)}</td><td>{c.n_queries}</td><td>{c.recall_at_1:.4f}</td>"
            f"<td>{c.recall_at_k:.4f}</td></tr>"
            for c in report.classes
        )
        body += [
            "<h2>Worst classes</h2>",
            f"<table><tr><th>class</th><th>queries</th><th>recall@1</th><th>recall@{k}</th></tr>{rows}</table>",
        ]
    return _page(report.title, "\n".join(body))


def _html_metrics(report: Report, compare: Comparison | None) -> str:
    header, rows = metric_rows(report.metrics, report.ks, compare=compare, exact=report.exact, name=report.title)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid(rows: Sequence[Row], thumbs: _Thumbnailer, lead: str = "query") -> str:
    def e(text: str) -> str:
        return html.escape(printable(text))

    out = ['<table class="grid">']
    for row in rows:
        label = f"<br>{e(row.label)}" if row.label is not None else ""
        first = f"<br><b>{html.escape(lead)}</b>{label}{_caption(row.query)}"
        cells = [f'<td class="query">{thumbs.img(row.query)}{first}</td>']
        for c in row.results:
            mark, sign = ("", "") if c.hit is None else ((" hit", "✓ ") if c.hit else (" miss", "✗ "))
            cells.append(
                f'<td class="result{mark}">{thumbs.img(c.path)}<br>{sign}#{c.rank} · {c.score:.3f}'
                f"<br>{e(c.label)}{_caption(c.path)}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _caption(path: str) -> str:
    shown = printable(path)  # a name that is not UTF-8 is shown escaped; the file itself is opened by `path`
    return f'<br><span class="name" title="{html.escape(shown)}">{html.escape(shown.rpartition("/")[2])}</span>'


def _page(title: str, body: str) -> str:
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 6px;font-size:12px;vertical-align:top;text-align:center}"
        ".grid td{width:110px}.hit{background:#d8f5d0}.miss{background:#f8d4d4}.query{background:#e4ecfa}"
        ".name{color:#555;word-break:break-all}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


class _Thumbnailer:
    """Writes one small JPEG per distinct source image under `root/folder` with a generated name."""

    def __init__(self, root: Path, folder: str, size: int):
        self.root, self.folder, self.size = root, folder, size
        self.names: dict[str, str | None] = {}
        self.written: list[Path] = []

    def img(self, source: str) -> str:
        name = self._thumb(source)
        if name is None:
            return '<div class="missing">(image unavailable)</div>'
        src = html.escape(f"{quote(os.fsencode(self.folder))}/{name}")  # the folder comes from the --html file's name
        return f'<img src="{src}" alt="" width="{self.size}" loading="lazy">'

    def _thumb(self, source: str) -> str | None:
        if source not in self.names:
            self.names[source] = self._write(source, f"t{len(self.names):04d}.jpg")
        return self.names[source]

    def _write(self, source: str, name: str) -> str | None:
        from retrieval.data.decode import load_image

        try:
            image = load_image(source, draft_size=self.size).image
        except DecodeError as exc:
            log.warning("no thumbnail for %s: %s", source, exc.reason)
            return None
        image.thumbnail((self.size, self.size))
        dst = self.root / self.folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        image.save(dst, "JPEG", quality=80)
        self.written.append(dst)
        return name
