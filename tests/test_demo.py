"""The one-command demo, end to end on a tiny setting: every step runs and the figures agree across steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli

TINY = ("--classes", "4", "--per-class", "4", "--size", "32", "--epochs", "1", "--workers", "0", "--no-progress")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_spec, tmp_path_factory) -> Path:
    """The tiny encoder saved as a run directory, as the demo's starting model."""
    from retrieval.encoder import load_encoder, save_encoder

    out = tmp_path_factory.mktemp("encoder") / "run"
    save_encoder(load_encoder(tiny_model_spec, embed_dim=16), out)
    return out


def test_demo_runs_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--model", str(tiny_run), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)

    # Before = the fine-tune run's own baseline (epoch 0); after (eval of the index built with the fine-tuned
    # encoder) = the run's best epoch: three code paths, one set of numbers.
    run = json.loads((out / "run" / "metrics.json").read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert summary["before"][key] == pytest.approx(run["baseline"][key]), key
        assert summary["after"][key] == pytest.approx(run["best"][key]), key
    # Only the 2 unseen test classes are indexed (4 images each).
    assert summary["after"]["n_classes"] == 2 and summary["after"]["n_queries"] == 8
    assert sorted(p.name for p in (out / "test-images").iterdir()) == sorted(
        p.name for p in sorted((out / "data" / "images").iterdir())[2:])

    assert summary["report"] == str(out / "report" / "report.html") and Path(summary["report"]).is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["compare"]["metrics"]["recall@1"] == summary["before"]["recall@1"]
    assert (out / "report-pretrained" / "report.html").is_file()
    assert Path(summary["query_page"]).is_file()
    # Example queries are new pictures of test classes, not indexed ones; their hits are indexed test images.
    assert len(summary["queries"]) == 2
    for query in summary["queries"]:
        assert Path(query["query"]).is_relative_to(out / "queries")
        assert all(Path(hit["path"]).is_relative_to((out / "test-images").resolve()) for hit in query["results"])
    assert set(summary["seconds"]) == {"generate data", "evaluate pretrained", "fine-tune", "index test split",
                                       "evaluate index", "query"}


def test_demo_table_and_rerun_in_the_same_folder(tiny_run, tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):  # a second run replaces the first one's outputs (and reuses its data)
        result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--model", str(tiny_run), *TINY])
        assert result.exit_code == 0, result.output
    assert "| metric | fine-tuned | pretrained | delta |" in result.output
    assert result.output.rstrip().endswith(f"report:  {out / 'report' / 'report.html'}")


def test_demo_refuses_a_folder_it_did_not_make(tiny_run, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--model", str(tiny_run), *TINY])
    assert result.exit_code == 1 and "not a demo folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"
