"""`export`: read back by embedding-reader (the ecosystem's reader) vector by vector and path by path against the
DB, partitions and dtypes, a real SIGKILL mid-export leaving nothing under the final names, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli import cli
from indexer.export import partition_names
from indexer.store.layout import path_key
from indexer.store.lmdb_store import Store
from tests.index_support import unit_vectors, write_db

REPO = Path(__file__).resolve().parents[1]
DIM = 12


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """53 live items of 60 committed (7 removed: gaps in the ids), an odd name among them."""
    root = tmp_path_factory.mktemp("export")
    rels = [f"class{i % 4}/img{i:03d}.jpg" for i in range(59)] + ["class1/odd \u00e9 name.jpg"]
    write_db(root / "db", root / "images", list(zip(rels, unit_vectors(60, DIM, seed=1), strict=True)), batch=16)
    with Store.open(root / "db", readonly=False) as store:
        assert store.remove_paths([path_key(rels[i]) for i in (0, 5, 17, 18, 19, 40, 58)]) == 7
    return root / "db"


def _truth(db: Path) -> tuple[list, np.ndarray]:
    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        return snap.items(ids), snap.vectors(ids)


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _read_back(out: Path) -> tuple[np.ndarray, list[dict]]:
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["image_path", "id", "label", "width", "height", "content_hash"])
    vectors, meta = [], []
    for batch, frame in reader(batch_size=10, start=0, end=reader.count, show_progress=False):
        vectors.append(batch)
        meta += frame.to_dict("records")
    return np.concatenate(vectors), meta


@pytest.mark.parametrize(("rows", "dtype"), [(1_000_000, "float32"), (7, "float32"), (10, "float16")])
def test_export_reads_back_with_embedding_reader_as_the_db_holds_it(db, tmp_path, rows, dtype):
    out = tmp_path / "out"
    result = _invoke("export", "--db", str(db), "--out", str(out), "--rows", str(rows), "--dtype", dtype, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    items, vectors = _truth(db)
    parts = -(-len(items) // rows)
    assert summary == {"out": str(out), "items": len(items), "dim": DIM, "dtype": dtype, "partitions": parts,
                       "embeddings": "img_emb", "metadata": "metadata"}
    names = partition_names(len(items), rows)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{n}.npy" for n in names]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{n}.parquet" for n in names]
    for n in names:  # each pair of files has the same number of rows, partitions of `rows` but the last
        npy = np.load(out / "img_emb" / f"img_emb_{n}.npy", mmap_mode="r")
        assert npy.dtype == np.dtype(dtype) and npy.shape[1] == DIM
        assert pq.read_metadata(out / "metadata" / f"metadata_{n}.parquet").num_rows == len(npy)
        assert len(npy) == (rows if n != names[-1] else len(items) - rows * (parts - 1))

    got, meta = _read_back(out)
    assert got.shape == vectors.shape
    tolerance = 1e-3 if dtype == "float16" else 0.0
    for row, (item, vector) in enumerate(zip(items, vectors, strict=True)):
        assert meta[row]["id"] == item.id
        assert meta[row]["image_path"] == item.relpath
        assert (meta[row]["label"], meta[row]["width"], meta[row]["height"]) == (item.label, item.width, item.height)
        assert meta[row]["content_hash"] == item.content_hash.hex()
        np.testing.assert_allclose(got[row], vector, rtol=0, atol=tolerance, err_msg=item.relpath)


def test_partition_names_sort_as_numbers():
    names = partition_names(1001, 10)
    assert len(names) == 101 and sorted(names) == names and names[0] == "000" and names[-1] == "100"
    assert partition_names(5, 10) == ["0"]


def test_export_errors_are_one_line(db, tmp_path):
    def one_line(result, fragment: str) -> None:
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output

    one_line(_invoke("export", "--db", str(tmp_path / "nodb"), "--out", str(tmp_path / "o")), "no index DB")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    one_line(_invoke("export", "--db", str(db), "--out", str(tmp_path / "full")), "already exists")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    empty = tmp_path / "emptydb"
    with Store.open(empty, readonly=False) as store:
        from indexer.store.layout import EncoderInfo

        store.begin_run(EncoderInfo("made-up", "0" * 64, DIM, 32), str(tmp_path))
    one_line(_invoke("export", "--db", str(empty), "--out", str(tmp_path / "o")), "empty")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_killed_export_leaves_no_file_under_the_final_names(tmp_path):
    """SIGKILL while partitions are being written (--rows 1: one pair of files per item)."""
    rels = [f"c{i % 10}/img{i:05d}.jpg" for i in range(3000)]
    write_db(tmp_path / "db", tmp_path / "images", list(zip(rels, unit_vectors(3000, DIM, seed=2), strict=True)),
             batch=1000)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "cli.py", "export", "--db", str(tmp_path / "db"), "--out", str(out),
                             "--rows", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    started = []
    while not started and time.monotonic() < deadline and proc.poll() is None:
        started = [p for p in tmp_path.glob(".out.tmp-*/img_emb/*.npy")][:1]
        time.sleep(0.005)
    assert started, f"the export ended before any partition was seen (rc {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(".tmp-" in str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*_*.*"))  # only in the temporary
    # and a new export into the same place then succeeds and is complete
    done = subprocess.run([sys.executable, "cli.py", "export", "--db", str(tmp_path / "db"), "--out", str(out),
                           "--rows", "1000", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["items"] == 3000
    assert list(tmp_path.glob(".out.tmp-*")) == []   # the killed export's folder went with the next export
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
