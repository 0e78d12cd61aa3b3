"""Atomic, durable writes: the old or the new content under the final name, never a torn file, and fsync'd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval import files
from retrieval.files import atomic_dir, atomic_path, remove_stale_temporaries, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_suffix_ends_the_temporary_name(tmp_path):
    with atomic_path(tmp_path / "curves.png", suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".curves.png.tmp-") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "curves.png").read_bytes() == b"png"


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    """The new file's data before the rename, the folder's entry after it."""
    synced: list[tuple[str, bool]] = []
    real = files.fsync
    monkeypatch.setattr(files, "fsync", lambda path: (synced.append((str(path), (tmp_path / "a").exists())),
                                                      real(path)))
    write_text_atomic(tmp_path / "a", "x")
    assert len(synced) == 2
    (first, renamed_before), (second, renamed_after) = synced
    assert Path(first).parent == tmp_path and Path(first).name.startswith(".a.tmp-") and not renamed_before
    assert second == str(tmp_path) and renamed_after


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_never_leaves_a_torn_file(tmp_path):
    """A child rewrites a 4 MB file in a loop; readers see only whole versions, before and after kill -9."""
    target = tmp_path / "big.bin"
    code = (
        "import sys\n"
        "from retrieval.files import atomic_path\n"
        f"target = {str(target)!r}\n"
        "i = 0\n"
        "while True:\n"
        "    with atomic_path(target) as tmp:\n"
        "        with open(tmp, 'wb') as f:\n"
        "            for _ in range(64):\n"
        "                f.write(bytes([i % 256]) * 65536)\n"
        "    i += 1\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        versions = set()
        while len(versions) < 3:
            assert time.monotonic() < deadline, "the writer made no progress"
            assert child.poll() is None, "the writer died"
            if target.exists():
                data = target.read_bytes()
                assert len(data) == 64 * 65536 and data == bytes([data[0]]) * len(data)
                versions.add(data[0])
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    data = target.read_bytes()
    assert len(data) == 64 * 65536 and data == bytes([data[0]]) * len(data)
    remove_stale_temporaries(target)
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_remove_stale_temporaries_spares_other_files(tmp_path):
    target = tmp_path / "ann.faiss"
    for name in ["ann.faiss", ".ann.faiss.tmp-123-abcd", ".ann.faiss.tmp-9-ff.png", "ann.json", ".ann.json.tmp-1-0"]:
        (tmp_path / name).write_text(name)
    remove_stale_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ann.json.tmp-1-0", "ann.faiss", "ann.json"]


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("generator failed")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty target folder is replaced
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_atomic_dir_never_replaces_a_folder_with_content(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_orphaned_temporaries_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    from retrieval.files import remove_orphaned_temporaries, temp_path

    target = tmp_path / "out"
    live = temp_path(target)                        # this process: alive
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead_dir = tmp_path / f".out.tmp-{dead_pid}-abcd1234"
    (dead_dir / "img_emb").mkdir(parents=True)
    dead_file = tmp_path / f".out.tmp-{dead_pid}-ffff0000.json"
    dead_file.write_text("{}")
    other = tmp_path / f".outer.tmp-{dead_pid}-00000000"  # another target's name
    other.write_text("x")
    assert sorted(remove_orphaned_temporaries(target)) == sorted([dead_dir, dead_file])
    assert live.is_dir() and other.exists() and not dead_dir.exists() and not dead_file.exists()
