"""Reports: numbers recomputed by hand, HTML escaping, links confined to the report folder, thumbnails."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.report import (
    Comparison,
    Ranking,
    build_report,
    class_scores,
    load_comparison,
    metrics_table,
    sample_rows,
    write_query_page,
    write_report,
)

EVIL = "<script>alert(1)</script>"


class _Links(HTMLParser):
    """Collects every src/href in a page and every text node."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _images(tmp_path: Path, classes: int = 3, per_class: int = 4) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for c in range(classes):
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            # The first image's name carries a script tag ("/" cannot be in a file name, so it sits in a folder).
            name = "<script>alert(1)<.jpg" if (c, i) == (0, 0) else f"img{i}.jpg"
            path = folder / name
            Image.new("RGB", (200, 150), (40 * c, 60 * i % 255, 90)).save(path, quality=90)
            paths.append(str(path))
            labels.append(c)
    return paths, np.array(labels)


def _ranking(paths: list[str], labels: np.ndarray, k: int = 5, seed: int = 0) -> Ranking:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(paths), 8)) + 1.5 * np.eye(8)[labels]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return Ranking(
        paths=paths,
        labels=labels,
        class_names=[f"class{c}" for c in range(labels.max() + 1)],
        queries=np.arange(len(paths)),
        neighbours=order,
        scores=np.take_along_axis(sims, order, axis=1),
    )


def test_class_scores_match_a_loop(tmp_path):
    paths, labels = _images(tmp_path)
    ranking = _ranking(paths, labels)
    scores = {c.name: c for c in class_scores(ranking, 4)}
    for c in range(3):
        rows = [i for i in range(len(paths)) if labels[i] == c]
        r1 = sum(labels[ranking.neighbours[i, 0]] == c for i in rows) / len(rows)
        r4 = sum(any(labels[j] == c for j in ranking.neighbours[i, :4]) for i in rows) / len(rows)
        assert scores[f"class{c}"].recall_at_1 == pytest.approx(r1)
        assert scores[f"class{c}"].recall_at_k == pytest.approx(r4)
        assert scores[f"class{c}"].n_queries == len(rows)
    ordered = class_scores(ranking, 4)
    assert [c.recall_at_1 for c in ordered] == sorted(c.recall_at_1 for c in ordered)


def test_sample_rows_mark_hits_and_misses(tmp_path):
    paths, labels = _images(tmp_path)
    ranking = _ranking(paths, labels)
    rows = sample_rows(ranking, n=6, top=3)
    assert len(rows) == 6
    for row in rows:
        i = paths.index(row.query)
        assert [c.path for c in row.results] == [paths[j] for j in ranking.neighbours[i, :3]]
        assert [c.hit for c in row.results] == [bool(labels[j] == labels[i]) for j in ranking.neighbours[i, :3]]
        assert [c.rank for c in row.results] == [1, 2, 3]


def test_html_report_escapes_names_and_links_only_inside(tmp_path):
    paths, labels = _images(tmp_path)
    ranking = _ranking(paths, labels)
    metrics = {"recall@1": 0.5, "recall@2": 0.75, "map@r": 0.3, "r_precision": 0.4, "n_queries": 12, "n_classes": 3}
    report = build_report(EVIL, {"db": EVIL}, (1, 2), metrics, ranking, n_samples=len(paths), top=4)
    out = tmp_path / "report"
    files = write_report(report, out)

    page = files.html.read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;.jpg" in page  # the evil file name, escaped
    parser = _Links()
    parser.feed(page)
    assert "script" not in parser.tags
    assert parser.links, "the page links its thumbnails, curve and JSON"
    for link in parser.links:
        target = (out / link).resolve()
        assert target.is_relative_to(out.resolve()), link
        assert target.is_file(), link
    # Thumbnails are small files inside the folder, one per distinct image, never the originals.
    assert len(files.thumbnails) == len(paths)
    for thumb in files.thumbnails:
        assert thumb.resolve().is_relative_to(out.resolve())
        with Image.open(thumb) as im:
            assert max(im.size) <= 96
    assert files.curve.read_bytes().startswith(b"\x89PNG")
    data = json.loads(files.json.read_text())
    assert data["metrics"] == metrics and data["ks"] == [1, 2]
    assert len(data["samples"]) == len(paths)
    assert "| recall@1 | 0.5000 |" in files.markdown.read_text()


