"""`query IMAGE...`: decode each image as the indexer does, embed it with the DB's own encoder, search.

Start-up dominates a single query, so the DB is opened (and found missing or empty) before torch and the
encoder load, FAISS is memory-mapped (see search.SearchIndex), and only the hits' records are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.data.walk import printable
from retrieval.errors import IndexStoreError, RetrievalError

from .store.collapse import FETCH_FACTOR, collapse_hits
from .store.expand import Expansion, expanded_search
from .store.read import Hit, embed_images, hits_of, load_db_encoder, load_db_runner

STDIN = "-"


@dataclass(frozen=True)
class QueryConfig:
    """What to search for and where; `model` (optional) must name the DB's own encoder."""

    db: Path
    images: tuple[Path, ...]
    k: int = 10
    model: str | None = None
    device: str = "auto"  # see retrieval.device.resolve_device
    batch_size: int = 32
    labels: tuple[str, ...] = ()  # only items with one of these labels (none: every item)
    expand: Expansion = Expansion()  # alpha query expansion; k = 0: off
    dedup: float | None = None  # collapse results whose cosine is >= this into the best-ranked (store.collapse)
    tta: str | None = None  # test-time augmentation; None: the DB's own (another one is refused)
    precision: str | None = None  # None: as the DB's vectors were made (see store.read.load_db_runner)
    engine: str | None = None


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: tuple[Hit, ...]
    generation: int = 1  # the index generation that answered
    fingerprint: str = ""  # its encoder's

    def to_json(self) -> dict:
        """The documented `query --json` element: {"query": PATH, "results": [{rank, path, score, label}],
        "served_by": {"generation", "fingerprint"}}."""
        return {  # paths and labels printable: bytes that are not UTF-8 as backslash escapes (walk.printable)
            "query": printable(self.query),
            "results": [{"rank": h.rank, "path": printable(h.path), "score": h.score, "label": printable(h.label)}
                        for h in self.hits],
            "served_by": {"generation": self.generation, "fingerprint": self.fingerprint},
        }


def expand_queries(args: Sequence[str | Path], stdin_lines: Iterable[str] = ()) -> tuple[Path, ...]:
    """Query image paths: files as given, folders walked (sorted, hidden skipped, image extensions only),
    and `-` replaced by the non-empty lines of `stdin_lines`."""
    from indexer.build.scan import scan_folder

    out: list[Path] = []
    for arg in args:
        if str(arg) == STDIN:
            out += [Path(line.strip()) for line in stdin_lines if line.strip()]
        elif Path(arg).is_dir():
            out += [Path(arg) / f.relpath for f in scan_folder(arg).files]
        else:
            out.append(Path(arg))
    if not out:
        raise RetrievalError("no query images: pass image files, a folder of images, or - to read paths from stdin")
    return tuple(out)


def run_query(cfg: QueryConfig) -> list[QueryResult]:
    """Top-k hits of every query image, in the order given (with `expand`, of its expanded embedding).

    Raises IndexStoreError for a missing or empty DB or a `model` other than the DB's encoder, DecodeError
    for a query image that cannot be decoded.
    """
    from indexer.store.search import SearchIndex
    from retrieval.data.decode import load_image

    if cfg.k < 1:
        raise RetrievalError(f"-k must be at least 1, got {cfg.k}")
    if cfg.dedup is not None and not -1.0 <= cfg.dedup <= 1.0:
        raise RetrievalError(f"--dedup is a cosine in [-1, 1], got {cfg.dedup}")
    with SearchIndex.open(cfg.db) as index:
        if len(index) == 0:
            raise IndexStoreError(f"the index DB at {cfg.db} is empty: index a folder into it first "
                                  f"(python cli.py index FOLDER --db {cfg.db})")
        only = index.ids_with_labels(cfg.labels) if cfg.labels else None  # before torch: a typo shows at once
        encoder = load_db_encoder(index, model=cfg.model, device=cfg.device, tta=cfg.tta)
        runner = load_db_runner(index, encoder, precision=cfg.precision, engine=cfg.engine)
        fetch = cfg.k if cfg.dedup is None else cfg.k * FETCH_FACTOR
        results: list[QueryResult] = []
        for start in range(0, len(cfg.images), cfg.batch_size):
            paths = cfg.images[start : start + cfg.batch_size]
            # Decoded as the indexer decodes (JPEG draft to the resize size), so an indexed image finds itself.
            images = [load_image(p, draft_size=encoder.config.resize_size).image for p in paths]
            scores, ids = expanded_search(index, embed_images(encoder, images, runner), fetch, cfg.expand, only=only)
            for path, s, i in zip(paths, scores, ids, strict=True):
                hits = hits_of(index, s, i)
                if cfg.dedup is not None:
                    hits = collapse_hits(index, hits, cfg.dedup)[: cfg.k]
                results.append(QueryResult(str(path), hits, index.generation_id, index.header.encoder.fingerprint))
        return results


def write_query_html(results: Sequence[QueryResult], html_file: Path) -> Path:
    """A page of each query image and its hits as thumbnails (written beside the page)."""
    from retrieval.report import Cell, Row, write_query_page

    rows = [Row(r.query, None, tuple(Cell(h.rank, h.path, h.label, h.score, None) for h in r.hits)) for r in results]
    return write_query_page(rows, html_file)
