"""Index generations end to end with tiny encoders: a DB written before generations opens as generation 1 with
nothing re-encoded; another --model builds a generation beside the live one and switches; rollback, roll
forward, drop, keep, --no-switch + eval --generation, --reembed, the disk estimate's refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from indexer.build import pipeline
from indexer.build.pipeline import IndexConfig, run_index
from indexer.eval_db import DbEvalConfig, evaluate_db
from indexer.store import ann, generations
from indexer.store.generations import ID_SPAN, generation_dir
from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from retrieval.errors import IndexStoreError
from tests.index_support import assert_ann_matches_lmdb, assert_same_state, db_state, make_folder, save_run, write_image

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _cfg(folder: Path, db: Path, model: Path, **kw) -> IndexConfig:
    return IndexConfig(folder=folder, db_dir=db, model=str(model), **{"batch_size": 4, "workers": 0, **kw})


def _invoke(*args: str) -> object:
    result = CliRunner().invoke(cli.cli, list(args))
    return result


def _listing(db: Path) -> dict[int, dict]:
    result = CliRunner().invoke(cli.cli, ["generations", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    return {g["id"]: g for g in json.loads(result.output)}


def _fresh(folder: Path, tmp_path: Path, model: Path, name: str) -> dict:
    run_index(_cfg(folder, tmp_path / name, model))
    return db_state(tmp_path / name)


def _served_by(db: Path, image: Path) -> tuple[dict, list[dict]]:
    result = CliRunner().invoke(cli.cli, ["query", str(image), "--db", str(db), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)[0]
    return out["served_by"], out["results"]


@pytest.fixture(scope="module")
def encoders(tiny_model_spec, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Three encoders: A (8-d), B (16-d, other weights), C (8-d, other weights)."""
    root = tmp_path_factory.mktemp("encoders")
    return (save_run(tiny_model_spec, root / "a"), save_run(tiny_model_spec, root / "b", perturb=1, embed_dim=16),
            save_run(tiny_model_spec, root / "c", perturb=2))


def test_a_db_from_before_generations_is_generation_1_and_nothing_is_re_encoded(tmp_path, encoders):
    """A first run writes exactly the layout every earlier version wrote (LMDB and FAISS files in the DB folder,
    no pointer): such a DB is generation 1, in place."""
    a, b, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=4)
    fingerprint = run_index(_cfg(folder, db, a)).fingerprint
    (db / generations.LOCK).unlink()  # the one file earlier versions did not write
    assert sorted(p.name for p in db.iterdir()) == ["ann.faiss", "ann.json", "data.mdb", "index.lock", "lock.mdb"]
    before = db_state(db)
    assert not (db / generations.POINTER).exists() and generations.on_disk(db) == [1]
    listed = _listing(db)
    assert list(listed) == [1] and listed[1]["state"] == "live" and listed[1]["items"] == 8
    assert listed[1]["fingerprint"] == fingerprint

    again = run_index(_cfg(folder, db, a))  # the same encoder: an incremental run in place, nothing encoded
    assert (again.encoded, again.unchanged, again.generation, again.live_generation) == (0, 8, 1, 1)
    assert_same_state(db_state(db), before)
    switched = run_index(_cfg(folder, db, b))
    assert (switched.generation, switched.live_generation, switched.encoded) == (2, 2, 8)
    assert_same_state(db_state(db), before)  # generation 1 untouched, still in place
    assert generations.resolve(db) == (2, generation_dir(db, 2))


