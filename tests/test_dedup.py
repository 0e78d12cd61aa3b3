"""`dedup` on a generated set: smooth random photos, planted altered copies (JPEG re-encoded, resized, cropped,
mirrored) whose embeddings sit near their originals', and decoys (other photos given an embedding as close):
exactly the planted groups come back; candidates against a brute-force cosine matrix; CLI shapes and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from cli import cli
from indexer.dedup import DEFAULT_THRESHOLD, Pairs, candidate_pairs, components
from indexer.store.search import SearchIndex
from tests.index_support import unit_vectors, write_db

REPO = Path(__file__).resolve().parents[1]
DIM = 32


def _photo(seed: int) -> Image.Image:
    """A smooth random picture (a 6 x 5 colour grid blown up to 150 x 120), photo-like for a perceptual hash."""
    grid = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((150, 120), Image.Resampling.BICUBIC)


def _alter(im: Image.Image, kind: str) -> Image.Image:
    w, h = im.size
    if kind == "half":
        return im.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if kind == "crop":
        return im.crop((4, 3, w - 4, h - 3))  # about 5%
    if kind == "mirror":
        return ImageOps.mirror(im)
    return im  # "jpeg": the same pixels, saved again at quality 60


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, set[frozenset[str]]]:
    """(folder, db, the planted groups as sets of relative paths): 30 photos in 3 classes, 5 copies (one photo
    with two), and 3 decoys whose embeddings are as close to another photo's as the copies' are."""
    root = tmp_path_factory.mktemp("dedup")
    folder = root / "images"
    vectors = dict(zip([f"class{i % 3}/photo{i:02d}.jpg" for i in range(30)], unit_vectors(30, DIM, seed=3),
                       strict=True))
    for i, rel in enumerate(vectors):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _photo(i).save(folder / rel, quality=90)
    rng = np.random.default_rng(4)

    def near(v: np.ndarray) -> np.ndarray:
        x = v + 0.25 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        return x / np.linalg.norm(x)

    groups = {}
    for i, kind in [(1, "jpeg"), (4, "half"), (7, "crop"), (10, "mirror"), (10, "half")]:
        original = f"class{i % 3}/photo{i:02d}.jpg"
        copy = f"class{i % 3}/copy{i:02d}_{kind}.jpg"
        with Image.open(folder / original) as im:
            _alter(im.convert("RGB"), kind).save(folder / copy, quality=60)
        vectors[copy] = near(vectors[original])
        groups.setdefault(original, {original}).add(copy)
    for i, of in [(50, 2), (51, 5), (52, 8)]:
        decoy = f"class{of % 3}/decoy{i}.jpg"
        _photo(i).save(folder / decoy, quality=90)
        vectors[decoy] = near(vectors[f"class{of % 3}/photo{of:02d}.jpg"])
    write_db(root / "db", folder, list(vectors.items()), batch=8)
    return folder, root / "db", {frozenset(g) for g in groups.values()}


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _dedup_json(db: Path, *extra: str) -> dict:
    result = _invoke("dedup", "--db", str(db), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dedup_finds_the_planted_copies_and_nothing_else(planted):
    folder, db, truth = planted
    out = _dedup_json(db)
    found = {frozenset(str(Path(m["path"]).relative_to(folder)) for m in g["members"]) for g in out["groups"]}
    assert found == truth
    assert [len(g["members"]) for g in out["groups"]] == sorted((len(g) for g in truth), reverse=True)
    assert out["candidates"] == out["duplicates"] + 3  # the three decoys are candidates, rejected by their pixels
    assert out["unchecked"] == 0 and out["items"] == 38
    with SearchIndex.open(db) as index:
        for group in out["groups"]:
            ids = [m["id"] for m in group["members"]]
            assert ids[0] == min(ids)  # the first indexed is the one kept
            vectors = index.vectors(ids)
            np.testing.assert_allclose([m["score"] for m in group["members"]], vectors @ vectors[0], atol=1e-5)
            assert [m["score"] for m in group["members"][1:]] == sorted((m["score"] for m in group["members"][1:]),
                                                                         reverse=True)


def test_a_strict_match_or_a_high_threshold_finds_less(planted):
    folder, db, truth = planted
    assert _dedup_json(db, "--max-diff", "0")["duplicates"] < sum(len(g) - 1 for g in truth)
    assert _dedup_json(db, "--threshold", "0.9999")["groups"] == []


def test_candidates_are_every_pair_above_the_threshold(planted):
    """With neighbours >= N the kNN candidates are exactly the pairs of the full cosine matrix >= threshold."""
    _, db, _ = planted
    with SearchIndex.open(db) as index:
        ids = index.ids()
        vectors = index.vectors(ids)
        for threshold in (DEFAULT_THRESHOLD, 0.3, 0.0):
            pairs = candidate_pairs(index, threshold, neighbours=len(ids), batch=7)
            sims = vectors @ vectors.T
            i, j = np.nonzero(np.triu(sims >= threshold, k=1))
            assert sorted(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)) == \
                sorted(zip(ids[i].tolist(), ids[j].tolist(), strict=True))
            np.testing.assert_allclose(pairs.score, sims[np.searchsorted(ids, pairs.a), np.searchsorted(ids, pairs.b)],
                                       atol=1e-5)


def test_components_match_a_transitive_closure():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 40, 30)
    b = rng.integers(0, 40, 30)
    keep = a < b
    pairs = Pairs(a[keep], b[keep], np.ones(int(keep.sum()), np.float32))
    reach = np.eye(40, dtype=bool)
    reach[pairs.a, pairs.b] = reach[pairs.b, pairs.a] = True
    for _ in range(6):  # paths of up to 2**6 edges
        reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    touched = np.unique(np.concatenate([pairs.a, pairs.b]))
    expected = {frozenset(np.flatnonzero(reach[i]).tolist()) for i in touched}
    got = components(pairs)
    assert {frozenset(g.tolist()) for g in got} == expected
    assert [len(g) for g in got] == sorted((len(g) for g in got), reverse=True)


def test_dedup_html_shows_the_groups_inside_its_folder(planted, tmp_path):
    folder, db, truth = planted
    report = tmp_path / "report"
    result = _invoke("dedup", "--db", str(db), "--html", str(report))
    assert result.exit_code == 0, result.output
    assert f"{len(truth)} groups of near-duplicates among 38 images" in result.output
    page = (report / "index.html").read_text()
    assert page.count("<tr>") == len(truth)
    sources = [s.split('"')[0] for s in page.split('src="')[1:]]
    assert len(sources) == sum(len(g) for g in truth)
    for src in sources:
        assert not src.startswith(("/", "http")) and ".." not in src and (report / src).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary left


def test_dedup_escapes_names_in_the_page(tmp_path):
    folder = tmp_path / "images"
    rels = ["a/<b>one.jpg", "a/<b>two.jpg"]
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _photo(7).save(folder / rel, quality=90)
    v = unit_vectors(1, DIM, seed=9)[0]
    write_db(tmp_path / "db", folder, [(rels[0], v), (rels[1], v)])
    result = _invoke("dedup", "--db", str(tmp_path / "db"), "--html", str(tmp_path / "page"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "page" / "index.html").read_text()
    assert "<b>one" not in page and "&lt;b&gt;one.jpg" in page


def test_dedup_errors_are_one_line(planted, tmp_path):
    _, db, _ = planted

    def one_line(result, fragment: str) -> None:
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output

    one_line(_invoke("dedup", "--db", str(tmp_path / "nodb")), "no index DB")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    one_line(_invoke("dedup", "--db", str(db), "--html", str(tmp_path / "taken")), "already exists")
    out_of_range = _invoke("dedup", "--db", str(db), "--threshold", "1.5")  # click's usage error (exit 2)
    assert out_of_range.exit_code == 2 and "Invalid value for '--threshold'" in out_of_range.output


@pytest.mark.slow
def test_dedup_missing_db_in_a_real_process_prints_one_line(tmp_path):
    out = subprocess.run([sys.executable, "cli.py", "dedup", "--db", str(tmp_path / "nodb"), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "no index DB" in out.stderr
