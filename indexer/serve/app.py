"""`serve`: a resident search service over an index DB, an HTTP API and one offline web page.

    app = create_app(ServeConfig(db=Path("db")))   # FastAPI; tests drive it with TestClient
    run_server(cfg)                                 # uvicorn on cfg.host:cfg.port (127.0.0.1 by default)

Endpoints (/api/* and /metrics need `Authorization: Bearer KEY` when a key is set): POST /api/search (multipart
field `image`), GET /api/items/{id}/similar, GET /api/items/{id}/thumbnail, GET /api/stats, GET /metrics
(Prometheus), GET /healthz, GET / (indexer/serve/static/index.html). The lifespan loads the DB's encoder once and
opens the index (engine.Engine); handlers only parse, decode uploads in the thread pool and await the
engine's worker thread. Overload: at most `queue_size` uploads are in the server (more get 503 before their body
is read), at most `decode_threads` decode at once (indexer.serve.admission), and a request still waiting
`max_wait_ms` after it arrived gets 503 instead of being computed late (both with Retry-After). Nothing a
client sends is used as a file-system path: items are found by integer id and their files by the path the DB
stores.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from indexer.store.collapse import FETCH_FACTOR, collapse_hits
from indexer.store.read import Hit
from retrieval.compat import parse_multipart
from retrieval.errors import DecodeError, RetrievalError

from .admission import Admission, cpu_count
from .auth import KeyMiddleware, check_exposure
from .batcher import Busy, Expired
from .engine import LOOPBACK, MAX_K, Answer, Engine, ServeConfig, thumbnail_jpeg
from .metrics import CONTENT_TYPE, Metrics, RequestMetrics

log = logging.getLogger(__name__)

_ID = re.compile(r"[0-9]{1,18}")
_FORM_SLACK = 64 << 10  # multipart headers and boundaries around the file
RETRY_AFTER_S = 1


class HitModel(BaseModel):
    """One `query --json` result, plus the item's id (for thumbnails and "more like this"). `path` is relative
    to the indexed folder (absolute only with ServeConfig.show_paths: no server path goes to a client)."""

    rank: int
    path: str
    score: float
    label: str
    id: int


class Timings(BaseModel):
    decode_ms: float | None = None  # uploads only: decode + the encoder's preprocessing
    embed_ms: float | None = None  # uploads only: the forward of the whole encoder batch
    search_ms: float
    total_ms: float  # in the server, from the request's start to the answer (includes reading and waiting)
    batch: int = 1  # uploads embedded in the same encoder batch


class ServedByModel(BaseModel):
    """The index generation that answered and its encoder's fingerprint (one generation per answer, always)."""

    generation: int
    fingerprint: str


class SearchResponse(BaseModel):
    """A `query --json` element ({"query", "results", "served_by"}) plus the query item's id (similar) and the
    timings."""

    query: str
    query_id: int | None = None
    results: list[HitModel]
    timings: Timings
    served_by: ServedByModel


class LabelCount(BaseModel):
    label: str
    count: int


class EncoderModel(BaseModel):
    spec: str
    fingerprint: str
    dim: int
    image_size: int
    engine: str  # how uploads are embedded (retrieval.encoder.engine)
    crop_pct: float  # their eval preprocessing, as the DB's vectors were made (retrieval.encoder.config)
    resize_mode: str
    tta: str


class AnnModel(BaseModel):
    kind: str
    factory: str


class StatsResponse(BaseModel):
    items: int
    labels: list[LabelCount]
    encoder: EncoderModel
    ann: AnnModel | None  # None until the first FAISS build
    generation: int
    faiss_lags: bool  # FAISS is behind LMDB (an index run is going on): the rest is searched exactly
    device: str
    served_by: ServedByModel


class _TooLarge(Exception):
    pass


