"""indexer.build.scan (stat-only walk, streamed in key order) and indexer.build.plan (what changed since the last run).

The streamed plan is checked against the plan as it was made before it streamed (whole scan sorted in memory,
then merged with the DB's lists): `_reference_scan` and `_reference_plan` below keep that logic only here.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from indexer.build import plan as plan_module
from indexer.build.plan import make_plan
from indexer.build.scan import (
    FileEntry,
    ScanFailure,
    ScanResult,
    Unreachable,
    in_key_order,
    scan_folder,
    scan_stream,
    scanned,
)
from indexer.store.layout import KEY_PREFIX, EncoderInfo, Failure, NewItem, PathState, path_key
from indexer.store.lmdb_store import Store
from retrieval.data.folder import IMAGE_EXTENSIONS
from retrieval.data.walk import Found, walk
from retrieval.errors import IndexStoreError


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


def _keyed(*entries):
    return sorted(entries, key=lambda e: path_key(e.relpath))


def test_plan_classifies_every_file():
    scan = _keyed(_entry("a.jpg"), _entry("changed.jpg", size=2), _entry("new.jpg"), _entry("bad_same.jpg"),
                  _entry("bad_fixed.jpg", ctime=9))
    stored = sorted([(b"a.jpg", PathState(0, 1, 1)), (b"changed.jpg", PathState(1, 1, 1)),
                     (b"gone.jpg", PathState(2, 1, 1))])
    failures = sorted([Failure("bad_same.jpg", "truncated", 1, 1, 1), Failure("bad_fixed.jpg", "no access", 1, 1, 1),
                       Failure("bad_gone.jpg", "empty", 1, 1, 1)], key=lambda f: path_key(f.relpath))
    with make_plan(scan, stored, failures) as plan:
        assert [f.relpath for f in plan.todo] == ["bad_fixed.jpg", "changed.jpg", "new.jpg"]
        assert (plan.unchanged, plan.known_failures, plan.removed_items) == (1, 1, 1)
        assert list(plan.removed) == [b"bad_gone.jpg", b"gone.jpg"]


def test_plan_does_not_remove_what_the_scan_reports_as_bad():
    scan = [ScanFailure("link.jpg", "broken symbolic link")]
    with make_plan(scan, [(b"link.jpg", PathState(0, 1, 1))], [Failure("link.jpg", "broken symbolic link")]) as plan:
        assert list(plan.removed) == [] and list(plan.todo) == [] and list(plan.failures) == scan


def test_plan_keeps_items_under_a_folder_that_cannot_be_listed():
    scan = [ScanFailure("locked", "cannot list folder: Permission denied"), Unreachable("locked")]
    stored = [(b"locked/a.jpg", PathState(0, 1, 1)), (b"lockedness/b.jpg", PathState(1, 1, 1))]
    with make_plan(scan, stored, [Failure("locked/bad.jpg", "empty file (0 bytes)", 1, 1, 1)]) as plan:
        assert (plan.unchanged, list(plan.removed), plan.unreachable) == (1, [b"lockedness/b.jpg"], ["locked"])


def test_plan_retries_transient_failures_even_when_unchanged():
    scan = [_entry("bad.jpg"), _entry("eio.jpg")]
    failures = [Failure("bad.jpg", "cannot decode", 1, 1, 1),
                Failure("eio.jpg", "cannot read file: Input/output error", 1, 1, 1, transient=True)]
    with make_plan(scan, [], failures) as plan:
        assert [f.relpath for f in plan.todo] == ["eio.jpg"] and plan.known_failures == 1


def test_plan_refuses_a_scan_out_of_key_order():
    with pytest.raises(IndexStoreError, match="not in LMDB key order"):
        make_plan([_entry("b.jpg"), _entry("a.jpg")], [(b"a.jpg", PathState(0, 1, 1))], [])


# -- the streamed plan against the plan made from whole lists ---------------------------------------------------

def _reference_scan(found) -> ScanResult:
    """The scan as it was: every walk entry classified into lists, then sorted by key."""
    files, failures, unreachable = [], [], []
    for entry in found:
        is_image = entry.suffix in IMAGE_EXTENSIONS
        if entry.stat is not None:
            if is_image:
                files.append(FileEntry(entry.relpath, entry.stat.st_size, entry.stat.st_mtime_ns,
                                       entry.stat.st_ctime_ns))
            continue
        if entry.folder or is_image:
            failures.append(ScanFailure(entry.relpath, entry.problem or "", entry.errno in (errno.EIO,)))
        if not is_image or entry.folder:
            unreachable.append(entry.relpath)
    files.sort(key=lambda f: path_key(f.relpath))
    failures.sort(key=lambda f: path_key(f.relpath))
    return ScanResult(files, failures, unreachable)


def _reference_plan(scan: ScanResult, stored, failures, limits=""):
    """The plan as it was made: (todo, unchanged, known failures, removed keys, items removed, kept)."""
    failed = {path_key(f.relpath): f for f in failures}
    still_bad = {path_key(f.relpath) for f in scan.failures}
    unknown = tuple(os.fsencode(d) + b"/" for d in scan.unreachable)
    todo, removed = [], []
    unchanged = known_failures = kept = 0
    files = iter(scan.files)
    pending = next(files, None)

    def take_new(entry):
        nonlocal known_failures
        old = failed.pop(path_key(entry.relpath), None)
        if (old is not None and not old.transient and (not old.limits or old.limits == limits)
                and (old.size, old.mtime_ns, old.ctime_ns) == (entry.size, entry.mtime_ns, entry.ctime_ns)):
            known_failures += 1
        else:
            todo.append(entry)

    for key, state in stored:
        while pending is not None and path_key(pending.relpath) < key:
            take_new(pending)
            pending = next(files, None)
        if pending is not None and path_key(pending.relpath) == key:
            if (state.size, state.mtime_ns) == (pending.size, pending.mtime_ns):
                unchanged += 1
            else:
                todo.append(pending)
            failed.pop(key, None)
            pending = next(files, None)
        elif (state.path or key).startswith(unknown):
            kept += 1
        elif key not in still_bad:
            removed.append(key)
    while pending is not None:
        take_new(pending)
        pending = next(files, None)
    n_items = len(removed)
    removed.extend(key for key, f in failed.items()
                   if key not in still_bad and not os.fsencode(f.relpath).startswith(unknown))
    return todo, unchanged + kept, known_failures, removed, n_items, kept


def _assert_same_plan(found, db: Path, limits="") -> None:
    """The streamed plan (walk entries -> scan.in_key_order -> merge with LMDB) equals the reference plan."""
    reference = _reference_scan(found)
    with Store.open(db) as store, store.snapshot() as snap:
        stored, failures = list(snap.paths()), list(snap.failures())
        todo, unchanged, known, removed, n_items, kept = _reference_plan(reference, stored, failures, limits)
        with make_plan(in_key_order(scanned(found)), snap.paths(), snap.failures(), limits) as plan:
            assert list(plan.todo) == todo
            assert (plan.unchanged, plan.known_failures, plan.removed_items, plan.unreachable_kept) == (
                unchanged, known, n_items, kept)
            streamed = list(plan.removed)
            assert streamed == sorted(set(streamed)) and set(streamed) == set(removed)  # key order, once each
            assert list(plan.failures) == reference.failures
            assert sorted(plan.unreachable) == sorted(reference.unreachable)
            assert plan.files == len(reference.files) + len(reference.failures)


def _fill_db(db: Path, items: dict[str, tuple[int, int]], failures: list[Failure]) -> None:
    """A DB holding `items` (relpath -> stored (size, mtime_ns)) and `failures`, written through the store API."""
    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("synthetic", "f" * 64, 4, 32), "/nowhere")
        rels = list(items)
        for start in range(0, len(rels), 50):
            store.commit_batch([NewItem(rel, "", *items[rel], 1, 1, path_key(rel)[-16:].rjust(16, b"-"),
                                        np.ones(4, np.float32) / 2) for rel in rels[start:start + 50]], [])
        store.commit_batch([], failures)


def _stat(size, mtime, ctime=1):
    return SimpleNamespace(st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime)


def _synthetic_walk(rng: random.Random):
    """Walk entries (in the walk's order) of a made-up tree: plain, non-UTF-8 and long paths (runs sharing
    their first KEY_PREFIX bytes, one cut inside a file name), folders that cannot be listed (one inside a
    long run), broken links, an I/O error, non-image files; and the DB the tree is compared with."""
    long_dir = "L/" + "x" * 300 + "/" + "y" * 200  # every path below it shares its first KEY_PREFIX bytes
    cut = "M/" + "z" * (KEY_PREFIX - 4)  # paths starting with it share KEY_PREFIX bytes within a file name
    rels = [f"c{c}/img{i:03d}.jpg" for c in range(4) for i in range(rng.randint(5, 30))]
    rels += [f"c{c}/" + os.fsdecode(b"\xff\xfe%d.png" % i) for c in range(2) for i in range(3)]
    rels += [f"{long_dir}/f{i:03d}.jpg" for i in range(rng.randint(5, 40))]
    rels += [f"{long_dir}/sub{d}/g{i}.webp" for d in range(3) for i in range(5)]
    rels += [f"{cut}{tail}" for tail in ("a.jpg", "b/c.jpg", "b/d.jpg", "ab.png", "-x/e.jpg")]
    rels += ["top.jpg", f"{long_dir[:KEY_PREFIX - 5]}.jpg"]
    found = [Found(rel, _stat(rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2))) for rel in rels]
    found += [Found(f"c{c}/notes.txt", _stat(1, 1)) for c in range(2)]
    unlistable = ["locked", "c1/locked", f"{long_dir}/sub1/locked"]
    found += [Found(d, None, "cannot list folder: Permission denied", folder=True, errno=errno.EACCES)
              for d in unlistable]
    found += [Found("dangling", None, "broken symbolic link"), Found("c0/broken.jpg", None, "broken symbolic link"),
              Found("c2/eio.jpg", None, "cannot stat: Input/output error", errno=errno.EIO)]
    found.sort(key=lambda e: os.fsencode(e.relpath) + (b"/" if e.folder else b""))  # the walk's order
    on_disk = {e.relpath: e.stat for e in found if e.stat is not None}
    gone = [f"c{c}/gone{i}.jpg" for c in range(4) for i in range(3)] + [f"{long_dir}/gone{i}.jpg" for i in range(9)]
    unknown = ("locked", "dangling", "c1/locked", f"{long_dir}/sub1/locked")
    gone += [f"{d}/kept{i}.jpg" for d in unknown for i in range(3)]
    gone += [f"{cut}gone.jpg", "lockedness/x.jpg", f"{long_dir}/sub1/lockedness.jpg"]
    items = {rel: (st.st_size if rng.random() < 0.7 else 9, st.st_mtime_ns) for rel, st in on_disk.items()
             if rng.random() < 0.6 and rel.endswith((".jpg", ".png", ".webp"))}
    items.update({rel: (1, 1) for rel in gone})
    items["c0/broken.jpg"] = (1, 1)
    bad = [rel for rel in on_disk if rel not in items and rng.random() < 0.4] + ["c2/eio.jpg", "gone_bad.jpg",
                                                                               "locked/bad.jpg"]
    failures = []
    for rel in bad:
        st = on_disk.get(rel) or _stat(1, 1)
        same = (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if rng.random() < 0.6 else (7, 7, 7)
        failures.append(Failure(rel, "cannot decode", *same, transient=rng.random() < 0.2,
                                limits=rng.choice(["", "", "caps-then", "caps-now"])))
    failures += [Failure(rel, "cannot read file: Input/output error", 1, 1, 1, transient=True)
                 for rel in list(items)[:5]]  # a transient failure keeps the path's item: a key in both
    return found, items, failures


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_plan_equals_the_whole_list_plan(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(plan_module, "SPOOL_CHUNK", 3)  # many chunks in every spool
    found, items, failures = _synthetic_walk(random.Random(seed))
    _fill_db(tmp_path / "db", items, failures)
    _assert_same_plan(found, tmp_path / "db", limits="caps-now")


def test_streamed_plan_equals_the_whole_list_plan_on_a_real_folder(tmp_path):
    """Files added, changed, deleted and moved, long paths sharing a key prefix, odd names, a dangling link
    to a folder: the real walk, and the DB made from the folder before the changes."""
    root = tmp_path / "images"
    long_dir = "L/" + "x" * 200 + "/" + "y" * 200 + "/" + "z" * 150
    rels = [f"c{c}/{i}.jpg" for c in range(3) for i in range(6)] + [f"{long_dir}/{i:02d}.jpg" for i in range(12)]
    try:
        (root / "c0").mkdir(parents=True)
        (root / "c0" / os.fsdecode(b"odd\xff.jpg")).write_bytes(b"x")
        rels.append("c0/" + os.fsdecode(b"odd\xff.jpg"))
    except OSError:
        pass  # a file system that refuses non-UTF-8 names
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode(errors="surrogateescape"))
    (root / "share").mkdir()
    (root / "share/s.jpg").write_bytes(b"s")
    before = _reference_scan(walk(root)).files
    _fill_db(tmp_path / "db", {f.relpath: (f.size, f.mtime_ns) for f in before},
             [Failure("c1/0.jpg", "cannot decode", 1, 1, 1)])
    (root / "c0/1.jpg").unlink()  # deleted
    (root / f"{long_dir}/03.jpg").unlink()
    (root / "c1/2.jpg").write_bytes(b"changed, longer")  # changed
    (root / f"{long_dir}/04.jpg").write_bytes(b"changed, longer")
    (root / "c2/3.jpg").rename(root / "c1/moved.jpg")  # moved
    (root / f"{long_dir}/05.jpg").rename(root / f"{long_dir}/moved.jpg")
    (root / f"{long_dir}/new.jpg").write_bytes(b"n")  # added
    (root / "share").rename(tmp_path / "unmounted")  # gone, with a dangling link left where it was
    os.symlink(tmp_path / "share", root / "share")
    _assert_same_plan(list(walk(root)), tmp_path / "db")
    with Store.open(tmp_path / "db") as store, store.snapshot() as snap, \
            make_plan(scan_stream(root), snap.paths(), snap.failures()) as plan:
        assert plan.unreachable == ["share"] and plan.unreachable_kept == 1
        assert set(plan.removed) == {path_key(rel) for rel in ("c0/1.jpg", f"{long_dir}/03.jpg", "c2/3.jpg",
                                                                f"{long_dir}/05.jpg")}
        assert {f.relpath for f in plan.todo} == {"c1/0.jpg", "c1/2.jpg", f"{long_dir}/04.jpg", "c1/moved.jpg",
                                                  f"{long_dir}/moved.jpg", f"{long_dir}/new.jpg"}


def test_the_walk_runs_of_long_paths_come_out_in_key_order(tmp_path):
    base = "d" * (KEY_PREFIX + 20)
    found = [Found(f"{base}/{i:03d}.jpg", _stat(1, 1)) for i in range(50)] + [Found("e.jpg", _stat(1, 1))]
    keys = [path_key(e.relpath) for e in in_key_order(scanned(found))]
    assert keys == sorted(keys) and len(keys) == 51
    assert [f.relpath for f in scanned(found)] != [f.relpath for f in in_key_order(scanned(found))]  # sorted anew
