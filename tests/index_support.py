"""Shared helpers for the indexer tests: saved encoders, folders of tiny images, DB comparisons, processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def save_run(spec: str, out: Path, *, perturb: int = 0, embed_dim: int = 8) -> Path:
    """Save the encoder `spec` names as a run directory (a spec every process can load); `perturb` gives
    other weights of the same architecture (so another fingerprint)."""
    import torch

    from retrieval.encoder import load_encoder, save_encoder

    encoder = load_encoder(spec, embed_dim=embed_dim)
    if perturb:
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(perturb)) * 0.1)
    save_encoder(encoder, out)
    return out


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A random-noise JPEG/PNG (by suffix) of `size` (width, height), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_folder(root: Path, classes: int = 3, per_class: int = 6, seed: int = 0) -> list[str]:
    """classes x per_class images under root/classK/; returns their relative paths."""
    rels = []
    for c in range(classes):
        for i in range(per_class):
            rel = f"class{c}/img{i:03d}.jpg"
            write_image(root / rel, seed * 100_000 + c * 1000 + i)
            rels.append(rel)
    return rels


def db_state(db_dir: Path) -> dict[str, tuple]:
    """relpath -> (record without id, embedding) of every item, read through the public snapshot API."""
    from indexer.store.lmdb_store import Store

    with Store.open(db_dir) as store, store.snapshot() as snap:
        ids = snap.ids()
        vectors = snap.vectors(ids)
        out = {}
        for item, vector in zip(snap.items(ids), vectors, strict=True):
            assert item.relpath not in out, f"{item.relpath} stored twice"
            out[item.relpath] = ((item.label, item.size, item.mtime_ns, item.width, item.height, item.content_hash),
                                 vector)
        return out


def full_state(db_dir: Path) -> tuple[dict, dict]:
    """(db_state, relpath -> (reason, transient) of every failure), after checking that the DB holds no
    leftover: every path, hash and embedding chunk belongs to a live item, and the ids digest is right."""
    from indexer.store.layout import id_key, ids_digest
    from indexer.store.lmdb_store import Store

    with Store.open(db_dir) as store, store.snapshot() as snap:
        ids = snap.ids()
        assert snap.header.ids_digest == ids_digest(ids)
        items = [item for item in snap.items(ids) if item is not None]
        assert sorted(state.id for _, state in snap.paths()) == ids.tolist()
        txn, dbs = snap._txn, snap._dbs
        with txn.cursor(dbs["hashes"]) as cur:
            hashes = sorted((bytes(k), bytes(v)) for k, v in cur)
        assert hashes == sorted((it.content_hash, id_key(it.id)) for it in items)
        with txn.cursor(dbs["vectors"]) as cur:
            chunks = {bytes(k) for k in cur.iternext(keys=True, values=False)}
        assert chunks == {id_key(i // snap.header.chunk_rows) for i in ids.tolist()}
        failures = {f.relpath: (f.reason, f.transient) for f in snap.failures()}
    return db_state(db_dir), failures


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel][0] == b[rel][0], rel
        np.testing.assert_allclose(a[rel][1], b[rel][1], atol=1e-5, err_msg=rel)


def assert_ann_matches_lmdb(db_dir: Path) -> None:
    """ann.faiss holds exactly LMDB's ids, each with LMDB's embedding."""
    import faiss

    from indexer.store import ann
    from indexer.store.lmdb_store import Store

    index = ann.load_ann(db_dir, mmap=False)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # IVF lists can only be read back by id through a direct map
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    with Store.open(db_dir) as store, store.snapshot() as snap:
        ids = snap.ids()
        np.testing.assert_array_equal(np.sort(ann.index_ids(index)), ids)
        np.testing.assert_array_equal(index.reconstruct_batch(ids), snap.vectors(ids))


def cli_index(folder: Path, db: Path, model: Path, *extra: str, wait: bool = True,
              kill_point: str | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
    """`python cli.py index` in a subprocess (run to the end, or started and returned); kill_point: a moment
    at which it kills itself with SIGKILL (see tests/kill_point.py)."""
    start = ["tests/kill_point.py", kill_point] if kill_point else ["cli.py"]
    cmd = [sys.executable, *start, "index", str(folder), "--db", str(db), "--model", str(model), "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model only loses from threads on a busy machine
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_items(db: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120.0) -> int:
    """Poll the DB (read-only, as a query would) until it holds `at_least` items; returns the count seen.

    Returns early (with what it saw) if the process ends first.
    """
    from indexer.store.lmdb_store import Store
    from retrieval.errors import IndexStoreError

    deadline = time.monotonic() + timeout
    store = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if store is None:
                try:
                    store = Store.open(db)
                except IndexStoreError:  # not created yet
                    time.sleep(0.005)
                    continue
            with store.snapshot() as snap:
                count = snap.count() if snap.header is not None else 0
            if count >= at_least:
                return count
            time.sleep(0.002)
        raise AssertionError(f"index process ended or timed out before {at_least} items (rc {proc.poll()})")
    finally:
        if store is not None:
            store.close()


def kill_at(db: Path, proc: subprocess.Popen, at_least: int) -> int:
    """SIGKILL the index process once the DB holds `at_least` items; returns the count seen at the kill."""
    count = wait_for_items(db, proc, at_least)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    return count


def write_db(db: Path, root: Path, entries: list[tuple[str, np.ndarray]], *, batch: int = 64) -> list[int]:
    """Commit (relpath, embedding) items through the store API, without an encoder (a made-up one of the
    embeddings' dim); the files need not exist. Returns their ids (in order). For tests of the read side."""
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store

    dim = len(entries[0][1])
    ids: list[int] = []
    with Store.open(db, readonly=False) as store:
        store.begin_run(EncoderInfo("made-up", "0" * 64, dim, 32), str(root))
        for at in range(0, len(entries), batch):
            part = entries[at:at + batch]
            ids += store.commit_batch([
                NewItem(rel, rel.split("/")[0] if "/" in rel else "", 1000 + i, i, 40 + i % 7, 30 + i % 5,
                        (at + i).to_bytes(16, "little"), np.asarray(v, dtype=np.float32))
                for i, (rel, v) in enumerate(part)], [])
    return ids


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