def test_switch_rollback_drop_keep_and_roll_forward(tmp_path, encoders):
    a, b, c = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=3, per_class=4)
    image = folder / "class1/img002.jpg"
    first = run_index(_cfg(folder, db, a))
    gen1 = db_state(db)
    fingerprint_a = first.fingerprint

    result = _invoke("index", str(folder), "--db", str(db), "--model", str(b), "--batch-size", "4", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "generation 2" in result.output and "live generation: 2" in result.output
    gen2 = db_state(generation_dir(db, 2))
    assert_same_state(gen2, _fresh(folder, tmp_path, b, "fresh_b"))
    assert_same_state(db_state(db), gen1)  # the old generation is kept whole, for a rollback
    assert_ann_matches_lmdb(generation_dir(db, 2))
    listed = _listing(db)
    assert {g: listed[g]["state"] for g in listed} == {1: "previous", 2: "live"}
    assert listed[2]["dim"] == 16 and listed[2]["items"] == 12 and listed[2]["disk_bytes"] > 0
    served, results = _served_by(db, image)
    fingerprint_b = listed[2]["fingerprint"]
    assert served == {"generation": 2, "fingerprint": fingerprint_b} and results[0]["path"] == str(image.resolve())
    with SearchIndex.open(db) as index:
        assert index.generation_id == 2 and index.ids().min() >= ID_SPAN  # ids never collide with generation 1's

    rollback = _invoke("generations", "--db", str(db), "--activate", "1")
    assert rollback.exit_code == 0 and "*   1  live" in rollback.output, rollback.output
    assert _served_by(db, image)[0] == {"generation": 1, "fingerprint": fingerprint_a}
    refused = _invoke("generations", "--db", str(db), "--drop", "1")
    assert refused.exit_code == 1 and "is live" in refused.output and "Traceback" not in refused.output
    missing = _invoke("generations", "--db", str(db), "--activate", "9")
    assert missing.exit_code == 1 and "no generation 9" in missing.output

    write_image(folder / "class0/new.jpg", 4242)  # a plain run with the live encoder touches the live generation only
    plain = run_index(_cfg(folder, db, a))
    assert (plain.generation, plain.encoded, plain.total) == (1, 1, 13)
    assert len(db_state(generation_dir(db, 2))) == 12

    forward = run_index(_cfg(folder, db, b))  # back to B: generation 2 is brought level and made live, no rebuild
    assert (forward.generation, forward.live_generation, forward.encoded, forward.total) == (2, 2, 1, 13)
    assert generations.on_disk(db) == [1, 2]

    third = run_index(_cfg(folder, db, c))  # keep=1: generation 1 (two switches ago) is dropped
    assert (third.generation, third.live_generation) == (3, 3)
    assert generations.on_disk(db) == [2, 3] and not (db / "data.mdb").exists() and not (db / "ann.faiss").exists()
    assert _served_by(db, image)[0]["generation"] == 3
    dropped = _invoke("generations", "--db", str(db), "--drop", "2", "--json")
    assert dropped.exit_code == 0 and [g["id"] for g in json.loads(dropped.output)] == [3]
    assert not generation_dir(db, 2).exists()
    fourth = run_index(_cfg(folder, db, a))  # ids are never reused: a new generation for A is 4, not 1 or 2
    assert fourth.generation == 4 and generations.on_disk(db) == [3, 4]
    kept = _invoke("generations", "--db", str(db), "--keep", "0")
    assert kept.exit_code == 0 and generations.on_disk(db) == [4]


def test_no_switch_builds_a_candidate_to_evaluate_then_activate(tmp_path, encoders):
    a, b, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=3, per_class=4)
    run_index(_cfg(folder, db, a))
    built = run_index(_cfg(folder, db, b, switch=False))
    assert (built.generation, built.live_generation) == (2, 1)
    assert _listing(db)[2]["state"] == "built"
    candidate = _invoke("eval", "--db", str(db), "--generation", "2", "--json")
    assert candidate.exit_code == 0 and "recall@1" in json.loads(candidate.output), candidate.output
    live, other = (evaluate_db(DbEvalConfig(db=db, ks=(1,), generation=g)).report for g in (None, 2))
    assert (live.source["generation"], other.source["generation"]) == ("1", "2")
    assert other.source["fingerprint"] == built.fingerprint != live.source["fingerprint"]
    assert "generation 2" in other.title
    assert _invoke("generations", "--db", str(db), "--activate", "2").exit_code == 0
    assert _listing(db)[2]["state"] == "live"
    bad = _invoke("eval", "--db", str(db), "--generation", "7")
    assert bad.exit_code == 1 and "no generation 7" in bad.output


def test_reembed_builds_beside_and_never_empties_the_live_generation(tmp_path, encoders):
    a, _, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    run_index(_cfg(folder, db, a))
    before = db_state(db)
    summary = run_index(_cfg(folder, db, a, reembed=True))
    assert (summary.generation, summary.live_generation, summary.encoded) == (2, 2, 6)
    assert_same_state(db_state(db), before)
    assert_same_state(db_state(generation_dir(db, 2)), before)  # same encoder, same embeddings


def test_a_build_the_disk_cannot_hold_is_refused(tmp_path, encoders, monkeypatch):
    a, b, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    run_index(_cfg(folder, db, a))
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(pipeline.shutil, "disk_usage", nearly_full)
    result = _invoke("index", str(folder), "--db", str(db), "--model", str(b), "--workers", "0")
    assert result.exit_code == 1 and "--no-disk-check" in result.output and "GiB free" in result.output
    assert generations.on_disk(db) == [1]  # nothing started
    forced = run_index(_cfg(folder, db, b, check_disk=False))
    assert forced.live_generation == 2


def test_the_estimate_covers_what_a_generation_takes(tmp_path, encoders):
    a, b, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=20)
    run_index(_cfg(folder, db, a))
    with Store.open(db) as store, store.snapshot() as snap:
        estimate = generations.estimate_bytes(snap.count(), store.disk_bytes(), 8, 16)
    run_index(_cfg(folder, db, b))
    with Store.open(generation_dir(db, 2)) as store:
        used = store.disk_bytes() + (generation_dir(db, 2) / ann.ANN_FILE).stat().st_size
    assert used <= estimate <= 4 * used


def test_a_second_writer_is_refused_while_generations_are_changed(tmp_path, encoders):
    a, _, _ = encoders
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=1, per_class=2)
    run_index(_cfg(folder, db, a))
    with generations.changing(db):
        with pytest.raises(IndexStoreError, match="locked"):
            run_index(_cfg(folder, db, a))
    assert np.isfinite(run_index(_cfg(folder, db, a)).seconds)
