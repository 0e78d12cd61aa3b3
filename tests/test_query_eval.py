"""`query` and `eval` end to end on a tiny encoder: own image first, JSON shapes, stdin and folders, every error
case, and eval numbers recomputed by brute force from the DB's stored embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from indexer.build.pipeline import IndexSummary
from indexer.store.lmdb_store import Store
from tests.index_support import make_folder, save_run, write_image

REPO = Path(__file__).resolve().parents[1]
KS = (1, 2, 4)


def _index(folder: Path, db: Path, model: Path, ann: str = "auto") -> IndexSummary:
    from indexer.build.pipeline import IndexConfig, run_index

    return run_index(IndexConfig(folder=folder, db_dir=db, model=str(model), workers=0, ann=ann))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_spec, tmp_path_factory) -> Path:
    return save_run(tiny_model_spec, tmp_path_factory.mktemp("encoder") / "run", embed_dim=16)


@pytest.fixture(scope="module")
def indexed(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, db): 3 classes x 5 images, plus one unlabelled image directly in the folder (a distractor)."""
    root = tmp_path_factory.mktemp("indexed")
    folder = root / "images"
    make_folder(folder, classes=3, per_class=5)
    write_image(folder / "loose.jpg", 999)
    _index(folder, root / "db", tiny_run)
    return folder, root / "db"


