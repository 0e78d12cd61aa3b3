"""run_index end to end in-process with a tiny encoder: incremental runs, content reuse, bad files, binding."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from indexer.build.pipeline import IndexConfig, run_index
from indexer.store import ann
from indexer.store.layout import NewItem
from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from retrieval.compat import cpu_has_bf16
from retrieval.errors import DecodeError, EncoderError, IndexStoreError
from tests.index_support import (
    assert_ann_matches_lmdb,
    assert_same_state,
    db_state,
    make_folder,
    save_run,
    write_image,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _cfg(folder: Path, db: Path, model: Path, **kw) -> IndexConfig:
    return IndexConfig(folder=folder, db_dir=db, model=str(model), **{"batch_size": 4, "workers": 0, **kw})


def _fresh_state(folder: Path, tmp_path: Path, model: Path) -> dict:
    db = Path(tempfile.mkdtemp(dir=tmp_path))
    run_index(_cfg(folder, db, model))
    return db_state(db)


def test_incremental_add_change_delete(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=3, per_class=5)
    first = run_index(_cfg(folder, db, tiny_run_dir))
    counts = ("indexed", "encoded", "unchanged", "removed", "total")
    assert [getattr(first, k) for k in counts] == [15, 15, 0, 0, 15]
    assert_ann_matches_lmdb(db)

    again = run_index(_cfg(folder, db, tiny_run_dir))
    assert (again.indexed, again.unchanged, again.total, again.ann.action) == (0, 15, 15, "unchanged")

    write_image(folder / "class0/new1.jpg", 501)
    write_image(folder / "class3/new2.png", 502)  # a new class folder
    write_image(folder / rels[1], 503)            # same path, new content
    os.utime(folder / rels[1], ns=(1, 1))         # even with an old mtime: the size differs
    (folder / rels[2]).unlink()
    third = run_index(_cfg(folder, db, tiny_run_dir, checkpoint_seconds=0))
    assert [getattr(third, k) for k in counts] == [3, 3, 13, 1, 16]
    state = db_state(db)
    assert state["class3/new2.png"][0][0] == "class3" and rels[2] not in state
    assert_same_state(state, _fresh_state(folder, tmp_path, tiny_run_dir))
    assert_ann_matches_lmdb(db)


def test_identical_content_at_new_path_reuses_embedding(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=2, per_class=4)
    run_index(_cfg(folder, db, tiny_run_dir))
    before = db_state(db)
    shutil.copy(folder / rels[0], folder / "class1/copy.jpg")
    (folder / "moved").mkdir()
    os.rename(folder / rels[5], folder / "moved/renamed.jpg")
    summary = run_index(_cfg(folder, db, tiny_run_dir))
    assert (summary.reused, summary.encoded, summary.removed, summary.total) == (2, 0, 1, 9)
    after = db_state(db)
    np.testing.assert_array_equal(after["class1/copy.jpg"][1], before[rels[0]][1])
    np.testing.assert_array_equal(after["moved/renamed.jpg"][1], before[rels[5]][1])
    assert after["moved/renamed.jpg"][0][0] == "moved"  # the label follows the new folder
    assert_ann_matches_lmdb(db)


def _make_bad_files(folder: Path) -> dict[str, str]:
    """One file of each kind the index must skip -> a fragment of the reason it must give."""
    good = write_image(folder / "bad/source.jpg", 900).read_bytes()
    (folder / "bad/source.jpg").unlink()
    (folder / "bad/truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "bad/empty.png").write_bytes(b"")
    (folder / "bad/notes.jpg").write_text("not an image")
    write_image(folder / "bad/huge.png", 901, size=(100, 100))
    os.symlink(folder / "bad/missing.jpg", folder / "bad/broken.jpg")
    expected = {"bad/truncated.jpg": "cannot decode", "bad/empty.png": "empty file",
                "bad/notes.jpg": "not a recognised", "bad/huge.png": "too many pixels",
                "bad/broken.jpg": "broken symbolic link"}
    return expected


def test_bad_files_are_skipped_recorded_and_indexed_once_fixed(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    expected = _make_bad_files(folder)
    summary = run_index(_cfg(folder, db, tiny_run_dir, max_pixels=5000))
    reasons = {f.path: f.reason for f in summary.failures}
    assert sorted(reasons) == sorted(expected)
    for path, fragment in expected.items():
        assert fragment in reasons[path], (path, reasons[path])
    assert (summary.total, summary.failed) == (6, len(expected))
    assert_ann_matches_lmdb(db)

    again = run_index(_cfg(folder, db, tiny_run_dir, max_pixels=5000))
    assert (again.encoded, again.failed, again.total) == (0, len(expected), 6)  # unchanged: not retried
    with pytest.raises(DecodeError, match="--strict"):
        run_index(_cfg(folder, db, tiny_run_dir, max_pixels=5000, strict=True))

    write_image(folder / "bad/truncated.jpg", 902)
    (folder / "bad/broken.jpg").unlink()
    write_image(folder / "bad/missing.jpg", 903)
    os.symlink(folder / "bad/missing.jpg", folder / "bad/broken.jpg")
    (folder / "bad/notes.jpg").unlink()
    fixed = run_index(_cfg(folder, db, tiny_run_dir, max_pixels=5000))
    assert fixed.encoded == 3  # truncated.jpg, missing.jpg and the link to it
    still_bad = set(expected) - {"bad/truncated.jpg", "bad/broken.jpg", "bad/notes.jpg"}
    assert {f.path for f in fixed.failures} == still_bad
    assert set(db_state(db)) >= {"bad/truncated.jpg", "bad/broken.jpg", "bad/missing.jpg"}
    raised = run_index(_cfg(folder, db, tiny_run_dir))  # the default cap: huge.png is tried again, and taken
    assert raised.encoded == 1 and "bad/huge.png" in db_state(db)


def test_unreadable_file_is_skipped(tmp_path, tiny_run_dir):
    """A file without read permission. Root reads regardless of permissions, so as root the read runs with
    the effective uid of `nobody` (world-traversable folder, file mode 000)."""
    from indexer.build.encode import ImageFiles

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        path = write_image(base / "cls/locked.jpg", 7)
        (base / "cls").chmod(0o755)
        path.chmod(0o000)
        if os.geteuid() != 0:
            summary = run_index(_cfg(base, tmp_path / "db", tiny_run_dir))
            assert summary.to_json()["failures"] == [{"path": "cls/locked.jpg",
                                                    "reason": "cannot read file: Permission denied",
                                                    "transient": False}]
            return
        from indexer.build.scan import scan_folder

        files = ImageFiles(base, scan_folder(base).files, lambda image: image, 32, 10**6)
        os.seteuid(65534)
        try:
            loaded = files[0]
        finally:
            os.seteuid(0)
        assert loaded.error == "cannot read file: Permission denied" and loaded.tensor is None
    finally:
        shutil.rmtree(base)


def test_db_is_bound_to_its_encoder(tmp_path, tiny_run_dir, tiny_model_spec):
    """Another --model never writes into the live generation: it builds generation 2 beside it (see
    test_generations.py), which then answers only to its own encoder."""
    from indexer.store.generations import generation_dir

    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    run_index(_cfg(folder, db, tiny_run_dir))
    before = db_state(db)
    other = save_run(tiny_model_spec, tmp_path / "other", perturb=1)
    write_image(folder / "class0/more.jpg", 77)
    summary = run_index(_cfg(folder, db, other))
    assert (summary.generation, summary.encoded, summary.total) == (2, 5, 5)
    assert_same_state(db_state(db), before)  # nothing written into generation 1 with the other encoder
    assert_same_state(db_state(generation_dir(db, 2)), _fresh_state(folder, tmp_path, other))
    assert_ann_matches_lmdb(generation_dir(db, 2))
    with SearchIndex.open(db) as index:
        from retrieval.encoder import load_encoder

        index.check_encoder(load_encoder(str(other)))
        with pytest.raises(IndexStoreError, match="built with encoder"):
            index.check_encoder(load_encoder(str(tiny_run_dir)))


def test_faiss_rebuilt_from_lmdb_equals_incremental(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=3, per_class=6)
    run_index(_cfg(folder, db, tiny_run_dir))
    for step in range(3):  # grow and shrink the collection; FAISS follows by sync, not rebuild
        write_image(folder / f"class{step}/extra.jpg", 600 + step)
        (folder / rels[step * 5]).unlink()
        assert run_index(_cfg(folder, db, tiny_run_dir)).ann.action == "synced"
    incremental = ann.load_ann(db, mmap=False)
    assert run_index(_cfg(folder, db, tiny_run_dir, rebuild_ann=True)).ann.action == "rebuilt"
    rebuilt = ann.load_ann(db, mmap=False)
    with Store.open(db) as store, store.snapshot() as snap:
        queries = snap.vectors(snap.ids())
    s1, i1 = ann.search(incremental, queries, 5)
    s2, i2 = ann.search(rebuilt, queries, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    np.testing.assert_array_equal(np.sort(ann.index_ids(incremental)), np.sort(ann.index_ids(rebuilt)))


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat", "IVF2,Flat"])
def test_other_ann_kinds_stay_in_step_with_lmdb(tmp_path, tiny_run_dir, kind):
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=2, per_class=20)
    first = run_index(_cfg(folder, db, tiny_run_dir, ann=kind, batch_size=16))
    assert first.ann.factory == ann.choose_factory(kind, 40, 8)
    (folder / rels[0]).unlink()
    second = run_index(_cfg(folder, db, tiny_run_dir, ann=kind, batch_size=16))
    assert second.ann.action == ("rebuilt" if kind == "hnsw" else "synced")  # HNSW cannot remove
    assert_ann_matches_lmdb(db)


def test_search_matches_snapshot_while_faiss_lags(tmp_path, tiny_run_dir):
    """What a query sees during an index run (or after a kill): FAISS is older than LMDB."""
    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=2, per_class=8)
    run_index(_cfg(folder, db, tiny_run_dir))
    rng = np.random.default_rng(3)
    with Store.open(db, readonly=False) as store:  # LMDB moves on, FAISS is not told
        store.remove_paths([r.encode() for r in rels[:3]])
        fresh = rng.standard_normal((4, 8)).astype(np.float32)
        fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
        new_items = [NewItem(f"new/{i}.jpg", "new", 1, 1, 1, 1, rng.bytes(16), v) for i, v in enumerate(fresh)]
        store.commit_batch(new_items, [])
    with SearchIndex.open(db) as index:
        assert index.lagging and len(index) == 17
        ids = index.ids()
        vectors = index.vectors(ids)
        queries = rng.standard_normal((6, 8)).astype(np.float32)
        scores, found = index.search(queries, 5)
        exact = queries @ vectors.T
        order = np.argsort(-exact, axis=1)[:, :5]
        np.testing.assert_array_equal(found, ids[order])
        np.testing.assert_allclose(scores, np.take_along_axis(exact, order, axis=1), rtol=1e-5)
        assert [it.relpath for it in index.items(found[:, 0])] == [index.items([i])[0].relpath for i in found[:, 0]]
        wide_scores, wide = index.search(queries[:1], 40)  # more than there are: padded
        assert (wide[0, 17:] == -1).all() and np.isneginf(wide_scores[0, 17:]).all()


def test_index_refuses_a_locked_db(tmp_path, tiny_run_dir):
    folder = tmp_path / "images"
    make_folder(folder, classes=1, per_class=1)
    with Store.open(tmp_path / "db", readonly=False):
        with pytest.raises(IndexStoreError, match="locked"):
            run_index(_cfg(folder, tmp_path / "db", tiny_run_dir))


def test_an_empty_folder_does_not_wipe_a_db_unless_allowed(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "mnt", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    run_index(_cfg(folder, db, tiny_run_dir))
    before = db_state(db)
    shutil.rmtree(folder)
    folder.mkdir()                                 # the mount point is there, the drive is not
    (folder / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(cli.cli, ["index", str(folder), "--model", str(tiny_run_dir), "--db", str(db),
                                          "--workers", "0"])
    assert result.exit_code == 1 and "--allow-empty" in result.output and "holds 4" in result.output
    assert_same_state(db_state(db), before)
    assert_ann_matches_lmdb(db)
    emptied = run_index(_cfg(folder, db, tiny_run_dir, allow_empty=True))
    assert (emptied.removed, emptied.total) == (4, 0)
    assert run_index(_cfg(folder, db, tiny_run_dir)).total == 0   # an empty DB: nothing left to protect


def test_embedder_runs_torch_at_a_precision_or_the_runner_given(tiny_run_dir):
    import torch

    from indexer.build.encode import Embedder
    from retrieval.encoder import load_encoder
    from retrieval.encoder.engine import EngineSpec

    encoder = load_encoder(str(tiny_run_dir))
    with pytest.raises(EncoderError, match="GPU"):
        Embedder(encoder, "cpu", "fp16")
    if not cpu_has_bf16():
        with pytest.raises(EncoderError, match="AVX512-BF16"):
            Embedder(encoder, "cpu", "bf16")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32 = Embedder(encoder, "cpu")
    with torch.inference_mode():
        expected = encoder(fp32.finish(images)).numpy()
    np.testing.assert_allclose(fp32(images), expected, atol=1e-6)

    class Doubled:  # any runner: what it is given is the finished batch
        spec = EngineSpec("torch", "fp32")

        def __call__(self, batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return 2 * encoder(batch).numpy()

    np.testing.assert_allclose(Embedder(encoder, "cpu", runner=Doubled())(images), 2 * expected, atol=1e-6)


def test_workers_hand_over_uint8_and_the_batch_step_gives_the_same_values(tmp_path, tiny_run_dir):
    import torch
    from PIL import Image

    from indexer.build.encode import split_transform
    from retrieval.encoder import load_encoder

    transform = load_encoder(str(tiny_run_dir)).eval_transform()
    per_image, per_batch = split_transform(transform)
    image = Image.open(write_image(tmp_path / "x.jpg", 5, size=(61, 47)))
    shipped = per_image(image)
    assert shipped.dtype == torch.uint8
    assert torch.equal(per_batch(shipped[None])[0], transform(image))  # bit for bit


def test_unknown_ann_kind_fails_before_any_encoding(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=1, per_class=2)
    with pytest.raises(IndexStoreError, match="not an index faiss can build"):
        run_index(_cfg(folder, db, tiny_run_dir, ann="flatt"))
    assert db_state(db) == {}


def test_removals_and_scan_failures_commit_in_bounded_transactions(tmp_path, tiny_run_dir, monkeypatch):
    """More removals (and scan failures) than one transaction takes: several transactions, the same DB as a
    fresh index of the folder."""
    from indexer.build import pipeline

    folder, db = tmp_path / "images", tmp_path / "db"
    rels = make_folder(folder, classes=3, per_class=6)
    run_index(_cfg(folder, db, tiny_run_dir))
    for rel in rels[:7]:
        (folder / rel).unlink()
    for i in range(5):
        os.symlink(tmp_path / f"missing{i}.jpg", folder / f"class1/broken{i}.jpg")
    monkeypatch.setattr(pipeline, "REMOVE_BATCH", 3)
    removals, failure_batches = [], []
    real_remove, real_commit = Store.remove_paths, Store.commit_batch
    monkeypatch.setattr(Store, "remove_paths", lambda self, keys: removals.append(len(keys)) or real_remove(self, keys))
    monkeypatch.setattr(Store, "commit_batch", lambda self, items, failures: (
        failure_batches.append(len(failures)) if not items else None) or real_commit(self, items, failures))
    done = run_index(_cfg(folder, db, tiny_run_dir))
    assert removals == [3, 3, 1] and failure_batches == [3, 2]
    assert (done.removed, done.total, done.new_failures, done.files) == (7, 11, 5, 16)
    assert_same_state(db_state(db), _fresh_state(folder, tmp_path, tiny_run_dir))


def test_the_files_to_encode_are_taken_one_batch_at_a_time(tmp_path, tiny_run_dir, monkeypatch):
    """encode_files takes its files from an iterator as the decode workers need them (the workers receive
    them batch by batch): at every commit, only a few batches have been taken beyond what is committed."""
    from indexer.build.encode import _PREFETCH, Embedder, encode_files
    from indexer.build.scan import scan_folder
    from indexer.store.layout import EncoderInfo
    from retrieval.encoder import load_encoder

    folder = tmp_path / "images"
    make_folder(folder, classes=2, per_class=20)
    encoder = load_encoder(str(tiny_run_dir), device="cpu")
    taken, ahead, committed = [0], [], [0]

    def files():
        for entry in scan_folder(folder).files:
            taken[0] += 1
            yield entry

    real_commit = Store.commit_batch

    def commit(self, items, failures):
        ahead.append(taken[0] - committed[0])
        committed[0] += len(items) + len(failures)
        return real_commit(self, items, failures)

    monkeypatch.setattr(Store, "commit_batch", commit)
    with Store.open(tmp_path / "db", readonly=False) as store:
        store.begin_run(EncoderInfo.of(encoder), str(folder))
        counts = encode_files(store, folder, files(), Embedder(encoder, "cpu", "fp32"), batch_size=2, workers=1,
                              max_pixels=10**7, checkpoint=lambda: None, checkpoint_seconds=1e9, progress=False)
    assert counts.encoded == committed[0] == taken[0] == 40
    # in flight at most: the worker's prefetched batches, the one encoding, the writer's queue (2) and its commit
    assert max(ahead) <= 2 * (_PREFETCH + 4)
    assert_same_state(db_state(tmp_path / "db"), _fresh_state(folder, tmp_path, tiny_run_dir))
