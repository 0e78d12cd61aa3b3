"""Benchmark `index`: end-to-end images/s against the encoder alone, unchanged re-runs, bytes and memory.

    python scripts/bench_index.py --out /tmp/bench-index --images 512 --model lite0 --batch-size 64

In one run, with the same model, batch size and thread count:
1. encoder alone: images decoded and transformed beforehand (to the uint8 tensors `index` workers hand
   over), timed batch normalisation + forward passes only (the ceiling);
2. `index` end to end on a folder of 1024x768 JPEGs (photos from scikit-image's samples, or --source,
   randomly cropped, rescaled, flipped and given sensor noise) into a fresh DB: images/s of the encode stage
   (read + hash + decode in workers, encode, LMDB commits, all overlapped) and of the whole run;
   the two alternate --rounds times (a change in machine load then hits both) and the median ratio counts;
   CPU milliseconds per image of both (process + decode workers) are reported too, as they depend less on
   what else the machine runs (the index figure less one model load: scan, plan and FAISS write stay in);
3. bytes of LMDB and of FAISS per image;
4. a folder of --rerun-files small JPEGs (a few distinct contents, so indexing it is mostly hash reuse):
   seconds for `python cli.py index` over it when nothing changed, next to a bare stat walk;
5. peak RSS of separate `index` processes over growing folders (main process, and the largest worker).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _photos(source: Path | None) -> list[np.ndarray]:
    """Source photos: JPEGs under --source, else scikit-image's bundled colour photographs."""
    if source is not None:
        from indexer.build.scan import scan_folder

        files = scan_folder(source).files
        picks = np.linspace(0, len(files) - 1, min(64, len(files))).astype(int)
        return [np.asarray(Image.open(source / files[i].relpath).convert("RGB")) for i in picks]
    import skimage.data as data

    names = ["astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry"]
    return [getattr(data, name)()[..., :3] for name in names]


def make_photo_folder(out: Path, n: int, size: tuple[int, int], source: Path | None, seed: int = 0) -> Path:
    """n JPEGs (quality 90) of `size`, in 8 class folders; made once, reused by later runs."""
    marker = out / f".complete-{n}-{size[0]}x{size[1]}"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    photos = _photos(source)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        scale = rng.uniform(0.5, 1.0)
        ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 3.0, (size[1], size[0], 3))
        path = out / f"class{i % 8}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    marker.touch()
    return out