def create_app(cfg: ServeConfig, loaded: Engine | None = None) -> FastAPI:
    """The service as a FastAPI app. The encoder and index load when the app starts (its lifespan), unless an
    engine already `loaded` is given (run_server loads it first, so a failure is one line, not a lifespan's
    traceback); the app closes it when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = loaded or await run_in_threadpool(Engine, cfg)
        app.state.metrics = Metrics(app.state.engine)
        app.state.engine.on_batch = app.state.metrics.batch.observe
        app.state.thumbs = OrderedDict()
        app.state.admission = Admission(cfg.queue_size, cfg.decode_threads or cpu_count())
        try:
            yield
        finally:
            await run_in_threadpool(app.state.engine.close)

    app = FastAPI(title="circle-retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)
    page = resources.files("indexer.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    if cfg.api_key:
        app.add_middleware(KeyMiddleware, key=cfg.api_key)
    app.add_middleware(RequestMetrics, metrics_of=lambda: app.state.metrics)  # outside: 401s are counted too
    if cfg.cors:  # outside the key check: a browser's preflight carries no key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cfg.cors], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])

    def engine(request: Request) -> Engine:
        return request.app.state.engine

    def _deadline() -> float:
        """When a request arriving now stops being worth computing (time.monotonic(), as the batcher's)."""
        return time.monotonic() + cfg.max_wait_ms / 1000

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text format (indexer.serve.metrics); needs the key when one is set."""
        return Response(request.app.state.metrics.scrape(), media_type=CONTENT_TYPE)

    @app.post("/api/search", response_model=SearchResponse)
    async def search(request: Request, k: int | None = Query(None, ge=1, le=MAX_K),
                     label: Annotated[list[str] | None, Query()] = None,
                     expand: int = Query(0, ge=0, le=MAX_K),
                     dedup: float | None = Query(None, ge=-1, le=1)) -> SearchResponse:
        """Top-k of an uploaded image (multipart field `image`), decoded and embedded as the indexer does;
        `label=` (repeatable): only items with one of these labels; `expand`: query expansion with that many
        top hits (0: off); `dedup`: collapse results whose cosine is >= it into the best-ranked one."""
        started, deadline = time.perf_counter(), _deadline()
        admission: Admission = request.app.state.admission
        eng = engine(request)
        wanted = k or cfg.k
        fetch = wanted if dedup is None else wanted * FETCH_FACTOR
        with _shed(), admission.admit():
            data, name = await _read_upload(request, cfg.max_upload_bytes)
            async with admission.decoding(deadline):
                decoding = time.perf_counter()
                try:
                    query = await run_in_threadpool(eng.make_query, data, name, fetch, tuple(label or ()),
                                                    cfg.max_pixels, expand)
                except DecodeError as exc:
                    raise HTTPException(400, str(exc)) from None
                decode_ms = 1000 * (time.perf_counter() - decoding)
            answer: Answer = await _queued(lambda b: b.submit(query, deadline), eng)
            hits = answer.hits
            if dedup is not None:  # as `query --dedup`, on the worker thread that owns the index
                hits = await _queued(lambda b: b.call(lambda: collapse_hits(eng.index, answer.hits, dedup)[:wanted],
                                                      deadline), eng)
        timings = Timings(decode_ms=decode_ms, embed_ms=answer.embed_ms, search_ms=answer.search_ms,
                          total_ms=1000 * (time.perf_counter() - started), batch=answer.batch)
        request.app.state.metrics.observe_stages(**timings.model_dump(exclude={"batch"}))
        return SearchResponse(query=name, results=_hits(hits, cfg.show_paths), timings=timings,
                              served_by=ServedByModel(**asdict(answer.served_by)))

    @app.get("/api/items/{item_id}/similar", response_model=SearchResponse)
    async def similar(request: Request, item_id: str, k: int | None = Query(None, ge=1, le=MAX_K),
                      label: Annotated[list[str] | None, Query()] = None) -> SearchResponse:
        """"More like this": the nearest other items to a stored item's embedding (no encoder pass); `label=` as
        for /api/search."""
        started = time.perf_counter()
        eng = engine(request)
        wanted = _parse_id(item_id)
        found = await _queued(lambda b: b.call(lambda: eng.similar(wanted, k or cfg.k, tuple(label or ())),
                                               _deadline()), eng)
        if found is None:
            raise HTTPException(404, "no such item")
        item, hits, search_ms, served = found
        timings = Timings(search_ms=search_ms, total_ms=1000 * (time.perf_counter() - started))
        request.app.state.metrics.observe_stages(**timings.model_dump(exclude={"batch"}))
        query = str(eng.file_of(item)) if cfg.show_paths else item.relpath
        return SearchResponse(query=query, query_id=item.id, results=_hits(hits, cfg.show_paths), timings=timings,
                              served_by=ServedByModel(**asdict(served)))

    @app.get("/api/items/{item_id}/thumbnail", response_class=Response)
    async def thumbnail(request: Request, item_id: str) -> Response:
        """A small JPEG of an indexed item, by id (cached: an id's content never changes)."""
        wanted = _parse_id(item_id)
        thumbs: OrderedDict[int, bytes] = request.app.state.thumbs
        jpeg = thumbs.get(wanted)
        if jpeg is None:
            eng = engine(request)
            item = await _queued(lambda b: b.call(lambda: eng.item(wanted), _deadline()), eng)
            if item is None:
                raise HTTPException(404, "no such item")
            try:
                jpeg = await run_in_threadpool(thumbnail_jpeg, eng.file_of(item), cfg.thumb_px, cfg.max_pixels)
            except DecodeError as exc:
                raise HTTPException(404, f"the item's file cannot be read now: {exc.reason}") from None
            thumbs[wanted] = jpeg
            while len(thumbs) > cfg.thumb_cache:
                thumbs.popitem(last=False)
        thumbs.move_to_end(wanted)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/api/stats", response_model=StatsResponse)
    async def stats(request: Request) -> dict:
        eng = engine(request)
        return await _queued(lambda b: b.call(eng.stats, _deadline()), eng)

    return app


def run_server(cfg: ServeConfig) -> None:
    """Serve until SIGTERM or Ctrl-C, then let requests in flight finish (at most cfg.drain_s) and return.

    What can fail fails first, in one RetrievalError, before the model loads: a public host without a key
    (auth.check_exposure), the port (bound here and handed to
    uvicorn), then the DB (Engine opens it before it loads the encoder). Another host than loopback is the
    user's explicit choice, logged as a warning."""
    import uvicorn

    check_exposure(cfg)
    if cfg.host not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this machine can search the index and see its images",
                    cfg.host)
    with _listen(cfg.host, cfg.port) as sock:
        engine = Engine(cfg)
        config = uvicorn.Config(create_app(cfg, engine), log_level="info", timeout_graceful_shutdown=cfg.drain_s)
        log.info("serving http://%s:%d", cfg.host, sock.getsockname()[1])
        uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it); RetrievalError if the address is taken or wrong."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RetrievalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another process uses it: stop it or choose another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise RetrievalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


