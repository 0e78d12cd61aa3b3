"""Command line: fine-tune an image encoder with Circle Loss, index a folder, search it, evaluate.

Each command parses options into a config and makes one library call. Heavy libraries (torch, faiss,
open_clip) are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from retrieval import __version__
from retrieval.errors import RetrievalError
from retrieval.eval_config import DEFAULT_EXPAND_ALPHA, DEFAULT_KS, RESIZE_MODES, TTA_MODES
from retrieval.finetune_config import AUTO_LOCKED, HEAD_INITS, SCHEDULES
from retrieval.finetune_config import default as _ft  # light (no torch): the finetune options show its defaults

DEFAULT_MODEL = "lite0"
ENGINE_CHOICES = ("torch", "onnxruntime", "openvino")  # retrieval.encoder.engine.ENGINES, kept light for --help


def _tta_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--tta, the one test-time augmentation option (`default` says what leaving it out means)."""
    return click.option("--tta", type=click.Choice(TTA_MODES), default=None,
                        help="Test-time augmentation: flip embeds each image as the normalised mean of its own and "
                             f"its mirror's embeddings (twice the encoder work) [default: {default}].")


class _Group(click.Group):
    """A group whose commands turn library errors into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RetrievalError as exc:
            raise click.ClickException(str(exc)) from None


def _heavy_process() -> None:
    """Process-wide settings for the commands that train, embed or index, set here rather than by the library
    functions a user may import: glibc keeps freed memory for reuse (retrieval.allocator: each batch's
    activations and decoded images are blocks above the mmap threshold; without it the index encode stage
    was 1.8x slower with 9x the page faults), set before any decode worker forks so they inherit it."""
    from retrieval.allocator import keep_freed_memory

    keep_freed_memory()


def _preprocessing_options(what: str, default: str) -> Callable[[Callable], Callable]:
    """--crop-pct and --resize-mode, worded for one command: `what` they set, and where the `default` comes from."""
    def add(command: Callable) -> Callable:
        command = click.option(
            "--resize-mode", type=click.Choice(RESIZE_MODES), default=None,
            help=f"{what}: shortest (resize the shorter side, centre crop) or squash (the whole image resized to "
                 f"a square, crop-pct unused) [default: {default}].")(command)
        return click.option(
            "--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=None,
            help=f"{what}: resize the shorter side to image_size / crop-pct, centre-crop image_size (1: the whole "
                 f"square; lite0's ImageNet habit is 0.875) [default: {default}].")(command)
    return add


def _expand_options(help_k: str) -> Callable[[Callable], Callable]:
    """--expand K and --expand-alpha, with `help_k` saying what K does in this command."""
    def add(command: Callable) -> Callable:
        command = click.option("--expand-alpha", type=click.FloatRange(min=0), default=DEFAULT_EXPAND_ALPHA,
                               show_default=True,
                               help="Exponent of the hits' similarity weights in --expand (0: plain average).")(command)
        return click.option("--expand", "expand_k", type=click.IntRange(min=0), default=0, show_default=True,
                            help=help_k)(command)
    return add


def _print_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="circle-retrieval")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Fine-grained image retrieval: fine-tune an open_clip encoder with Circle Loss,
    index a folder into LMDB + FAISS, query it by example image, and report Recall@K.

    \b
    Typical session:
      python cli.py make-dataset data/birds
      python cli.py finetune --dataset cub --root data/birds --out runs/birds
      python cli.py index data/birds/images --model runs/birds --db db/birds
      python cli.py query some.jpg --db db/birds
      python cli.py eval --db db/birds
      python cli.py serve --db db/birds          # then open http://127.0.0.1:8000
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command("make-dataset")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=40, show_default=True, help="Number of fine-grained classes.")
@click.option("--per-class", default=30, show_default=True, help="Images per class.")
@click.option("--size", default=160, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def make_dataset_cmd(out_dir: Path, classes: int, per_class: int, size: int, seed: int, as_json: bool) -> None:
    """Generate the embedded fine-grained set (stylised birds) in CUB-200-2011 format.

    Classes differ in subtle attributes (shade, wing bar, beak length, eye ring);
    instances vary more in pose, scale, position, clutter, lighting and JPEG quality.
    The first half of the classes is the train split, the second half the test split.
    """
    from retrieval.data.generate import GenerateConfig, make_dataset

    made = make_dataset(GenerateConfig(out_dir=out_dir, classes=classes, per_class=per_class, size=size, seed=seed))
    if as_json:
        _print_json(made.to_json())
    else:
        click.echo(
            f"wrote {made.images} images of {made.classes} classes to {out_dir} "
            f"(train {made.train_classes} classes / test {made.test_classes} classes)"
        )


@cli.command("index")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Encoder spec or fine-tuned run directory; the DB stays bound to it.")
@click.option("--db", "db_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index directory (LMDB + FAISS); created if missing.")
@_preprocessing_options("Eval preprocessing", "the DB's own, recorded in it; for a new DB the model's")
@_tta_option("the DB's own, recorded in it; for a new DB none")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per encoder batch (and per LMDB commit).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode worker processes, 0 to decode in the main process [default: CPUs / 4 when encoding "
                   "on the CPU, CPUs (max 8) on a GPU].")
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the encoder: auto (cuda when available, else cpu), cpu, cuda, cuda:1.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default=None,
              help="How vectors are computed, decided by the first run of a DB and recorded (later runs, query and "
                   "serve use the same): fp32; int8 (ONNX Runtime, calibrated on this folder); bf16 (CPUs with "
                   "AVX512-BF16 or AMX); fp16 (CUDA); auto: int8 where the CPU has VNNI or AMX and it passes the "
                   "ranking gate, else fp32. "
                   "A reduced precision is kept only if its rankings agree with fp32's on a held sample of FOLDER, "
                   "else fp32 with a warning (docs/engines.md) [default: the DB's, fp32 for a new DB].")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=None,
              help="Inference engine for fp32: onnxruntime or openvino (the openvino extra) run the encoder exported "
                   "to ONNX (once, cached in ~/.cache/circle-retrieval/engines; the same vectors as torch to 1e-5, "
                   "faster) [default: onnxruntime on a CPU, torch on a GPU].")
@click.option("--calibration", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="int8: how activation ranges are measured on 256 images of FOLDER.")
@click.option("--ann", default="auto", show_default=True,
              help="FAISS index: auto (exact Flat up to 100k x 512-d, then IVF), flat, hnsw, ivf-flat, ivf-pq, "
                   "or a faiss factory string such as IVF1024,PQ32.")
@click.option("--reembed", is_flag=True,
              help="Build a new generation even with the live generation's --model (a --model other than the live "
                   "one always builds one: beside the live generation, which stays served until the switch).")
@click.option("--switch/--no-switch", default=True, show_default=True,
              help="Make a newly built generation live at the end; --no-switch builds it for `eval --generation` "
                   "and a later `generations --activate`.")
@click.option("--keep", type=click.IntRange(min=0), default=1, show_default=True,
              help="Previous generations kept after a switch, for an instant rollback (older ones are dropped).")
@click.option("--disk-check/--no-disk-check", default=True, show_default=True,
              help="Refuse to build a new generation the free disk cannot hold (estimated from the live one).")
@click.option("--rebuild-ann", is_flag=True, help="Rebuild the FAISS index from LMDB.")
@click.option("--strict", is_flag=True, help="Exit 1 if any file could not be indexed (they are still recorded).")
@click.option("--allow-empty", is_flag=True,
              help="Let a FOLDER with no image files remove every item of a non-empty DB (without it that is "
                   "refused, as a sign of an unmounted drive or a wrong path).")
@click.option("--max-remove", type=click.IntRange(min=0), default=None,
              help="Most items a run may remove (files gone since the last run); a run that would remove more stops "
                   "before removing any [default: half of the DB].")
@click.option("--root-changed", is_flag=True,
              help="Let a DB built from another folder index FOLDER (the collection moved; paths are relative).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Skip images larger than this many pixels [default: 89,478,485].")
@click.option("--max-file-mb", type=click.FloatRange(min=0, min_open=True), default=256, show_default=True,
              help="Skip files larger than this (each file is read whole into memory).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Encode on Ray Data (pip install -e '.[ray]'): decode in CPU tasks, encode in an actor pool "
                   "(one GPU per actor when the cluster has GPUs; --device and --workers do not apply); this "
                   "process plans and writes the DB. Every node must see FOLDER at the same path.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join (implies --ray): 'auto' for the one `ray start` runs here, or HOST:PORT "
                   "[default: start a local Ray].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def index_cmd(folder: Path, model: str, db_dir: Path, crop_pct: float | None, resize_mode: str | None,
              tta: str | None, batch_size: int, workers: int | None, device: str,
              precision: str | None, engine: str | None, calibration: str, ann: str, reembed: bool, switch: bool,
              keep: int, disk_check: bool, rebuild_ann: bool, strict: bool, allow_empty: bool,
              max_remove: int | None, root_changed: bool, max_pixels: int | None, max_file_mb: float,
              use_ray: bool, ray_address: str | None,
              progress: bool | None, as_json: bool) -> None:
    """Index the images under FOLDER into DB_DIR: embeddings in LMDB (the source of truth), search in FAISS.

    \b
    Incremental: unchanged files (same size and mtime) are skipped, changed ones re-encoded, deleted ones
    removed; a file with the content of one already indexed reuses its embedding. Safe to kill at any
    moment and run again. Bad files (truncated, empty, not an image, too large, unreadable, broken links,
    a decoder crash) are skipped and listed; I/O errors are retried on the next run. Items under a folder
    that cannot be reached (unlistable, a dangling link) are kept. The label of an image is its first
    folder below FOLDER.

    \b
    A --model other than the DB's builds a new generation beside the live one (which stays served), runs a
    last incremental pass, then switches to it atomically; killed, the same command resumes the build.
    `generations --db DB` lists them, `--activate ID` rolls back.
    """
    from indexer.build.pipeline import IndexConfig, prefer_passive_openmp, run_index

    prefer_passive_openmp()   # before the pipeline imports torch
    from retrieval.data.decode import DEFAULT_MAX_PIXELS, allow_pixels

    _heavy_process()
    allow_pixels(max_pixels or DEFAULT_MAX_PIXELS)   # Pillow's process-wide cap must not undercut --max-pixels

    cfg = IndexConfig(folder=folder, db_dir=db_dir, model=model, crop_pct=crop_pct, resize_mode=resize_mode,
                      tta=tta, batch_size=batch_size, workers=workers,
                      device=device, precision=precision, engine=engine,
                      calibration=calibration, ann=ann, reembed=reembed, switch=switch, keep=keep,
                      check_disk=disk_check, rebuild_ann=rebuild_ann,
                      strict=strict, allow_empty=allow_empty, max_remove=max_remove, root_changed=root_changed,
                      max_pixels=max_pixels or DEFAULT_MAX_PIXELS, max_file_mb=max_file_mb,
                      ray=use_ray or ray_address is not None, ray_address=ray_address)
    summary = run_index(cfg, progress=sys.stderr.isatty() if progress is None else progress)
    if as_json:
        _print_json(summary.to_json())
        return
    click.echo(f"indexed {summary.indexed} images ({summary.encoded} encoded, {summary.reused} reused "
               f"by content), {summary.unchanged} unchanged, {summary.removed} removed, "
               f"{summary.failed} failed: {summary.total} images in {db_dir} "
               f"(FAISS {summary.ann.factory}, {summary.ann.action}) in {summary.seconds:.1f} s")
    if summary.generation != 1 or summary.live_generation != 1:
        click.echo(f"  generation {summary.generation} ({summary.model}); live generation: {summary.live_generation}")
    for failure in summary.failures:
        retry = " (retried next run)" if failure.transient else ""
        click.echo(f"  failed: {failure.path}: {failure.reason}{retry}")
    if summary.unreachable:
        more = " ..." if len(summary.unreachable) > 5 else ""
        folders = ", ".join(summary.unreachable[:5])
        click.echo(f"  unreachable: {summary.unreachable_kept} items kept under {folders}{more}")


@cli.command("generations")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path), help="Index directory.")
@click.option("--activate", type=int, metavar="ID", help="Make generation ID live (atomic; a rollback or forward).")
@click.option("--drop", type=int, metavar="ID", help="Delete generation ID and free its disk (never the live one).")
@click.option("--keep", type=click.IntRange(min=0), default=None, metavar="N",
              help="Drop all previous generations but the N most recently live.")
@click.option("--json", "as_json", is_flag=True, help="Print the generations as a JSON list.")
def generations_cmd(db_dir: Path, activate: int | None, drop: int | None, keep: int | None, as_json: bool) -> None:
    """List the DB's generations (one index per encoder), switch the live one, drop old ones.

    \b
    States: live (served), previous (was live: --activate rolls back at once), built (finished with
    index --no-switch), building (an index run with a new --model, killed or still running: run it again).
    A running `serve` follows a switch within about a second, without restart.
    """
    from indexer.store.generations import manage

    listed = manage(db_dir, activate=activate, drop=drop, keep=keep)
    if as_json:
        _print_json([g.to_json() for g in listed])
        return
    click.echo(f"  {'id':>3}  {'state':<9} {'items':>9} {'disk MiB':>9}  {'created':<25}  encoder (fingerprint)")
    for g in listed:
        click.echo(f"{'*' if g.state == 'live' else ' '} {g.id:>3}  {g.state:<9} {g.items:>9} "
                   f"{g.disk_bytes / 2**20:>9.1f}  {g.created:<25}  {g.spec} ({g.fingerprint[:12]})")


def _parse_ks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """--k 1,2,4,8 -> (1, 2, 4, 8): positive, ascending, no repeats."""
    try:
        ks = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,2,4,8, got {value!r}") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"K values must be positive integers, got {value!r}")
    return tuple(ks)


@cli.command("query")
@click.argument("images", nargs=-1, required=True)
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path), help="Index directory to search.")
@click.option("-k", "k", default=10, show_default=True, help="Results per query image.")
@click.option("--model", default=None,
              help="Encoder spec; optional, as the DB records its own (one that disagrees with it is an error).")
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the encoder: auto (cuda when available, else cpu), cpu, cuda, cuda:1.")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="Only items with this label (repeat for several): the top k of them, searched in the index.")
@_expand_options("Query expansion: search again with the query plus its top K hits' stored embeddings, "
                 "weighted by similarity^alpha (0: off; one more search per query, no encoder pass).")
@_tta_option("the DB's own; another one is an error")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8"]), default=None,
              help="Embed the queries at this precision [default: the one the DB's vectors were made with].")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=None,
              help="Inference engine for fp32 queries [default: onnxruntime on a CPU, torch on a GPU].")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a page with each query and its top-k as thumbnails (thumbnails go beside it).")
@click.option("--dedup", type=float, default=None, metavar="T",
              help="Collapse results whose embeddings' cosine is >= T into the best-ranked one (as clip-retrieval; "
                   "e.g. 0.94) [default: off].")
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"query": PATH, "results": [{"rank", "path", "score", "label"}, ...]}, ...].')
def query_cmd(images: tuple[str, ...], db_dir: Path, k: int, model: str | None, device: str, labels: tuple[str, ...],
              expand_k: int, expand_alpha: float, tta: str | None, html_file: Path | None, dedup: float | None,
              precision: str | None, engine: str | None, as_json: bool) -> None:
    """Search DB_DIR for the images most similar to each IMAGE.

    IMAGE is an image file, a folder of images (searched recursively), or - to read one path per line
    from stdin; all queries share one model load. Each image is decoded and preprocessed exactly as the
    indexer did, and embedded with the encoder recorded in the DB.
    """
    from indexer.query import QueryConfig, expand_queries, run_query, write_query_html
    from indexer.store.expand import Expansion

    queries = expand_queries(images, sys.stdin if "-" in images else ())
    results = run_query(QueryConfig(db=db_dir, images=queries, k=k, model=model, device=device, labels=labels,
                                    expand=Expansion(expand_k, expand_alpha), dedup=dedup, tta=tta,
                                    precision=precision, engine=engine))
    if html_file is not None:
        write_query_html(results, html_file)
    if as_json:
        _print_json([r.to_json() for r in results])
        return
    for result in (r.to_json() for r in results):  # printable paths and labels
        width = max([5, *(len(hit["label"]) for hit in result["results"])])
        click.echo(f"query: {result['query']}")
        click.echo(f"  {'rank':>4}  {'similarity':>10}  {'label':<{width}}  path")
        for hit in result["results"]:
            click.echo(f"  {hit['rank']:>4}  {hit['score']:>10.4f}  {hit['label']:<{width}}  {hit['path']}")
    if html_file is not None:
        click.echo(f"page: {html_file}")


@cli.command("export")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path), help="Index directory to export.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New folder for img_emb/ and metadata/ (must not exist, or be empty).")
@click.option("--rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Items per partition (img_emb_N.npy + metadata_N.parquet).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Embedding type in the .npy files.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export_cmd(db_dir: Path, out: Path, rows: int, dtype: str, progress: bool | None, as_json: bool) -> None:
    """Export the embeddings as clip-retrieval's inference writes them (autofaiss, embedding-reader read it).

    \b
    OUT/img_emb/img_emb_{N}.npy         (rows, dim) embeddings, L2-normalised
    OUT/metadata/metadata_{N}.parquet   image_path (relative to the indexed folder), id, label, width,
                                        height, content_hash; same row order as the .npy
    OUT appears only once complete: an interrupted export leaves nothing under it.
    """
    from indexer.export import ExportConfig, run_export

    result = run_export(ExportConfig(db=db_dir, out=out, rows=rows, dtype=dtype,
                                     progress=sys.stderr.isatty() if progress is None else progress))
    if as_json:
        _print_json(result.to_json())
    else:
        click.echo(f"exported {result.items} embeddings ({result.dim}-d {result.dtype}) in {result.partitions} "
                   f"partition(s) to {result.out}")


@cli.command("dedup")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path), help="Index directory to check.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None,
              help="Cosine from which two items are a candidate pair [default: 0.70, chosen on Caltech-101 with "
                   "lite0 (docs/collection-tools.md); another encoder may need another].")
@click.option("--max-diff", type=click.FloatRange(min=0), default=None,
              help="Largest difference of the two images' aligned colour thumbnails (99th percentile, in standard "
                   "deviations) for a candidate pair to be a duplicate; lower is stricter [default: 0.35].")
@click.option("--neighbours", type=click.IntRange(min=1), default=16, show_default=True,
              help="Nearest items looked at per item (a group larger than this is still found through its links).")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write DIR/index.html: one row of thumbnails per group (DIR must be new or empty).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"groups": [{"members": [{"path", "id", "label", "score"}, ...]}, ...], counts}.')
def dedup_cmd(db_dir: Path, threshold: float | None, max_diff: float | None, neighbours: int,
              html_dir: Path | None, progress: bool | None, as_json: bool) -> None:
    """List groups of near-duplicate images (re-saved, resized, cropped, mirrored copies), largest first.

    Candidates are pairs whose embeddings' cosine is at least --threshold (a nearest-neighbour search of
    every item, in bounded memory); each is confirmed by comparing the two files' pixels, as small colour
    thumbnails aligned for crops of up to 10% and mirroring. A group's first member is its first-indexed
    image; each score is a member's cosine to it.
    """
    from indexer.dedup import DEFAULT_MAX_DIFF, DEFAULT_THRESHOLD, DedupConfig, run_dedup

    result = run_dedup(DedupConfig(
        db=db_dir, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        max_diff=DEFAULT_MAX_DIFF if max_diff is None else max_diff, neighbours=neighbours,
        html=html_dir, progress=sys.stderr.isatty() if progress is None else progress))
    if as_json:
        _print_json(result.to_json())
        return
    for number, group in enumerate(result.to_json()["groups"], start=1):
        click.echo(f"group {number} ({len(group['members'])} images):")
        for member in group["members"]:
            click.echo(f"  {member['score']:.4f}  {member['path']}")
    click.echo(f"{len(result.groups)} groups of near-duplicates among {result.items} images "
               f"({result.duplicates} of {result.candidates} candidate pairs confirmed"
               + (f", {result.unchecked} with an unreadable file" if result.unchecked else "") + ")")
    if result.html is not None:
        click.echo(f"page: {result.html}")


@cli.command("serve")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path), help="Index directory to serve.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the index and its images (logged as a warning).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the encoder: auto (cuda when available, else cpu), cpu, cuda, cuda:1.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Results when a request does not give ?k= (1-1000).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8"]), default=None,
              help="Embed uploads at this precision [default: the one the DB's vectors were made with].")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=None,
              help="Inference engine for fp32 uploads [default: onnxruntime on a CPU, torch on a GPU].")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Larger uploads get 413.")
@click.option("--cors", "cors", metavar="ORIGIN", default=None,
              help="Allow this origin cross-site [default: CORS off].")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Uploads embedded in one encoder batch (1: no micro-batching; on 2 cores batches of 16-32 were "
                   "slower per image than 8).")
@click.option("--batch-window-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long an upload waits for others to share its batch.")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Uploads that may be in the server at once (and jobs waiting for the encoder); beyond it the "
                   "answer is 503 with Retry-After, before the upload is read.")
@click.option("--max-wait-ms", default=5000.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="A request still waiting (to decode, or for the encoder) this long after it arrived gets 503 "
                   "with Retry-After instead of being computed late.")
@click.option("--decode-threads", type=click.IntRange(min=1), default=None,
              help="Uploads decoded at once, beside the encoder [default: the CPUs this process may use].")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), envvar="CIRCLE_RETRIEVAL_API_KEY_FILE",
              help="Require the key in this file (its first line) as 'Authorization: Bearer KEY' on /api/* and "
                   "/metrics [env CIRCLE_RETRIEVAL_API_KEY_FILE]; the page asks for it once per tab.")
@click.option("--no-auth", is_flag=True,
              help="Serve a non-loopback --host without a key (refused otherwise).")
@click.option("--drain-s", default=30, show_default=True, type=click.IntRange(min=0),
              help="On SIGTERM or Ctrl-C, how long requests in flight may take to finish before the server exits.")
@click.option("--show-paths", is_flag=True,
              help="Answer with absolute file paths and the encoder's run directory [default: paths relative to "
                   "the indexed folder, the run directory by its name].")
@_tta_option("the DB's own; another one is an error")
def serve_cmd(db_dir: Path, host: str, port: int, device: str, k: int, precision: str | None, engine: str | None,
              max_upload_mb: float, cors: str | None,
              max_batch: int, batch_window_ms: float, queue_size: int, max_wait_ms: float,
              decode_threads: int | None, api_key_file: Path | None, no_auth: bool, drain_s: int,
              show_paths: bool, tta: str | None) -> None:
    """Serve the index DB over HTTP: a search page at / and a JSON API, from one resident process.

    \b
    POST /api/search?k=10&label=L&expand=0   multipart upload (field "image"): the query --json element + ids,
                                     timings (paths relative to the indexed folder unless --show-paths);
                                     label=L: the top k of that label; expand=K: query expansion (query --expand)
    GET  /api/items/ID/similar?k=10  more like an indexed item (its stored embedding, no encoder pass)
    GET  /api/items/ID/thumbnail     small JPEG of an indexed item
    GET  /api/stats, /healthz        counts, labels, encoder, FAISS; liveness

    The DB's own encoder is loaded once. Uploads arriving together are embedded in one batch. When an
    `index` run commits, answers follow the new state within about a second, without restart. SIGTERM stops
    taking connections, lets requests in flight finish (--drain-s) and exits 0.
    """
    try:
        from indexer.serve.app import ServeConfig, run_server
    except ImportError as exc:
        raise click.ClickException(f"serve needs FastAPI, uvicorn, python-multipart and prometheus-client: "
                                   f"pip install -e \".[cpu,serve]\" ({exc})") from None

    # uvicorn drains on SIGTERM, then raises the signal again under this disposition: a clean stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_server(ServeConfig(db=db_dir, host=host, port=port, device=device, k=k, precision=precision, engine=engine,
                           max_upload_bytes=int(max_upload_mb * (1 << 20)), cors=cors, max_batch=max_batch,
                           batch_window_ms=batch_window_ms, queue_size=queue_size, max_wait_ms=max_wait_ms,
                           decode_threads=decode_threads, drain_s=drain_s,
                           api_key=None if api_key_file is None else _read_key(api_key_file), no_auth=no_auth,
                           show_paths=show_paths, tta=tta))


def _read_key(path: Path) -> str:
    """The access key: the first line of FILE, stripped; one-line errors for an unreadable or empty file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read the key file {path}: {exc}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise click.ClickException(f"the key file {path} is empty: put the key on its first line")
    return key