def make_small_folder(out: Path, n: int, distinct: int = 64, seed: int = 1) -> Path:
    """n small JPEGs with `distinct` different contents (indexing it is mostly content-hash reuse)."""
    marker = out / f".complete-{n}"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(distinct):
        path = out / "tmp.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
    (out / "tmp.jpg").unlink()
    for i in range(n):
        path = out / f"class{i % 50}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[i % distinct])
    marker.touch()
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers), user + system."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def encoder_rate(model: str, folder: Path, n: int, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the encoder alone on tensors prepared beforehand (same Embedder as
    `index`)."""
    import torch

    from indexer.build.encode import Embedder
    from indexer.build.scan import scan_folder
    from retrieval.data.decode import load_image
    from retrieval.encoder import load_encoder

    encoder = load_encoder(model)
    embedder = Embedder(encoder, "cpu", "fp32")
    files = scan_folder(folder).files[:n]
    images = torch.stack([embedder.transform(load_image(folder / f.relpath, draft_size=embedder.draft_size).image)
                          for f in files])
    embedder(images[:batch_size])  # warm up
    start, cpu = time.perf_counter(), _cpu_seconds()
    for i in range(0, len(images), batch_size):
        embedder(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start), (_cpu_seconds() - cpu) * 1e3 / len(images)


def _cli_index(folder: Path, db: Path, model: str, batch_size: int, workers: int | None) -> tuple[dict, float]:
    cmd = [sys.executable, "cli.py", "index", str(folder), "--db", str(db), "--model", model, "--json",
           "--batch-size", str(batch_size), "--no-progress"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout), time.perf_counter() - start


def peak_rss(folder: Path, db: Path, model: str, batch_size: int, workers: int | None) -> dict:
    """Peak RSS (MiB) of a fresh `index` process over `folder`: its main process and its largest worker."""
    code = (
        "import json, resource, sys; from pathlib import Path; from indexer.build.pipeline import IndexConfig, "
        "run_index\n"
        f"s = run_index(IndexConfig(folder=Path({str(folder)!r}), db_dir=Path({str(db)!r}), model={model!r}, "
        f"batch_size={batch_size}, workers={workers}))\n"
        "print(json.dumps({'main': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
        "'worker': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'total': s.total}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def stat_walk_seconds(folder: Path) -> float:
    start = time.perf_counter()
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            os.stat(os.path.join(dirpath, name))
    return time.perf_counter() - start


def _dir_bytes(db: Path, name: str) -> int:
    return (db / name).stat().st_size if (db / name).exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-index"))
    parser.add_argument("--images", type=int, default=512, help="1024x768 JPEGs for the end-to-end run")
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--source", type=Path, default=None, help="folder of photos to crop from")
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode workers [index's default]")
    parser.add_argument("--rounds", type=int, default=3, help="encoder-alone / index alternations")
    parser.add_argument("--rerun-files", type=int, default=10_000)
    parser.add_argument("--rss-sizes", default="", help="comma-separated folder sizes for peak RSS (photos)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: e2e,rerun,rss")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    size = tuple(int(v) for v in args.size.split("x"))
    from indexer.build.pipeline import IndexConfig, prefer_passive_openmp, run_index

    prefer_passive_openmp()   # as `cli.py index` does, before torch is imported
    import torch

    from retrieval.data.decode import default_workers

    report: dict = {"model": args.model, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
                    "workers": args.workers if args.workers is not None else default_workers("cpu", minimum=1),
                    "cpus": os.cpu_count()}
    if "e2e" not in skip:
        photos = make_photo_folder(args.out / f"photos-{args.images}", args.images, size, args.source)
        db = args.out / "db-e2e"
        n_alone = min(args.images, 4 * args.batch_size)
        from retrieval.encoder import load_encoder

        load_encoder(args.model)  # imports done once, as in the index runs below
        cpu = _cpu_seconds()
        load_encoder(args.model)
        load_cpu = _cpu_seconds() - cpu  # taken off the index CPU figure, which includes a model load
        rounds = []
        for _ in range(args.rounds):  # alternate, so that a change in machine load hits both sides
            alone, alone_cpu = encoder_rate(args.model, photos, n_alone, args.batch_size)
            shutil.rmtree(db, ignore_errors=True)
            start, cpu = time.perf_counter(), _cpu_seconds()
            summary = run_index(IndexConfig(folder=photos, db_dir=db, model=args.model, batch_size=args.batch_size,
                                            workers=report["workers"])).to_json()
            wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            rounds.append({"encoder_alone": round(alone, 2), "index": summary["images_per_s"],
                           "index_wall": round(args.images / wall, 2),
                           "ratio": round(summary["images_per_s"] / alone, 3),
                           "cpu_ms_per_image_alone": round(alone_cpu, 1),
                           "cpu_ms_per_image_index": round((cpu - load_cpu) * 1e3 / args.images, 1)})
            print(json.dumps({"round": rounds[-1]}), flush=True)
        report["e2e"] = {
            "images": summary["indexed"], "jpeg_kb_mean": round(sum(p.stat().st_size for p in photos.rglob("*.jpg"))
                                                                 / args.images / 1024, 1),
            "median_ratio": float(np.median([r["ratio"] for r in rounds])), "rounds": rounds,
            "timings": summary["timings"],
            "lmdb_bytes_per_image": round(summary["lmdb_bytes"] / summary["total"]),
            "faiss_bytes_per_image": round(_dir_bytes(db, "ann.faiss") / summary["total"]),
        }
        print(json.dumps({"e2e": report["e2e"]}), flush=True)
    if "rerun" not in skip:
        small = make_small_folder(args.out / f"small-{args.rerun_files}", args.rerun_files)
        db = args.out / f"db-small-{args.rerun_files}"
        if not (db / "ann.json").exists():
            run_index(IndexConfig(folder=small, db_dir=db, model=args.model, batch_size=args.batch_size,
                                  workers=report["workers"]))
        stat_walk_seconds(small)  # warm the inode cache the same way for both
        first, wall = _cli_index(small, db, args.model, args.batch_size, args.workers)
        report["rerun"] = {
            "files": args.rerun_files, "cli_wall_s": round(wall, 3), "library_s": first["seconds"],
            "encoded": first["encoded"], "unchanged": first["unchanged"],
            "stat_walk_s": round(stat_walk_seconds(small), 3),
            "lmdb_bytes_per_image": round(first["lmdb_bytes"] / first["total"]),
            "faiss_bytes_per_image": round(_dir_bytes(db, "ann.faiss") / first["total"]),
        }
        print(json.dumps({"rerun": report["rerun"]}), flush=True)
    if "rss" not in skip and args.rss_sizes:
        report["peak_rss_mib"] = []
        for n in (int(v) for v in args.rss_sizes.split(",")):
            photos = make_photo_folder(args.out / f"photos-{n}", n, size, args.source)
            db = args.out / f"db-rss-{n}"
            shutil.rmtree(db, ignore_errors=True)
            row = {"images": n, **{k: round(v, 1) for k, v in peak_rss(photos, db, args.model, args.batch_size,
                                                                       args.workers).items()}}
            report["peak_rss_mib"].append(row)
            print(json.dumps({"peak_rss_mib": row}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
