"""Result collapsing (`query --dedup T`, `/api/search?dedup=T`): against a brute-force definition (transitive
closure of cosine >= T, best-ranked of each group kept), on hits read from a DB, and end to end in both commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from indexer.store.collapse import collapse_hits, keep_distinct
from indexer.store.read import Hit, hits_of
from indexer.store.search import SearchIndex
from tests.index_support import make_folder, unit_vectors, write_db


def _brute_keep(vectors: np.ndarray, threshold: float) -> list[int]:
    """Row i is kept iff no better-ranked row is reachable from it through links of cosine >= threshold."""
    n = len(vectors)
    reach = (vectors @ vectors.T) >= threshold
    for _ in range(int(np.ceil(np.log2(max(n, 2)))) + 1):
        reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    return [i for i in range(n) if not reach[i, :i].any()]


def _ranked_with_copies(seed: int) -> np.ndarray:
    """40 unit vectors in a random order, 15 of them near copies (some of copies: chains)."""
    rng = np.random.default_rng(seed)
    base = list(unit_vectors(25, 16, seed=seed))
    for _ in range(15):
        x = base[rng.integers(len(base))] + 0.1 * rng.standard_normal(16) / 4
        base.append((x / np.linalg.norm(x)).astype(np.float32))
    return np.array(base)[rng.permutation(len(base))]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99, 0.3, -1.0])
def test_keep_distinct_matches_the_transitive_closure(seed, threshold):
    vectors = _ranked_with_copies(seed)
    kept = keep_distinct(vectors, threshold).tolist()
    assert kept == _brute_keep(vectors, threshold)
    if threshold == -1.0:
        assert kept == [0]
    assert keep_distinct(vectors[:0], threshold).tolist() == []


def test_collapse_hits_keeps_the_best_of_each_group_and_renumbers(tmp_path):
    vectors = _ranked_with_copies(3)
    ids = write_db(tmp_path / "db", tmp_path, [(f"c/{i:02d}.jpg", v) for i, v in enumerate(vectors)])
    with SearchIndex.open(tmp_path / "db") as index:
        scores, found = index.search(vectors[:1], len(vectors))
        hits = hits_of(index, scores[0], found[0])
        gone = Hit(len(hits) + 1, "/nowhere.jpg", 0.0, "", 10_000, "nowhere.jpg")  # an id the snapshot lacks
        collapsed = collapse_hits(index, (*hits, gone), 0.95)
        expected = [hits[i] for i in _brute_keep(index.vectors([h.id for h in hits]), 0.95)]
    assert len(collapsed) < len(hits)
    assert [h.id for h in collapsed] == [h.id for h in expected]
    assert [h.rank for h in collapsed] == list(range(1, len(collapsed) + 1))
    assert [h.score for h in collapsed] == [h.score for h in expected]
    assert sorted(ids) == sorted(h.id for h in hits)


@pytest.fixture(scope="module")
def with_copies(tiny_run_dir, tmp_path_factory) -> tuple[Path, Path]:
    """3 x 4 noise images plus two byte copies of class0/img000.jpg (same content: the same embedding)."""
    from indexer.build.pipeline import IndexConfig, run_index

    root = tmp_path_factory.mktemp("collapse")
    folder = root / "images"
    make_folder(folder, classes=3, per_class=4)
    for name in ("copy_a.jpg", "copy_b.jpg"):
        shutil.copy(folder / "class0" / "img000.jpg", folder / "class1" / name)
    run_index(IndexConfig(folder=folder, db_dir=root / "db", model=str(tiny_run_dir), workers=0))
    return folder, root / "db"


def _query(folder: Path, db: Path, *extra: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["query", str(folder / "class0" / "img000.jpg"), "--db", str(db), "-k", "5",
                                      "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)[0]["results"]


def test_query_dedup_collapses_copies_and_still_returns_k(with_copies):
    folder, db = with_copies
    plain = _query(folder, db)
    copies = {str(folder / rel) for rel in ("class0/img000.jpg", "class1/copy_a.jpg", "class1/copy_b.jpg")}
    assert {h["path"] for h in plain[:3]} == copies  # the same embedding: the top three
    collapsed = _query(folder, db, "--dedup", "0.999")
    assert len(collapsed) == 5 and [h["rank"] for h in collapsed] == [1, 2, 3, 4, 5]
    assert sum(h["path"] in copies for h in collapsed) == 1
    top = _query(folder, db, "-k", "20")
    with SearchIndex.open(db) as index:  # what collapsing the top 20 by brute force gives
        by_path = {str(index.root / it.relpath): it.id for it in index.iter_items()}
        vectors = index.vectors([by_path[h["path"]] for h in top])
    assert [h["path"] for h in collapsed] == [top[i]["path"] for i in _brute_keep(vectors, 0.999)][:5]


def test_query_dedup_out_of_range_is_one_line(with_copies):
    folder, db = with_copies
    result = CliRunner().invoke(cli, ["query", str(folder / "class0" / "img000.jpg"), "--db", str(db),
                                      "--dedup", "1.5"])
    assert result.exit_code == 1 and result.output.strip().startswith("Error:") and "--dedup" in result.output


def test_api_search_dedup(with_copies):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from indexer.serve.app import create_app
    from indexer.serve.engine import ServeConfig

    folder, db = with_copies
    expected, plain_expected = _query(folder, db, "--dedup", "0.999"), _query(folder, db)  # before the app opens db
    data = (folder / "class0" / "img000.jpg").read_bytes()
    with TestClient(create_app(ServeConfig(db=db, device="cpu", show_paths=True))) as client:
        answer = client.post("/api/search?k=5&dedup=0.999", files={"image": ("q.jpg", data, "image/jpeg")})
        assert answer.status_code == 200, answer.text
        got = answer.json()["results"]
        assert [(h["rank"], h["path"]) for h in got] == [(h["rank"], h["path"]) for h in expected]
        plain = client.post("/api/search?k=5", files={"image": ("q.jpg", data, "image/jpeg")}).json()["results"]
        assert [h["path"] for h in plain] == [h["path"] for h in plain_expected]
        bad = client.post("/api/search?k=5&dedup=2", files={"image": ("q.jpg", data, "image/jpeg")})
        assert bad.status_code == 422