async def _queued(put: Any, eng: Engine) -> Any:
    """Queue work on the engine's worker (put(batcher) -> Future) and await it; 503 + Retry-After when the queue
    is full or the job expired unrun."""
    with _shed():
        future: Future = put(eng.batcher)
        return await asyncio.wrap_future(future)


@contextmanager
def _shed() -> Iterator[None]:
    """Busy (a full queue, too many uploads) and Expired (waited past --max-wait-ms) as 503 + Retry-After."""
    try:
        yield
    except Expired as exc:
        raise HTTPException(503, f"busy: {exc} (--max-wait-ms); retry shortly",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except Busy as exc:
        raise HTTPException(503, f"busy: {exc}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def _hits(hits: tuple[Hit, ...], show_paths: bool) -> list[HitModel]:
    return [HitModel(rank=h.rank, path=h.path if show_paths else h.relpath, score=h.score, label=h.label, id=h.id)
            for h in hits]


def _parse_id(text: str) -> int:
    """An item id from the URL: decimal digits only, anything else is simply not an item (404)."""
    if not _ID.fullmatch(text):
        raise HTTPException(404, "no such item")
    return int(text)


async def _read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """(bytes, client's file name) of the multipart field `image`; 413 as soon as the body passes `limit`
    (at once from Content-Length, else while it streams), 400 for anything but one image field."""
    too_large = HTTPException(413, f"upload larger than the limit of {_mb(limit)} (--max-upload-mb)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "send the image as multipart/form-data in the field 'image'")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + _FORM_SLACK:
        raise too_large

    async def capped() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + _FORM_SLACK:
                raise _TooLarge
            yield chunk

    try:
        form = await parse_multipart(request.headers, capped(), max_files=1, max_fields=8)
    except _TooLarge:
        raise too_large from None
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed upload: {exc.message}") from None
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "no file in the form field 'image'")
        if upload.size is not None and upload.size > limit:
            raise too_large
        data = await upload.read()
        return data, upload.filename or "upload"
    finally:
        await form.close()


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"