def _invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def _query_json(*args: str, input: str | None = None) -> list[dict]:
    result = _invoke("query", *args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------- query


def test_query_returns_the_indexed_image_first_with_the_documented_shape(indexed):
    folder, db = indexed
    image = folder / "class1" / "img002.jpg"
    out = _query_json(str(image), "--db", str(db), "-k", "4")
    assert len(out) == 1 and set(out[0]) == {"query", "results", "served_by"}
    assert out[0]["query"] == str(image)
    with Store.open(db) as store:
        assert out[0]["served_by"] == {"generation": 1, "fingerprint": store.header().encoder.fingerprint}
    results = out[0]["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(set(r) == {"rank", "path", "score", "label"} for r in results)
    assert results[0]["path"] == str(image.resolve())
    assert results[0]["label"] == "class1"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert results[0]["score"] > results[1]["score"]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_query_table_lists_rank_similarity_label_path(indexed):
    folder, db = indexed
    image = folder / "class0" / "img000.jpg"
    result = _invoke("query", str(image), "--db", str(db), "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"query: {image}"
    assert lines[1].split() == ["rank", "similarity", "label", "path"]
    assert lines[2].split() == ["1", "1.0000", "class0", str(image.resolve())]
    assert len(lines) == 4


def test_folder_and_stdin_queries_share_one_run(indexed):
    folder, db = indexed
    by_folder = _query_json(str(folder / "class2"), "--db", str(db), "-k", "1")
    assert [q["query"] for q in by_folder] == [str(folder / "class2" / f"img{i:03d}.jpg") for i in range(5)]
    assert all(q["results"][0]["path"] == str(Path(q["query"]).resolve()) for q in by_folder)

    paths = [folder / "class0" / "img001.jpg", folder / "loose.jpg"]
    by_stdin = _query_json("-", "--db", str(db), "-k", "1", input="\n".join(map(str, paths)) + "\n\n")
    assert [q["query"] for q in by_stdin] == [str(p) for p in paths]
    assert by_stdin[1]["results"][0]["label"] == ""  # the unlabelled image finds itself

    mixed = _query_json(str(paths[0]), "-", "--db", str(db), "-k", "1", input=f"{paths[1]}\n")
    assert [q["query"] for q in mixed] == [str(p) for p in paths]


def test_query_html_page_has_thumbnails_beside_it(indexed, tmp_path):
    import re

    folder, db = indexed
    page = tmp_path / "out" / "q.html"
    args = (str(folder / "class1"), "--db", str(db), "-k", "3")
    result = _invoke("query", *args, "--html", str(page))
    assert result.exit_code == 0, result.output
    shown = {q["query"] for q in _query_json(*args)} | {r["path"] for q in _query_json(*args) for r in q["results"]}
    thumbs = sorted((tmp_path / "out" / "q_thumbs").iterdir())
    assert len(thumbs) == len(shown)  # one small file per distinct image shown
    links = re.findall(r'(?:src|href)="([^"]*)"', page.read_text())
    assert set(links) == {f"q_thumbs/{t.name}" for t in thumbs}  # only the thumbnails, never the originals


def test_query_errors_are_one_line(indexed, tiny_run, tiny_model_spec, tmp_path):
    folder, db = indexed
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture")
    _one_line_error(_invoke("query", str(bad), "--db", str(db)), str(bad))
    _one_line_error(_invoke("query", str(folder / "class0" / "img000.jpg"), "--db", str(tmp_path / "nodb")),
                    "no index DB")
    (tmp_path / "empty").mkdir()
    _index(tmp_path / "empty", tmp_path / "emptydb", tiny_run)
    _one_line_error(_invoke("query", str(folder / "class0" / "img000.jpg"), "--db", str(tmp_path / "emptydb")),
                    "empty")
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=7, embed_dim=16)
    _one_line_error(_invoke("query", str(folder / "class0" / "img000.jpg"), "--db", str(db), "--model", str(other)),
                    "was built with encoder")
    _one_line_error(_invoke("query", str(tmp_path / "empty"), "--db", str(db)), "no query images")
    _one_line_error(_invoke("query", "-", "--db", str(db), input=""), "no query images")
    _one_line_error(_invoke("query", str(folder / "class0" / "img000.jpg"), "--db", str(db), "-k", "0"), "-k")


@pytest.mark.slow
def test_query_missing_db_in_a_real_process_prints_one_line(tmp_path):
    out = subprocess.run([sys.executable, "cli.py", "query", "x.jpg", "--db", str(tmp_path / "nodb")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "no index DB" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------------------------------- eval


def _stored(db: Path) -> tuple[np.ndarray, list[str]]:
    """Embeddings and labels of every item, read straight from LMDB."""
    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        return snap.vectors(ids), [item.label for item in snap.items(ids)]


def _brute_force(emb: np.ndarray, labels: list[str], ks=KS, query_emb: np.ndarray | None = None) -> dict:
    """Leave-one-out metrics by plain loops in float64; unlabelled items are distractors, never queries.
    Item q queries with `query_emb[q]` when given (an expanded query), else with its own embedding."""
    sims = (emb if query_emb is None else query_emb).astype(np.float64) @ emb.astype(np.float64).T
    n = len(labels)
    recall = {k: 0 for k in ks}
    aps, rps, queries = [], [], 0
    for q in range(n):
        if not labels[q]:
            continue
        queries += 1
        order = sorted((j for j in range(n) if j != q), key=lambda j: (-sims[q, j], j))
        rel = [labels[j] == labels[q] for j in order]
        for k in ks:
            recall[k] += any(rel[:k])
        r = sum(rel)
        if r:
            precision_hits = [sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]]
            aps.append(sum(precision_hits) / r)
            rps.append(sum(rel[:r]) / r)
    return {**{f"recall@{k}": recall[k] / queries for k in ks}, "map@r": float(np.mean(aps)),
            "r_precision": float(np.mean(rps)), "n_queries": queries,
            "n_classes": len({label for label in labels if label})}


def test_eval_db_equals_brute_force(indexed):
    _, db = indexed
    result = _invoke("eval", "--db", str(db), "--k", "4,1,2", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    emb, labels = _stored(db)
    expected = _brute_force(emb, labels)
    assert expected["n_queries"] == 15 and expected["n_classes"] == 3
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert "exact" not in got  # the index is exact (Flat)

    table = _invoke("eval", "--db", str(db), "--k", "1,2,4")
    assert table.exit_code == 0
    assert f"| recall@1 | {expected['recall@1']:.4f} |" in table.output


def _expanded_brute_force(emb: np.ndarray, k: int, alpha: float, *, leave_out_self: bool = True) -> np.ndarray:
    """Every item's aQE query by loops: itself + its k most similar other items (ties: lower row) weighted by
    max(cosine, 0) ** alpha, normalised."""
    e = emb.astype(np.float64)
    out = np.empty_like(e)
    for q in range(len(e)):
        others = sorted((j for j in range(len(e)) if j != q or not leave_out_self), key=lambda j: (-(e[q] @ e[j]), j))
        total = e[q] + sum(max(e[q] @ e[j], 0.0) ** alpha * e[j] for j in others[:k])
        out[q] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize(("k", "alpha"), [(3, 3.0), (2, 0.0)])
def test_eval_db_with_expansion_equals_brute_force_and_never_expands_with_the_query_itself(indexed, k, alpha):
    _, db = indexed
    result = _invoke("eval", "--db", str(db), "--k", "1,2,4", "--expand", str(k), "--expand-alpha", str(alpha),
                     "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    emb, labels = _stored(db)
    expected = _brute_force(emb, labels, query_emb=_expanded_brute_force(emb, k, alpha))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    plain = _brute_force(emb, labels)
    assert got["compare"]["name"] == "plain search"
    for key, value in plain.items():
        assert got["compare"]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    with_self = _brute_force(emb, labels, query_emb=_expanded_brute_force(emb, k, alpha, leave_out_self=False))
    assert with_self["map@r"] != pytest.approx(expected["map@r"], abs=1e-6)   # so the check above could fail


def test_eval_db_expansion_report_shows_plain_search_beside_it(indexed, tmp_path):
    _, db = indexed
    report = tmp_path / "report"
    table = _invoke("eval", "--db", str(db), "--k", "1,2,4", "--expand", "2", "--report", str(report))
    assert table.exit_code == 0, table.output
    assert "query expansion k=2 alpha=3" in table.output and "plain search" in table.output
    saved = json.loads((report / "report.json").read_text())
    assert saved["compare"]["name"] == "plain search" and saved["source"]["expand"] == "k=2 alpha=3"
    assert "plain search" in (report / "report.md").read_text()
    both = _invoke("eval", "--db", str(db), "--expand", "2", "--compare", str(report))
    _one_line_error(both, "--expand", "--compare")
    assert _invoke("eval", "--dataset", "cub", "--root", str(tmp_path), "--expand", "2").exit_code == 2


def test_query_with_expansion_searches_with_the_expanded_embedding(indexed):
    folder, db = indexed
    image = folder / "class2" / "img001.jpg"
    out = _query_json(str(image), "--db", str(db), "-k", "5", "--expand", "3", "--expand-alpha", "1")[0]["results"]
    emb, _ = _stored(db)
    from indexer.store.lmdb_store import Store

    with Store.open(db) as store, store.snapshot() as snap:
        paths = [str(folder.resolve() / item.relpath) for item in snap.items(snap.ids())]
    own = paths.index(str(image.resolve()))
    # the query is the indexed image (the same decoding and embedding), so its first pass finds itself first
    e = emb.astype(np.float64)
    first = sorted(range(len(e)), key=lambda j: (-(e[own] @ e[j]), j))[:3]
    total = e[own] + sum(max(e[own] @ e[j], 0.0) * e[j] for j in first)
    sims = e @ (total / np.linalg.norm(total))
    order = sorted(range(len(e)), key=lambda j: (-sims[j], j))[:5]
    assert [r["path"] for r in out] == [paths[j] for j in order]
    assert [r["score"] for r in out] == pytest.approx([sims[j] for j in order], abs=1e-5)


def test_eval_db_with_an_approximate_index_reports_exact_search_and_the_gap(tiny_run, tmp_path):
    import faiss

    from indexer.store import ann

    folder = tmp_path / "images"
    make_folder(folder, classes=4, per_class=8)
    db = tmp_path / "db"
    assert _index(folder, db, tiny_run, ann="IVF2,SQ4").ann.factory == "IVF2,SQ4"
    got = json.loads(_invoke("eval", "--db", str(db), "--k", "1,2,4", "--json").output)

    emb, labels = _stored(db)
    exact = _brute_force(emb, labels)
    for key, value in exact.items():
        assert got["exact"][key] == pytest.approx(value, abs=1e-6), key
    # The approximate figures: the same loop over FAISS's candidates (REFINE_FACTOR x the neighbours eval asks
    # for, as SQ is lossy) re-ranked by their exact scores, self removed.
    from retrieval.metrics import neighbour_width

    index = faiss.read_index(str(db / ann.ANN_FILE))
    codes = np.unique(labels, return_inverse=True)[1]
    width = (neighbour_width(codes, KS) + 1) * ann.REFINE_FACTOR
    _, found = index.search(emb, width)
    exact_scores = np.take_along_axis(emb @ emb.T, found.clip(min=0), axis=1)
    found = np.take_along_axis(found, np.argsort(-np.where(found >= 0, exact_scores, -np.inf), axis=1, kind="stable"),
                               axis=1)
    recall1 = np.mean([labels[next(j for j in row if j != q)] == labels[q] for q, row in enumerate(found)])
    assert got["recall@1"] == pytest.approx(recall1)
    for k in KS:
        assert got["gap"][f"recall@{k}"] == pytest.approx(got["exact"][f"recall@{k}"] - got[f"recall@{k}"])
    # with expansion: the exact column is the expanded brute force, the plain comparison is FAISS's own figures
    expanded = json.loads(_invoke("eval", "--db", str(db), "--k", "1,2,4", "--expand", "2", "--json").output)
    for key, value in _brute_force(emb, labels, query_emb=_expanded_brute_force(emb, 2, 3.0)).items():
        assert expanded["exact"][key] == pytest.approx(value, abs=1e-6), key
    assert expanded["compare"]["metrics"]["recall@1"] == pytest.approx(got["recall@1"])


def test_eval_dataset_shares_finetunes_numbers_and_writes_a_compared_report(tiny_run, tmp_path):
    from retrieval.data import load_records, split_records
    from retrieval.data.generate import GenerateConfig, make_dataset
    from retrieval.embed import evaluate_records
    from retrieval.encoder import load_encoder

    data = Path(make_dataset(GenerateConfig(tmp_path / "birds", classes=4, per_class=4, size=32)).root)
    other = tmp_path / "run"
    other.mkdir()
    row = {"epoch": 1, "loss": 0.5, "recall@1": 0.125, "recall@2": 0.25, "recall@4": 0.5, "map@r": 0.1}
    (other / "metrics.json").write_text(json.dumps({"baseline": dict(row, epoch=0), "best": row, "epochs": [row]}))
    report = tmp_path / "report"
    result = _invoke("eval", "--dataset", "cub", "--root", str(data), "--model", str(tiny_run), "--k", "1,2,4",
                     "--report", str(report), "--compare", str(other), "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)

    expected = evaluate_records(load_encoder(str(tiny_run)), split_records(load_records("cub", data), "test"),
                                ks=KS).metrics
    for key in ("recall@1", "recall@2", "recall@4", "map@r", "r_precision", "n_queries", "n_classes"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["compare"] == {"name": "run", "metrics": {k: v for k, v in row.items() if k not in ("epoch", "loss")}}
    assert got["report"] == str(report / "report.html")
    saved = json.loads((report / "report.json").read_text())
    assert saved["compare"]["metrics"]["recall@1"] == 0.125
    assert len(saved["samples"]) == 8  # every test image (2 classes x 4) is a sample at this size
    assert f"{got['recall@1'] - 0.125:+.4f}" in (report / "report.md").read_text()
    # pairs.png is drawn and shown in both pages
    with open(report / "pairs.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "(pairs.png)" in (report / "report.md").read_text()
    assert '<img src="pairs.png"' in (report / "report.html").read_text()


def test_eval_needs_exactly_one_mode(indexed, tmp_path):
    _, db = indexed
    assert _invoke("eval").exit_code == 2
    assert _invoke("eval", "--db", str(db), "--dataset", "cub", "--root", str(tmp_path)).exit_code == 2
    assert _invoke("eval", "--db", str(db), "--model", "lite0").exit_code == 2
    assert _invoke("eval", "--dataset", "cub").exit_code == 2
    assert _invoke("eval", "--db", str(db), "--k", "0,1").exit_code == 2
    _one_line_error(_invoke("eval", "--db", str(tmp_path / "nodb")), "no index DB")
