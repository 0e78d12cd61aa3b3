"""No single file stops a run; long and odd paths; nothing removed that should be kept; FAISS bound to its DB.

Each case is built for real: a 1 x 80,000,000 PNG, a decode worker killed with SIGKILL on a chosen file, an
EIO raised for a chosen path, a > 511-byte path, a folder link whose target vanished, data.mdb deleted under
an existing ann.faiss.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from indexer.build import encode
from indexer.build.pipeline import IndexConfig, run_index
from indexer.store.layout import KEY_PREFIX, path_key
from indexer.store.lmdb_store import Store
from indexer.store.search import SearchIndex
from retrieval.errors import IndexStoreError
from tests.index_support import assert_ann_matches_lmdb, assert_same_state, db_state, make_folder, write_image

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _run(cfg: IndexConfig) -> dict:
    return run_index(cfg).to_json()


def _cfg(folder: Path, db: Path, model: Path, **kw) -> IndexConfig:
    return IndexConfig(folder=folder, db_dir=db, model=str(model), **{"batch_size": 4, "workers": 0, **kw})


def _reference(folder: Path, tmp_path: Path, model: Path, skip: tuple[str, ...] = ()) -> dict:
    """The state of a clean run over `folder` without the `skip` files (copied elsewhere, mtimes kept)."""
    clean = Path(tempfile.mkdtemp(dir=tmp_path)) / "images"
    shutil.copytree(folder, clean, symlinks=True)
    for rel in skip:
        (clean / rel).unlink()
    db = Path(tempfile.mkdtemp(dir=tmp_path))
    _run(_cfg(clean, db, model))
    return db_state(db)


def _failures(summary: dict) -> dict[str, str]:
    return {f["path"]: f["reason"] for f in summary["failures"]}


def test_a_1_by_80_million_png_is_one_failure_not_a_dead_run(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=4)
    Image.new("L", (80_000_000, 1)).save(folder / "class1/strip.png")  # 80M pixels: under the 89M cap
    summary = _run(_cfg(folder, db, tiny_run_dir, workers=1))
    assert "extreme aspect ratio" in _failures(summary)["class1/strip.png"]
    assert summary["total"] == 8
    assert_same_state(db_state(db), _reference(folder, tmp_path, tiny_run_dir, skip=("class1/strip.png",)))


def test_files_over_max_file_mb_are_not_read(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    big = write_image(folder / "class0/big.png", 5, size=(200, 200))  # ~120 KB of noise
    assert big.stat().st_size > 0.05 * 2**20
    summary = _run(_cfg(folder, db, tiny_run_dir, max_file_mb=0.05))
    assert _failures(summary) == {"class0/big.png": "file too large (0.1 MiB; the cap is --max-file-mb 0.05)"}
    assert summary["total"] == 4
    again = _run(_cfg(folder, db, tiny_run_dir, max_file_mb=0.05))
    assert (again["encoded"], again["failed"]) == (0, 1)  # unchanged: not read again
    raised = _run(_cfg(folder, db, tiny_run_dir, max_file_mb=1))  # a higher cap: tried again
    assert (raised["encoded"], raised["failed"], raised["total"]) == (1, 0, 5)


def _kill_self_on(name: str, parent: int):
    """A decode_image that SIGKILLs the decode worker process decoding `name` (never the test process)."""
    real = encode.decode_image

    def decode(data, *, name: str | Path, **kw):
        if str(name).endswith(name_to_kill) and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, name=name, **kw)

    name_to_kill = name
    return decode


def test_a_worker_killed_on_one_file_costs_that_file_only(tmp_path, tiny_run_dir, monkeypatch):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=3, per_class=10)
    write_image(folder / "class1/culprit.jpg", 99)
    monkeypatch.setattr(encode, "decode_image", _kill_self_on("class1/culprit.jpg", os.getpid()))
    summary = _run(_cfg(folder, db, tiny_run_dir, workers=1, batch_size=4))
    assert _failures(summary) == {"class1/culprit.jpg": "decoder crashed (killed by signal 9)"}
    assert (summary["total"], summary["indexed"]) == (30, 30)
    assert_same_state(db_state(db), _reference(folder, tmp_path, tiny_run_dir, skip=("class1/culprit.jpg",)))
    assert_ann_matches_lmdb(db)
    again = _run(_cfg(folder, db, tiny_run_dir, workers=1))  # recorded: not retried while unchanged
    assert (again["encoded"], again["failed"], again["total"]) == (0, 1, 30)
    monkeypatch.undo()
    write_image(folder / "class1/culprit.jpg", 98)  # replaced by a file the decoder takes
    fixed = _run(_cfg(folder, db, tiny_run_dir, workers=1))
    assert (fixed["encoded"], fixed["failed"], fixed["total"]) == (1, 0, 31)


def test_transient_read_errors_are_retried_and_keep_the_old_embedding(tmp_path, tiny_run_dir, monkeypatch):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    _run(_cfg(folder, db, tiny_run_dir))
    before = db_state(db)
    write_image(folder / "class0/img001.jpg", 555)  # changed content...
    write_image(folder / "class1/new.jpg", 556)     # ...and a new file, both on a share that fails now
    real = encode.read_file

    def flaky(path: Path, max_bytes: int):
        if path.name in ("img001.jpg", "new.jpg") and path.parent.name in ("class0", "class1"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, max_bytes)

    monkeypatch.setattr(encode, "read_file", flaky)
    summary = _run(_cfg(folder, db, tiny_run_dir))
    assert {f["path"]: (f["reason"], f["transient"]) for f in summary["failures"]} == {
        "class0/img001.jpg": ("cannot read file: Input/output error", True),
        "class1/new.jpg": ("cannot read file: Input/output error", True)}
    during = db_state(db)
    assert sorted(during) == sorted(before)  # the changed file keeps its old item until a new one is committed
    np.testing.assert_array_equal(during["class0/img001.jpg"][1], before["class0/img001.jpg"][1])
    with SearchIndex.open(db) as index:  # and is still found
        _, ids = index.search(before["class0/img001.jpg"][1], 1)
        assert index.items(ids[0])[0].relpath == "class0/img001.jpg"
    monkeypatch.undo()
    again = _run(_cfg(folder, db, tiny_run_dir))  # nothing changed on disk since: retried anyway
    assert (again["encoded"], again["failed"], again["total"]) == (2, 0, 7)
    assert_same_state(db_state(db), _reference(folder, tmp_path, tiny_run_dir))


def _long_names(folder: Path) -> list[str]:
    """Two image paths of over 700 bytes that share their first KEY_PREFIX bytes (80 CJK characters = 240
    bytes per folder name, under the 255-byte name limit)."""
    deep = "/".join(["\u732b" * 80, "\u72d7" * 80, "\u9ce5" * 80])
    rels = [f"{deep}/{i}.jpg" for i in range(2)]
    for i, rel in enumerate(rels):
        write_image(folder / rel, 700 + i)
    assert all(len(os.fsencode(r)) > 511 for r in rels)
    assert os.fsencode(rels[0])[:KEY_PREFIX] == os.fsencode(rels[1])[:KEY_PREFIX]
    return rels


def test_paths_longer_than_an_lmdb_key(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    rels = _long_names(folder)
    summary = _run(_cfg(folder, db, tiny_run_dir))
    assert (summary["total"], summary["failed"]) == (6, 0)
    state = db_state(db)
    assert set(rels) <= set(state)  # whole paths kept
    assert state[rels[0]][0][0] == "\u732b" * 80  # label: the first folder
    with Store.open(db) as store, store.snapshot() as snap:
        keys = dict(snap.paths())
        assert all(len(k) <= 511 for k in keys)
        assert {os.fsdecode(keys[path_key(r)].path) for r in rels} == set(rels)
    again = _run(_cfg(folder, db, tiny_run_dir))
    assert (again["unchanged"], again["indexed"]) == (6, 0)
    (folder / rels[1]).unlink()
    (folder / rels[0]).write_bytes(b"broken")  # a long path can fail, too
    third = _run(_cfg(folder, db, tiny_run_dir))
    assert (third["removed"], third["total"]) == (1, 4)  # one gone, one now failing
    assert _failures(third) == {rels[0]: "not a recognised image format"}
    with SearchIndex.open(db) as index:
        vectors = index.vectors(index.ids())
        _, ids = index.search(vectors, 1)
        assert (ids[:, 0] == index.ids()).all()


def test_a_schema_1_db_is_migrated_in_place(tmp_path, tiny_run_dir):
    """Schema 1 stored paths of 481-511 bytes whole; the migration re-keys them and adds the uuid."""
    import lmdb

    from indexer.store.layout import Header

    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    rel = "\u732b" * 80 + "/" + "\u72d7" * 80 + "/x" * 8 + ".jpg"  # 481 + a few bytes
    write_image(folder / rel, 3)
    assert KEY_PREFIX < len(os.fsencode(rel)) <= 511
    _run(_cfg(folder, db, tiny_run_dir))
    before = db_state(db)
    env = lmdb.open(str(db), max_dbs=8)  # turn it back into what schema 1 wrote
    paths, meta = env.open_db(b"paths"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        value = txn.pop(path_key(rel), db=paths)
        txn.put(os.fsencode(rel), value[:24], db=paths)
        header = json.loads(txn.get(b"header", db=meta))
        header.update(schema=1, uuid="")
        del header["uuid"]
        txn.put(b"header", json.dumps(header).encode(), db=meta)
    env.close()
    summary = _run(_cfg(folder, db, tiny_run_dir))
    assert (summary["unchanged"], summary["indexed"], summary["removed"]) == (5, 0, 0)
    assert_same_state(db_state(db), before)
    with Store.open(db) as store:
        header: Header = store.header()
        assert header.schema == 2 and len(header.uuid) == 32
        with store.snapshot() as snap:
            assert os.fsencode(rel) not in dict(snap.paths())


def test_a_vanished_subtree_is_kept_and_mass_removal_needs_confirmation(tmp_path, tiny_run_dir):
    folder, db, share = tmp_path / "images", tmp_path / "db", tmp_path / "share"
    make_folder(folder, classes=3, per_class=4)
    make_folder(share, classes=1, per_class=5, seed=1)
    os.symlink(share / "class0", folder / "nas")  # a mounted share, linked into the collection
    assert _run(_cfg(folder, db, tiny_run_dir))["total"] == 17
    before = db_state(db)
    shutil.rmtree(share)  # the share is gone: the link dangles
    summary = _run(_cfg(folder, db, tiny_run_dir))
    assert (summary["removed"], summary["total"], summary["unreachable"], summary["unreachable_kept"]) == \
        (0, 17, ["nas"], 5)
    assert_same_state(db_state(db), before)
    result = CliRunner().invoke(cli.cli, ["index", str(folder), "--db", str(db), "--model", str(tiny_run_dir)])
    assert result.exit_code == 0 and "unreachable: 5 items kept under nas" in result.output

    shutil.rmtree(folder / "class1")
    shutil.rmtree(folder / "class2")  # 8 of 17 items: under half, but over --max-remove 5
    with pytest.raises(IndexStoreError, match=r"would remove 8 of the 17 items.*--max-remove 8"):
        _run(_cfg(folder, db, tiny_run_dir, max_remove=5))
    shutil.rmtree(folder / "class0")  # 12 of 17: more than half
    write_image(folder / "class3/new.jpg", 4)
    with pytest.raises(IndexStoreError, match=r"would remove 12 of the 17 items.*more than half.*--max-remove 12"):
        _run(_cfg(folder, db, tiny_run_dir))
    assert_same_state(db_state(db), before)  # nothing was removed
    done = _run(_cfg(folder, db, tiny_run_dir, max_remove=12))
    assert (done["removed"], done["total"]) == (12, 6)


def test_an_unlistable_folder_keeps_its_items(tmp_path, tiny_run_dir):
    """A folder that cannot be listed (mode 000; as root the scan runs as `nobody`, who is refused)."""
    from indexer.build.plan import make_plan
    from indexer.build.scan import FileEntry, ScanFailure, Unreachable, scan_stream

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        make_folder(base, classes=2, per_class=3)
        for sub in base.iterdir():
            sub.chmod(0o755)
        db = tmp_path / "db"
        _run(_cfg(base, db, tiny_run_dir))
        (base / "class1").chmod(0o000)
        if os.geteuid() == 0:
            os.seteuid(65534)
        try:
            scan = list(scan_stream(base))
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert [e for e in scan if not isinstance(e, FileEntry)] == [
            ScanFailure("class1", "cannot list folder: Permission denied"), Unreachable("class1")]
        with Store.open(db) as store, store.snapshot() as snap, make_plan(scan, snap.paths(), snap.failures()) as plan:
            assert (list(plan.removed), plan.unreachable_kept, plan.unchanged) == ([], 3, 6)
    finally:
        (base / "class1").chmod(0o755)
        shutil.rmtree(base)


def test_a_db_points_at_one_folder_unless_root_changed(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    _run(_cfg(folder, db, tiny_run_dir))
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # copy2: same sizes and mtimes
    with pytest.raises(IndexStoreError, match="--root-changed"):
        _run(_cfg(moved, db, tiny_run_dir))
    summary = _run(_cfg(moved, db, tiny_run_dir, root_changed=True))
    assert (summary["unchanged"], summary["indexed"], summary["removed"]) == (6, 0, 0)
    with SearchIndex.open(db) as index:
        assert index.root == moved.resolve()


def test_faiss_of_a_deleted_db_is_never_used(tmp_path, tiny_run_dir):
    first, second, db = tmp_path / "first", tmp_path / "second", tmp_path / "db"
    make_folder(first, classes=2, per_class=4, seed=1)
    make_folder(second, classes=2, per_class=4, seed=2)  # same count and names: same ids, same ids digest
    _run(_cfg(first, db, tiny_run_dir))
    (db / "data.mdb").unlink()
    (db / "lock.mdb").unlink()
    summary = _run(_cfg(second, db, tiny_run_dir))
    assert summary["ann"]["action"] == "rebuilt" and "another DB" in summary["ann"]["reason"]
    assert_ann_matches_lmdb(db)
    with SearchIndex.open(db) as index:
        assert not index.lagging


def test_a_reader_ignores_an_ann_faiss_from_another_db(tmp_path, tiny_run_dir):
    first, second, db = tmp_path / "first", tmp_path / "second", tmp_path / "db"
    make_folder(first, classes=2, per_class=4, seed=1)
    make_folder(second, classes=2, per_class=4, seed=2)
    _run(_cfg(first, db, tiny_run_dir))
    stale = {name: (db / name).read_bytes() for name in ("ann.faiss", "ann.json")}
    shutil.rmtree(db)
    _run(_cfg(second, db, tiny_run_dir))
    for name, data in stale.items():  # the old DB's index put back, stat and all, as a restored backup would
        (db / name).write_bytes(data)
    meta = json.loads(stale["ann.json"])
    os.utime(db / "ann.faiss", ns=(meta["file_mtime_ns"], meta["file_mtime_ns"]))
    with SearchIndex.open(db) as index:
        ids = index.ids()
        vectors = index.vectors(ids)
        _, found = index.search(vectors, 1)
        np.testing.assert_array_equal(found[:, 0], ids)  # each image finds itself, not the old DB's image


def test_file_names_that_are_not_utf8_are_indexed_shown_escaped_and_found(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=2)
    try:
        odd = write_image(folder / os.fsdecode(b"class\xe9/caf\xe9.jpg"), 42)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    summary = _run(_cfg(folder, db, tiny_run_dir))
    assert (summary["total"], summary["failed"]) == (5, 0)
    rel = os.fsdecode(b"class\xe9/caf\xe9.jpg")
    assert db_state(db)[rel][0][0] == os.fsdecode(b"class\xe9")
    result = CliRunner().invoke(cli.cli, ["query", str(odd), "--db", str(db), "-k", "1", "--json",
                                          "--html", str(tmp_path / "page.html")])
    assert result.exit_code == 0, result.output
    hit = json.loads(result.output)[0]["results"][0]
    assert (hit["path"], hit["label"]) == (str(folder / "class\\xe9/caf\\xe9.jpg"), "class\\xe9")
    page = (tmp_path / "page.html").read_text()
    assert "caf\\xe9.jpg" in page and "(image unavailable)" not in page  # shown escaped, opened by its bytes
    text = CliRunner().invoke(cli.cli, ["query", str(odd), "--db", str(db), "-k", "1"])
    assert text.exit_code == 0 and "class\\xe9/caf\\xe9.jpg" in text.output


def test_chunks_of_deleted_rows_are_compacted(tmp_path):
    from indexer.store.layout import EncoderInfo, NewItem

    db = tmp_path / "db"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, 8)).astype(np.float32)
    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("x", "f", 8, 32), "/r")
        store.commit_batch([NewItem(f"{i}.jpg", "", 1, 1, 1, 1, bytes([i]) * 16, vectors[i]) for i in range(64)], [])
        raw_size = len(store._env.begin().get((0).to_bytes(8, "big"), db=store._dbs["vectors"]))
        store.remove_paths([f"{i}.jpg".encode() for i in range(40)])
        with store.snapshot() as snap:
            np.testing.assert_array_equal(snap.vectors(list(range(40, 64))), vectors[40:])
            chunk = store._env.begin().get((0).to_bytes(8, "big"), db=store._dbs["vectors"])
        assert len(chunk) == 8 + 24 * 8 * 4 < raw_size  # only the 24 live rows are kept
