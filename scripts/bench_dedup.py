"""Near-duplicate finding (`dedup`): precision and recall of planted copies, then time and memory at scale.

plant    --source (e.g. ../shared/datasets/caltech101) is copied to --work/images and --copies (300) altered
         copies of randomly chosen photos are written beside their originals (same class folder), cycling through:
         JPEG quality 60 and 70, resized to 1/2 and 3/4 (saved at quality 70), a 5% and a 10% crop (the box keeps
         95% / 90% of each side at a random position), and a mirror image. The list goes to planted.json.
index    `python cli.py index` with the default encoder (lite0), OMP_NUM_THREADS=1.
table    Candidates once at the lowest cosine of the sweep (indexer.dedup.candidate_pairs), their pixel differences
         once (indexer.dedup.pixel_differences), then for each (cosine, max_diff) setting the groups and the
         precision / recall of the planted pairs: a planted pair counts as found when both images are in one
         reported group; precision is the share of reported pairs (any two members of one group) that are
         planted pairs, so a duplicate the source itself holds counts against it (Caltech-101 holds many: judge
         them by eye); recall also per kind of alteration.
scale    For each of --items (100k, 1M): synthetic 512-d unit vectors (scripts/bench_scale.py's clusters) written
         through the store API, the FAISS index built as `index` would (ann.refresh, kind auto); then in a fresh
         process (OMP_NUM_THREADS=1) dedup's candidate search and grouping (without the pixel check: synthetic
         items have no files): wall time and peak anonymous memory beyond the process's start. A DB larger than
         --sample is timed on the searches of --sample items spread over it, and the whole run extrapolated.

    python scripts/bench_dedup.py --source ../shared/datasets/caltech101 --work /tmp/dedup [--skip plant|index|
                                  table|scale] [--items 100000,1000000] [--sample 100000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("jpeg60", "jpeg70", "half", "three_quarter", "crop5", "crop10", "mirror")
COSINES = (0.70, 0.75, 0.80, 0.85, 0.90)
DIFFS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.6)


def plant(source: Path, images: Path, copies: int, seed: int = 0) -> list[dict]:
    """Copy `source` to `images` and write `copies` altered copies beside randomly chosen originals."""
    from PIL import Image, ImageOps

    if images.exists():
        shutil.rmtree(images)
    shutil.copytree(source, images)
    originals = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    rng = random.Random(seed)
    planted = []
    for i, rel in enumerate(rng.sample(originals, copies)):
        kind = KINDS[i % len(KINDS)]
        with Image.open(images / rel) as opened:
            im = opened.convert("RGB")
        w, h = im.size
        quality = 60 if kind == "jpeg60" else 70
        if kind in ("half", "three_quarter"):
            f = 0.5 if kind == "half" else 0.75
            im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
        elif kind in ("crop5", "crop10"):
            keep = 0.95 if kind == "crop5" else 0.90
            cw, ch = round(w * keep), round(h * keep)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            im = im.crop((x, y, x + cw, y + ch))
            quality = 90
        elif kind == "mirror":
            im = ImageOps.mirror(im)
            quality = 90
        copy = rel.rsplit("/", 1)[0] + f"/dup_{Path(rel).stem}_{kind}.jpg"
        im.save(images / copy, "JPEG", quality=quality)
        planted.append({"original": rel, "copy": copy, "kind": kind})
    return planted


def index_folder(images: Path, db: Path) -> dict:
    """`python cli.py index` with the default encoder on one thread; its --json summary and the wall time."""
    if db.exists():
        shutil.rmtree(db)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cli.py", "index", str(images), "--db", str(db), "--json"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    return {"images": summary.get("total"), "seconds": round(time.perf_counter() - start, 1)}


def table(db: Path, planted: list[dict], neighbours: int = 16) -> list[dict]:
    """Precision and recall of the planted pairs for each (cosine, max_diff) setting."""
    from indexer.dedup import candidate_pairs, components, pixel_differences
    from indexer.store.search import SearchIndex

    with SearchIndex.open(db, gpu=False) as index:
        start = time.perf_counter()
        pairs = candidate_pairs(index, min(COSINES), neighbours)
        found_s = time.perf_counter() - start
        differences = pixel_differences(index, pairs)
        verify_s = time.perf_counter() - start - found_s
        id_of = {it.relpath: it.id for it in index.iter_items()}
    print(f"# {len(pairs)} candidate pairs at cosine >= {min(COSINES)} in {found_s:.1f} s, "
          f"their pixels compared in {verify_s:.1f} s", flush=True)
    truth = {(min(id_of[p["original"]], id_of[p["copy"]]), max(id_of[p["original"]], id_of[p["copy"]])): p["kind"]
             for p in planted}
    rows = []
    for cosine, diff in itertools.product(COSINES, DIFFS):
        keep = (pairs.score >= cosine) & (differences <= diff)
        reported = {(int(a), int(b)) for group in components(pairs.subset(keep))
                    for a, b in itertools.combinations(group.tolist(), 2)}
        hit = {pair: kind for pair, kind in truth.items() if pair in reported}
        row = {"cosine": cosine, "max_diff": diff, "reported_pairs": len(reported),
               "precision": round(len(hit) / max(1, len(reported)), 3), "recall": round(len(hit) / len(truth), 3)}
        for kind in KINDS:
            of_kind = [p for p, k in truth.items() if k == kind]
            row[kind] = round(sum(p in hit for p in of_kind) / len(of_kind), 2)
        rows.append(row)
    return rows


def scale_step(db: Path, items: int, sample: int) -> dict:
    """In a fresh process: dedup's candidate search and grouping over the whole synthetic DB when it holds at
    most `sample` items, else the search of `sample` items' neighbours (the rest extrapolated)."""
    from bench_scale import _Memory

    from indexer.dedup import DEFAULT_THRESHOLD, candidate_pairs, components
    from indexer.store.search import SearchIndex

    memory = _Memory()
    start = time.perf_counter()
    out: dict = {"items": items}
    with SearchIndex.open(db, gpu=False) as index:
        out["faiss"] = index.factory
        if items <= sample:
            pairs = candidate_pairs(index, DEFAULT_THRESHOLD, 16)
            out["groups"] = len(components(pairs))
            out["candidate_pairs"] = len(pairs)
            out["seconds"] = round(time.perf_counter() - start, 1)
        else:
            ids = index.ids()[:: max(1, items // sample)][:sample]
            vectors = index.vectors(ids)
            searched = time.perf_counter()
            for at in range(0, len(ids), 4096):
                index.search(vectors[at:at + 4096], 17)
            rate = len(ids) / (time.perf_counter() - searched)
            out["searched"] = len(ids)
            out["estimated_seconds"] = round(items / rate, 0)
    out["peak_heap_mb"] = round(memory.stop() / 2**20, 1)
    return out


def bench_scale(work: Path, sizes: list[int], sample: int) -> list[dict]:
    """Write each synthetic DB and its FAISS index as `index` would, then time dedup's search on it."""
    from bench_scale import write_db

    from indexer.store import ann
    from indexer.store.lmdb_store import Store

    rows = []
    for n in sizes:
        db = work / f"synthetic-{n}"
        if not (db / ann.ANN_FILE).exists():
            if not (db / "data.mdb").exists():
                write_db(db, n)
            with Store.open(db, readonly=False) as store, store.snapshot() as snap:
                ann.refresh(db, snap, "auto", rebuild=True)
        cmd = [sys.executable, __file__, "--step", str(db), "--items", str(n), "--sample", str(sample)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a folder of class folders of JPEGs (e.g. Caltech-101)")
    parser.add_argument("--work", type=Path, help="where the copies, DBs and planted.json go")
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--items", default="100000,1000000", help="comma-separated sizes of the scale part")
    parser.add_argument("--sample", type=int, default=100_000,
                        help="scale: DBs larger than this are timed on this many items' searches, extrapolated")
    parser.add_argument("--skip", choices=["plant", "index", "table", "scale"], action="append", default=[])
    parser.add_argument("--step", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(scale_step(args.step, int(args.items), args.sample)))
        return
    from bench_scale import _cpu

    if args.work is None:
        parser.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"cpu": _cpu(), "threads": os.cpu_count(), "load_1min": os.getloadavg()[0]}), flush=True)
    images, db, listing = args.work / "images", args.work / "db", args.work / "planted.json"
    if "plant" not in args.skip:
        if args.source is None:
            parser.error("--source is needed to plant copies (or --skip plant)")
        listing.write_text(json.dumps(plant(args.source, images, args.copies), indent=1))
    if "index" not in args.skip:
        print(json.dumps({"index": index_folder(images, db)}), flush=True)
    if "table" not in args.skip:
        for row in table(db, json.loads(listing.read_text())):
            print(json.dumps(row), flush=True)
    if "scale" not in args.skip:
        bench_scale(args.work, [int(x) for x in args.items.split(",")], args.sample)
    print(json.dumps({"load_1min_after": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