def test_unreadable_image_gets_no_link(tmp_path):
    paths, labels = _images(tmp_path, classes=2, per_class=2)
    Path(paths[1]).write_bytes(b"not an image")
    page = write_query_page(sample_rows(_ranking(paths, labels, k=3), n=4, top=3), tmp_path / "q.html")
    parser = _Links()
    parser.feed(page.read_text())
    assert "(image unavailable)" in page.read_text()
    assert all((tmp_path / link).is_file() for link in parser.links)
    assert all(link.startswith("q_thumbs/") for link in parser.links)


def test_compare_with_report_and_run_dir(tmp_path):
    base = {"recall@1": 0.25, "recall@2": 0.5, "map@r": 0.1, "r_precision": 0.2, "n_queries": 10, "n_classes": 2}
    first = write_report(build_report("pretrained", {}, (1, 2), base), tmp_path / "before")
    assert load_comparison(first.json) == Comparison("pretrained", base)
    assert load_comparison(tmp_path / "before") == Comparison("pretrained", base)

    run = tmp_path / "run"
    run.mkdir()
    # A fine-tune run's metrics.json: the best epoch is what the run directory's weights give.
    epochs = [{"epoch": 0, "loss": None, "recall@1": 0.3, "map@r": 0.1},
              {"epoch": 1, "loss": 0.9, "recall@1": 0.6, "map@r": 0.2},
              {"epoch": 2, "loss": 0.8, "recall@1": 0.5, "map@r": 0.15}]
    (run / "metrics.json").write_text(json.dumps({"config": {"epochs": 2}, "baseline": epochs[0], "best_epoch": 1,
                                                  "best": epochs[1], "epochs": epochs}))
    best = load_comparison(run)
    assert best == Comparison("run", {"recall@1": 0.6, "map@r": 0.2})

    after = dict(base, **{"recall@1": 0.75})
    table = metrics_table(after, (1, 2), compare=load_comparison(first.json), name="fine-tuned")
    assert "| recall@1 | 0.7500 | 0.2500 | +0.5000 |" in table
    files = write_report(build_report("fine-tuned", {}, (1, 2), after), tmp_path / "after", compare=best)
    assert json.loads(files.json.read_text())["compare"]["metrics"]["recall@1"] == 0.6
    assert "+0.1500" in files.markdown.read_text()


def test_compare_without_metrics_is_an_error(tmp_path):
    from retrieval.errors import RetrievalError

    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RetrievalError, match="no Recall@K"):
        load_comparison(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrievalError, match="no report.json"):
        load_comparison(tmp_path / "empty")
    with pytest.raises(RetrievalError, match="cannot read"):
        load_comparison(tmp_path / "missing.json")


def test_query_page_thumbnail_folder_is_quoted_in_src(tmp_path):
    """The thumbnail folder is named after the --html file: a '"', '#' or '%' in it must neither break the
    attribute nor change the URL."""
    from urllib.parse import unquote

    paths, labels = _images(tmp_path, classes=2, per_class=2)
    page = write_query_page(sample_rows(_ranking(paths, labels, k=3), n=4, top=3), tmp_path / 'a"b#c%d.html')
    parser = _Links()
    parser.feed(page.read_text())
    assert parser.links and all(link.startswith("a%22b%23c%25d_thumbs/") for link in parser.links)
    assert all((tmp_path / unquote(link)).is_file() for link in parser.links)
