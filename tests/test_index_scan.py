"""indexer.scan (stat-only walk) and indexer.plan (what changed since the last run)."""

from __future__ import annotations

import os

import pytest

from indexer.plan import make_plan
from indexer.layout import Failure, PathState
from indexer.layout import path_key
from indexer.scan import FileEntry, ScanFailure, ScanResult, scan_folder


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_scan_finds_images_recursively_in_key_order_with_labels(tmp_path):
    for rel in ["b/2.JPG", "b/sub/deep.png", "a/1.jpeg", "a.b/x.webp", "top.gif", "a/notes.txt", "a/x.TIFF",
                ".hidden/h.jpg", "a/.h.jpg", "c/.git/y.jpg"]:
        _touch(tmp_path / rel)
    result = scan_folder(tmp_path)
    rels = [f.relpath for f in result.files]
    assert rels == sorted(rels, key=path_key)
    assert set(rels) == {"b/2.JPG", "b/sub/deep.png", "a/1.jpeg", "a.b/x.webp", "top.gif", "a/x.TIFF"}
    labels = {f.relpath: f.label for f in result.files}
    assert labels["b/sub/deep.png"] == "b" and labels["top.gif"] == "" and labels["a.b/x.webp"] == "a.b"
    assert result.failures == []
    st = (tmp_path / "a/1.jpeg").stat()
    entry = next(f for f in result.files if f.relpath == "a/1.jpeg")
    assert (entry.size, entry.mtime_ns, entry.ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_scan_follows_symlinks_without_looping(tmp_path):
    _touch(tmp_path / "real/a.jpg")
    _touch(tmp_path / "outside/o.jpg")
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    _touch(root / "cls/own.jpg")
    os.symlink(tmp_path / "real", root / "cls/again")      # a linked folder is walked
    os.symlink(root, root / "cls/loop")                    # a loop back to the root is not walked again
    os.symlink(tmp_path / "real", root / "linked")         # nor a folder already walked (first in path order wins)
    os.symlink(tmp_path / "outside/o.jpg", root / "cls/file_link.jpg")  # a linked file is taken
    os.symlink(tmp_path / "missing.jpg", root / "cls/broken.jpg")
    result = scan_folder(root)
    assert [f.relpath for f in result.files] == ["cls/again/a.jpg", "cls/file_link.jpg", "cls/own.jpg"]
    assert [(f.relpath, f.reason) for f in result.failures] == [("cls/broken.jpg", "broken symbolic link")]


def test_scan_takes_names_that_are_not_utf8(tmp_path):
    try:
        (tmp_path / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"x")
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    _touch(tmp_path / "good.jpg")
    result = scan_folder(tmp_path)
    assert [path_key(f.relpath) for f in result.files] == [b"bad\xff.jpg", b"good.jpg"]
    assert result.failures == []
    assert (tmp_path / result.files[0].relpath).read_bytes() == b"x"  # the name opens the same file again


def _entry(rel, size=1, mtime=1, ctime=1):
    return FileEntry(rel, size, mtime, ctime)


def test_plan_classifies_every_file():
    scan = ScanResult(
        files=sorted([_entry("a.jpg"), _entry("changed.jpg", size=2), _entry("new.jpg"), _entry("bad_same.jpg"),
                      _entry("bad_fixed.jpg", ctime=9)], key=lambda f: path_key(f.relpath)),
        failures=[])
    stored = sorted([(b"a.jpg", PathState(0, 1, 1)), (b"changed.jpg", PathState(1, 1, 1)),
                     (b"gone.jpg", PathState(2, 1, 1))])
    failures = [Failure("bad_same.jpg", "truncated", 1, 1, 1), Failure("bad_fixed.jpg", "no access", 1, 1, 1),
                Failure("bad_gone.jpg", "empty", 1, 1, 1)]
    plan = make_plan(scan, stored, failures)
    assert sorted(f.relpath for f in plan.todo) == ["bad_fixed.jpg", "changed.jpg", "new.jpg"]
    assert (plan.unchanged, plan.known_failures) == (1, 1)
    assert sorted(plan.removed) == [b"bad_gone.jpg", b"gone.jpg"]


def test_plan_does_not_remove_what_the_scan_reports_as_bad():
    scan = ScanResult(files=[], failures=[ScanFailure("link.jpg", "broken symbolic link")])
    plan = make_plan(scan, [(b"link.jpg", PathState(0, 1, 1))], [Failure("link.jpg", "broken symbolic link")])
    assert plan.removed == [] and plan.todo == []


def test_plan_keeps_items_under_a_folder_that_cannot_be_listed():
    scan = ScanResult(files=[], failures=[ScanFailure("locked", "cannot list folder: Permission denied")],
                      unreachable=["locked"])
    stored = [(b"locked/a.jpg", PathState(0, 1, 1)), (b"lockedness/b.jpg", PathState(1, 1, 1))]
    plan = make_plan(scan, stored, [Failure("locked/bad.jpg", "empty file (0 bytes)", 1, 1, 1)])
    assert (plan.unchanged, plan.removed) == (1, [b"lockedness/b.jpg"])


def test_plan_retries_transient_failures_even_when_unchanged():
    scan = ScanResult(files=[_entry("bad.jpg"), _entry("eio.jpg")], failures=[])
    failures = [Failure("eio.jpg", "cannot read file: Input/output error", 1, 1, 1, transient=True),
                Failure("bad.jpg", "cannot decode", 1, 1, 1)]
    plan = make_plan(scan, [], failures)
    assert [f.relpath for f in plan.todo] == ["eio.jpg"] and plan.known_failures == 1