@cli.command("eval")
@click.option("--db", "db_dir", type=click.Path(path_type=Path),
              help="Evaluate an index DB: every labelled item queries the rest of the DB.")
@click.option("--generation", type=int, metavar="ID",
              help="With --db: evaluate this index generation instead of the live one (compare a candidate built "
                   "with index --no-switch before switching).")
@click.option("--dataset", help="Or evaluate a data set split: cub, cars, sop or folder (with --root, --model).")
@click.option("--root", type=click.Path(path_type=Path), help="Data set folder (with --dataset).")
@click.option("--model", default=None,
              help=f"Encoder spec or fine-tuned run directory (with --dataset) [default: {DEFAULT_MODEL}].")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True,
              help="Split to evaluate (with --dataset); test holds the classes unseen in training.")
@click.option("--crop", is_flag=True, help="CUB: crop images to their bounding boxes.")
@_preprocessing_options("With --dataset, eval preprocessing", "the encoder's")
@_tta_option("the encoder's; with --dataset")
@click.option("--train-fraction", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="folder: share of the sorted classes in train.")
@click.option("--k", "ks", default=",".join(map(str, DEFAULT_KS)), show_default=True, callback=_parse_ks,
              help="K values for Recall@K (1,10,100,1000 suits SOP).")
@click.option("--batch-size", default=64, show_default=True, help="Images per encoder batch (with --dataset).")
@click.option("--workers", default=0, show_default=True, help="Decode worker processes (with --dataset).")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the encoder and the kNN.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write report.md, report.json, recall_at_k.png and report.html (+ thumbnails) into this folder.")
@_expand_options("With --db, query expansion: each item searches again with itself plus its top K hits (never "
                 "itself), weighted by similarity^alpha; plain search is shown beside it (0: off).")
