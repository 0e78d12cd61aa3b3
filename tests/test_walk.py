"""retrieval.data.walk: the one walker of image folders (training reader, indexer scan, query folders)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from retrieval.data.folder import image_files, read_folder
from retrieval.data.walk import BROKEN_LINK, printable, walk


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_entries_come_in_byte_order_of_their_paths(tmp_path):
    rels = ["a/x.jpg", "a.b/y.jpg", "a-c.jpg", "a0", "ab/z/w.png", "b.jpg", "A/q.jpg", "\u00e9/e.jpg", "a/b/c/d.jpg"]
    for rel in rels:
        _touch(tmp_path / rel)
    found = [f.relpath for f in walk(tmp_path)]
    assert found == sorted(rels, key=os.fsencode)  # "a.b/y" < "a/x" in bytes ('.' < '/'), as LMDB orders keys


def test_hidden_skipped_links_followed_once_problems_reported(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    _touch(root / "cls/a.jpg")
    _touch(root / ".hidden/b.jpg")
    _touch(root / "cls/.c.jpg")
    _touch(other / "d.jpg")
    os.symlink(other, root / "cls/link")
    os.symlink(other, root / "zz_again")   # a second link to a folder already walked
    os.symlink(root, root / "loop")        # a loop
    os.symlink(tmp_path / "gone", root / "dangling")
    found = list(walk(root))
    assert [(f.relpath, f.problem) for f in found] == [
        ("cls/a.jpg", None), ("cls/link/d.jpg", None), ("dangling", BROKEN_LINK)]
    assert found[0].stat.st_size == 1 and found[2].stat is None


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path):
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        _touch(base / "open/a.jpg")
        _touch(base / "shut/b.jpg")
        (base / "open").chmod(0o755)
        (base / "shut").chmod(0o000)
        if os.geteuid() == 0:
            os.seteuid(65534)  # root lists anything: walk as nobody
        try:
            found = list(walk(base))
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert [(f.relpath, f.problem, f.folder) for f in found] == [
            ("open/a.jpg", None, False), ("shut", "cannot list folder: Permission denied", True)]
    finally:
        (base / "shut").chmod(0o755)
        shutil.rmtree(base)


def test_the_training_reader_walks_the_same_way(tmp_path):
    """read_folder follows a linked class folder (and links below it) like the indexer does."""
    _touch(tmp_path / "data/cat/1.jpg")
    _touch(tmp_path / "elsewhere/dog/2.png")
    _touch(tmp_path / "deep/3.jpg")
    os.symlink(tmp_path / "elsewhere/dog", tmp_path / "data/dog")
    os.symlink(tmp_path / "deep", tmp_path / "data/cat/sub")
    records = read_folder(tmp_path / "data")
    assert [(r.path.relative_to(tmp_path / "data").as_posix(), r.class_name) for r in records] == [
        ("cat/1.jpg", "cat"), ("cat/sub/3.jpg", "cat"), ("dog/2.png", "dog")]
    assert [p.name for p in image_files(tmp_path / "data")] == ["1.jpg", "3.jpg", "2.png"]


def test_printable_escapes_bytes_that_are_not_utf8():
    assert printable(os.fsdecode(b"caf\xe9/\xc3\xa9.jpg")) == "caf\\xe9/\u00e9.jpg"


def test_an_unreadable_root_raises():
    from retrieval.errors import DataError

    with pytest.raises(DataError):
        list(walk("/nonexistent/folder"))
