"""Wall time of `python cli.py query IMAGE --db DB` on a 100,000-item DB against its floor, in one run.

Floor = `python -c "import torch, open_clip, faiss"` (wall time of a fresh process) + one encoder forward of
one image (timed inside a fresh process, the first forward after loading). The target is query <= 1.5 x floor.

The DB is synthesised through the indexer's own store API: random L2-normalised vectors stand in for the
embeddings of 100k images (encoding 100k images would take hours on 2 cores and tells nothing about query
start-up), bound to the real encoder's fingerprint, and its FAISS index is built by `ann.refresh` exactly as
`index` builds it. The query image is a real JPEG, encoded for real.

    python scripts/bench_query.py [--items 100000] [--model lite0] [--repeat 5] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FORWARD = """
import sys, time
from retrieval.data.decode import load_image
from retrieval.encoder import load_encoder
from indexer.store.read import embed_images
encoder = load_encoder(sys.argv[1])
image = load_image(sys.argv[2], draft_size=encoder.config.resize_size).image
start = time.perf_counter()
embed_images(encoder, [image])
print(time.perf_counter() - start)
"""


def build_db(db: Path, n: int, model: str, *, batch: int = 10_000, seed: int = 0) -> dict:
    """An index DB of `n` random unit vectors bound to `model`'s fingerprint, with its FAISS index."""
    from indexer.store import ann
    from indexer.store.layout import EncoderInfo, NewItem
    from indexer.store.lmdb_store import Store
    from retrieval.encoder import load_encoder

    encoder = load_encoder(model)
    info = EncoderInfo(encoder.spec, encoder.fingerprint(), encoder.embed_dim, encoder.image_size)
    rng = np.random.default_rng(seed)
    with Store.open(db, readonly=False) as store:
        store.begin_run(info, str(db.parent / "synthetic-images"))
        for start in range(0, n, batch):
            vectors = rng.standard_normal((min(batch, n - start), info.dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            items = [NewItem(f"c{i % 1000:04d}/img{i:07d}.jpg", f"c{i % 1000:04d}", 50_000, 0, 640, 480,
                             i.to_bytes(16, "little"), v)
                     for i, v in enumerate(vectors, start)]
            store.commit_batch(items, [])
        with store.snapshot() as snap:
            built = ann.refresh(db, snap, "auto")
        return {"ann": built, "lmdb_bytes": store.disk_bytes(), "faiss_bytes": (db / ann.ANN_FILE).stat().st_size}


def _reusable(db: Path, n: int, model: str) -> bool:
    """True when `db` already holds n items bound to the current weights of `model`."""
    from indexer.store.lmdb_store import Store
    from retrieval.encoder import load_encoder
    from retrieval.errors import IndexStoreError

    try:
        with Store.open(db) as store, store.snapshot() as snap:
            header, count = snap.header, snap.count()
    except IndexStoreError:
        return False
    return header is not None and count == n and header.encoder.fingerprint == load_encoder(model).fingerprint()


def db_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every DB benchmark shares: collection size, encoder, work folder, JSON output."""
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the DB [default: a temp folder].")
    parser.add_argument("--json", action="store_true")


def prepare_db(args: argparse.Namespace, prefix: str) -> tuple[Path, dict]:
    """(work folder, build figures): a DB of `args.items` under the work folder, reused when it still matches."""
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "db"
    start = time.perf_counter()
    if _reusable(db, args.items, args.model):
        built: dict = {"ann": "reused"}
    else:
        shutil.rmtree(db, ignore_errors=True)
        built = build_db(db, args.items, args.model)
    built["build_s"] = round(time.perf_counter() - start, 1)
    return work, built


def query_image(work: Path) -> Path:
    """A real photo-sized JPEG (scikit-image's cat, 451x300) to query with."""
    from PIL import Image
    from skimage import data

    path = work / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=90)
    return path


def wall(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    db_arguments(parser)
    parser.add_argument("--repeat", type=int, default=5, help="Runs of each measurement (medians reported).")
    args = parser.parse_args()

    work, built = prepare_db(args, "bench-query-")
    db = work / "db"
    image = query_image(work)
    py = sys.executable
    query_cmd = [py, "cli.py", "query", str(image), "--db", str(db), "-k", "10", "--json"]
    imports, forwards, queries = [], [], []
    wall(query_cmd)  # warm the page cache once (LMDB, FAISS, site-packages), as a user's second query would be
    for _ in range(args.repeat):  # interleaved, so load from other processes hits all three alike
        imports.append(wall([py, "-c", "import torch, open_clip, faiss"])[0])
        forwards.append(float(wall([py, "-c", FORWARD, args.model, str(image)])[1]))
        seconds, out = wall(query_cmd)
        queries.append(seconds)
    hits = json.loads(out)[0]["results"]
    floor = statistics.median(imports) + statistics.median(forwards)
    result = {
        "items": args.items, "model": args.model, "db": str(db), **built,
        "import_s": round(statistics.median(imports), 3), "forward_s": round(statistics.median(forwards), 3),
        "floor_s": round(floor, 3), "query_s": round(statistics.median(queries), 3),
        "query_runs_s": [round(q, 3) for q in queries], "ratio": round(statistics.median(queries) / floor, 3),
        "hits": len(hits),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"DB: {args.items:,} items, FAISS {built.get('ann')}")
    print(f"floor: import torch, open_clip, faiss {result['import_s']:.2f} s + one forward {result['forward_s']:.3f} s"
          f" = {floor:.2f} s")
    print(f"query: {result['query_s']:.2f} s (median of {args.repeat}: {result['query_runs_s']})")
    print(f"ratio: {result['ratio']:.2f} x floor (target <= 1.5)")


if __name__ == "__main__":
    main()