@click.option("--compare", type=click.Path(exists=True, path_type=Path),
              help="Show another result side by side: a report.json, a report folder, or a finetune run directory.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"recall@1": ..., "map@r": ..., "r_precision": ..., "n_queries": ..., "n_classes": ...}.')
def eval_cmd(db_dir: Path | None, generation: int | None, dataset: str | None, root: Path | None,
             model: str | None, split: str, crop: bool, crop_pct: float | None, resize_mode: str | None,
             tta: str | None, train_fraction: float, ks: tuple[int, ...], batch_size: int, workers: int, device: str,
             report_dir: Path | None, expand_k: int, expand_alpha: float, compare: Path | None, progress: bool | None,
             as_json: bool) -> None:
    """Recall@K, MAP@R and R-Precision, leave-one-out (each query's own image is excluded).

    \b
    eval --db DB_DIR                             the indexed images; with an approximate FAISS index
                                                 also exact search and the gap
    eval --dataset cub --root DIR --model SPEC   embed a split and evaluate it (as finetune does per epoch)
    """
    if db_dir is not None and dataset is None:
        if model is not None or root is not None or crop_pct is not None or resize_mode is not None or tta:
            raise click.UsageError("--model, --root, --crop-pct, --resize-mode and --tta go with --dataset; a DB "
                                   "records its own encoder, preprocessing and folder")
        from indexer.eval_db import DbEvalConfig, evaluate_db
        from indexer.store.expand import Expansion

        result = evaluate_db(DbEvalConfig(db=db_dir, ks=ks, report=report_dir, compare=compare, device=device,
                                          expand=Expansion(expand_k, expand_alpha), generation=generation))
    elif generation is not None:
        raise click.UsageError("--generation goes with --db")
    elif dataset is not None and db_dir is None:
        if expand_k:
            raise click.UsageError("--expand goes with --db (it searches the DB's stored embeddings)")
        if root is None:
            raise click.UsageError("--dataset needs --root DIR (make one with: python cli.py make-dataset DIR)")
        from retrieval.eval_config import DatasetEvalConfig

        _heavy_process()
        from retrieval.eval_dataset import evaluate_dataset

        result = evaluate_dataset(DatasetEvalConfig(
            dataset=dataset, root=root, model=model or DEFAULT_MODEL, split=split, ks=ks, crop=crop, crop_pct=crop_pct,
            resize_mode=resize_mode, tta=tta,
            train_fraction=train_fraction, batch_size=batch_size, workers=workers, device=device,
            report=report_dir, compare=compare, progress=sys.stderr.isatty() if progress is None else progress))
    else:
        raise click.UsageError("pass either --db DB_DIR or --dataset NAME --root DIR")
    if as_json:
        _print_json(result.to_json())
        return
    from retrieval.report import metrics_table

    report = result.report
    click.echo(report.title)
    click.echo(metrics_table(report.metrics, report.ks, compare=result.compare, exact=report.exact, name="result"))
    if result.files is not None:
        click.echo(f"report: {result.files.html}")


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for everything the demo makes (a previous demo's outputs there are replaced).")
@click.option("--classes", default=40, show_default=True, help="Classes of the generated set (half are test).")
@click.option("--per-class", default=30, show_default=True, help="Images per class.")
@click.option("--size", default=160, show_default=True, help="Image side in pixels.")
@click.option("--epochs", default=3, show_default=True,
              help="Fine-tune epochs (fewer than finetune's default, to stay within a few minutes).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Pretrained encoder to start from.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Data loader worker processes [default: finetune's and index's own].")
@click.option("--device", default="cpu", show_default=True, help="Torch device (cpu, cuda).")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated set and of training.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the before/after metrics and paths as JSON.")
def demo_cmd(out: Path, classes: int, per_class: int, size: int, epochs: int, model: str, workers: int | None,
             device: str, seed: int, progress: bool | None, as_json: bool) -> None:
    """The whole job on the embedded data, offline, in a few minutes on 2 CPU cores.

    \b
    1. generate the fine-grained bird set (CUB format)     4. index the unseen test classes
    2. evaluate the pretrained encoder on its test split   5. evaluate the index (Recall@K, MAP@R)
    3. fine-tune with Circle Loss                          6. query it with new bird pictures
    Ends with a before/after table and the path of the HTML report.
    """
    from indexer.demo import DemoConfig, run_demo

    _heavy_process()

    result = run_demo(DemoConfig(out=out, classes=classes, per_class=per_class, size=size, epochs=epochs, model=model,
                                 seed=seed, workers=workers, device=device),
                      progress=sys.stderr.isatty() if progress is None else progress)
    if as_json:
        _print_json(result.to_json())
        return
    first = result.queries[0]
    click.echo(f"example query {first.query}:")
    for hit in first.hits:
        click.echo(f"  {hit.rank}. {hit.score:.3f}  {hit.label}  {hit.path}")
    click.echo(f"\nTest-split retrieval (unseen classes), pretrained vs fine-tuned with Circle Loss:\n{result.table}")
    click.echo("\nsteps (s): " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()))
    click.echo(f"queries: {result.query_page}\nreport:  {result.report}")


class _FinetuneCommand(click.Command):
    """`finetune --help` ends with the losses and their paper defaults, read from retrieval.losses."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from retrieval.losses import LOSS_DEFAULTS, LOSS_HELP

        with formatter.section("Losses (--loss) and their hyper-parameters with the papers' defaults"):
            formatter.write_dl([
                (name, f"{LOSS_HELP[name]} [{', '.join(f'{k}={v}' for k, v in LOSS_DEFAULTS[name].items())}]")
                for name in LOSS_DEFAULTS
            ])
        super().format_epilog(ctx, formatter)


def _parse_loss_params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float | str]:
    """--loss-param NAME=VALUE (repeatable) -> {NAME: float or str}."""
    params: dict[str, float | str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE such as gamma=64, got {item!r}")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            params[name.strip()] = value.strip()
    return params


@cli.command("finetune", cls=_FinetuneCommand)
@click.option("--dataset", default=_ft("dataset"), show_default=True, help="Data set format: cub, cars, sop or folder.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data set folder [default: the embedded generated bird set, created on first use].")
@click.option("--crop", is_flag=True, help="CUB: crop images to their bounding boxes.")
@click.option("--train-fraction", default=_ft("train_fraction"), show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="folder: share of the sorted classes used for training (the rest is the test split).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=_ft("val_fraction"),
              show_default=True, help="Share of the train classes held out as a validation split that chooses the "
                                      "kept epoch and stops early (0: the test split chooses, optimistically).")
@click.option("--patience", type=click.IntRange(min=0), default=_ft("patience"), show_default=True,
              help="Stop after this many epochs without a better validation epoch (0: never stop early).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/finetune"),
              show_default=True, help="Run directory: weights, encoder.json, metrics.json, train.log, curves.png.")
@click.option("--model", default=_ft("model"), show_default=True,
              help="Encoder to start from: lite0, lite2, MODEL:TAG, MODEL:/path/checkpoint, MODEL:none or a run dir.")
@click.option("--embed-dim", type=int, default=None, help="Embedding width of the head [default: 512].")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default=_ft("head_init"), show_default=True,
              help="pca: the head starts as the train split's top principal directions of the trunk features "
                   "(epoch 0 ranks as the trunk does); fixed: a hashed orthonormal projection.")
@click.option("--loss", default=_ft("loss"), show_default=True, help="Loss (see the list below).")
@click.option("--m", "--circle-m", "m", type=float, default=None,
              help="Relaxation margin m of circle / class-circle [default: paper's]; under torchrun write --circle-m.")
@click.option("--gamma", type=float, default=None, help="Scale gamma of circle / class-circle [default: paper's].")
@click.option("--margin", type=float, default=None, help="Margin of triplet [default: 0.1].")
@click.option("--loss-param", "loss_params", multiple=True, callback=_parse_loss_params, metavar="NAME=VALUE",
              help="Any other loss hyper-parameter, e.g. mining=semi-hard or neg_margin=0.4 (repeatable).")
@click.option("-P", "--p", "p", default=_ft("p"), show_default=True,
              help="P: classes per batch (under torchrun write -P: it reads --p as its own --print-completion).")
@click.option("-K", "--k", "k", default=_ft("k"), show_default=True, help="K: images per class in a batch.")
@click.option("--epochs", default=_ft("epochs"), show_default=True,
              help="Training epochs (each one pass over the train images).")
@click.option("--steps-per-epoch", type=int, default=None, help="Cap on batches per epoch [default: one pass].")
@click.option("--lr-backbone", default=_ft("lr_backbone"), show_default=True,
              help="AdamW learning rate of the pretrained trunk.")
@click.option("--lr-head", default=_ft("lr_head"), show_default=True,
              help="AdamW learning rate of the projection head.")
@click.option("--lr-proxies", type=float, default=None,
              help="class-circle proxies' learning rate [default: 10 x --lr-head].")
@click.option("--weight-decay", default=_ft("weight_decay"), show_default=True, help="AdamW weight decay.")
@click.option("--warmup-epochs", default=_ft("warmup_epochs"), show_default=True,
              help="Linear warm-up length in epochs (fractions allowed).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_ft("schedule"), show_default=True,
              help="Learning-rate schedule after the warm-up.")
@click.option("--freeze-backbone-epochs", default=_ft("freeze_backbone_epochs"), show_default=True,
              help="Epochs at the start that train only the head (and proxies).")
@click.option("--freeze-bn/--train-bn", default=_ft("freeze_bn"), show_default=True,
              help="Keep BatchNorm's pretrained running statistics (small P x K batches corrupt them).")
@click.option("--locked-groups", type=click.IntRange(min=0), default=None,
              help=f"Keep the tower's first N layer groups frozen (open_clip's lock: stem, blocks, head for timm "
                   f"towers, of which lite0 has 17; stem, residual blocks, projection for ViTs): for lite0 half "
                   f"the memory and 0.6 of the time per step; 0 trains all [default: {AUTO_LOCKED}, at most half "
                   f"the groups].")
@click.option("--image-size", type=int, default=None, help="Input size [default: the encoder's, 224 for lite0].")
@_preprocessing_options("Eval preprocessing", "the encoder's; saved in encoder.json")
@_tta_option("the encoder's; used by every evaluation, saved in encoder.json")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Data loader worker processes [default: CPUs / 4 on a CPU (0 on 2 cores: workers there take "
                   "cores from training), CPUs (max 8) with CUDA].")
@click.option("--seed", default=_ft("seed"), show_default=True,
              help="Seed of sampling, augmentation and initialisation.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt (after Ctrl-C, or with more --epochs).")
@click.option("--device", default=_ft("device"), show_default=True,
              help="auto (cuda when available, else cpu), cpu, cuda, cuda:1.")
@click.option("--amp/--no-amp", default=_ft("amp"), show_default=True,
              help="bf16 autocast on CUDA (CPU always runs fp32).")
@click.option("--eval-batch-size", default=_ft("eval_batch_size"), show_default=True,
              help="Images per batch when evaluating.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (baseline, best, last epoch, paths) as JSON.")
def finetune_cmd(dataset: str, root: Path | None, crop: bool, train_fraction: float, val_fraction: float,
                 patience: int, out: Path, model: str, embed_dim: int | None, head_init: str, loss: str,
                 m: float | None, gamma: float | None, margin: float | None, loss_params: dict, p: int, k: int,
                 epochs: int, steps_per_epoch: int | None, lr_backbone: float, lr_head: float,
                 lr_proxies: float | None, weight_decay: float, warmup_epochs: float, schedule: str,
                 freeze_backbone_epochs: int, freeze_bn: bool, locked_groups: int | None, image_size: int | None,
                 crop_pct: float | None, resize_mode: str | None, tta: str | None, workers: int | None, seed: int,
                 resume: bool,
                 device: str, amp: bool, eval_batch_size: int,
                 progress: bool | None, as_json: bool) -> None:
    """Fine-tune an encoder on P x K batches with Circle Loss (or another loss); evaluate Recall@1/2/4/8 and
    MAP@R on the unseen test classes before training (the pretrained baseline) and after every epoch.

    \b
    The best epoch is kept as model.safetensors + encoder.json: the best MAP@R among the epochs whose
    Recall@1 is not below the baseline's (if none is, the best MAP@R, with a warning). Pass the run
    directory as --model to index, query or eval. Ctrl-C saves last.pt; --resume continues. Runs
    unchanged under torchrun --nproc_per_node=N (DDP; rank 0 evaluates and writes).
    """
    from retrieval.finetune import FinetuneConfig, run_finetune

    _heavy_process()

    named = {"m": m, "gamma": gamma, "margin": margin}
    cfg = FinetuneConfig(
        out=out, dataset=dataset, root=root, crop=crop, train_fraction=train_fraction, val_fraction=val_fraction,
        patience=patience, model=model, embed_dim=embed_dim, head_init=head_init, loss=loss,
        loss_params={**{k_: v for k_, v in named.items() if v is not None}, **loss_params},
        p=p, k=k, epochs=epochs, steps_per_epoch=steps_per_epoch, lr_backbone=lr_backbone, lr_head=lr_head,
        lr_proxies=lr_proxies, weight_decay=weight_decay, warmup_epochs=warmup_epochs, schedule=schedule,
        freeze_backbone_epochs=freeze_backbone_epochs, freeze_bn=freeze_bn, locked_groups=locked_groups,
        image_size=image_size, crop_pct=crop_pct, resize_mode=resize_mode, tta=tta, workers=workers, seed=seed,
        resume=resume,
        device=device, amp=amp, eval_batch_size=eval_batch_size)
    result = run_finetune(cfg, progress=sys.stderr.isatty() if progress is None else progress)
    if result is None:   # a torchrun rank other than 0
        return
    if as_json:
        _print_json(result.to_json())
        return
    splits: list[tuple[str, Mapping[str, Mapping[str, float] | None]]] = [
        ("test", {"baseline": result.baseline, "best": result.best, "last": result.last})]
    if result.validation is not None:
        splits.insert(0, ("validation", result.validation))
    for split, rows in splits:
        for name, row in rows.items():
            if row is not None:
                click.echo(f"{split:>10} {name:>8}: " + "  ".join(f"{key} {value:.4f}" for key, value in row.items()))
    click.echo(f"kept epoch {result.best_epoch} of {result.epochs} (chosen on the {result.selected_on} split); "
               f"run directory {result.out}")


def main() -> None:
    cli(prog_name="cli.py")


if __name__ == "__main__":
    main()
