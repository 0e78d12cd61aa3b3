"""Prometheus metrics of one app, in its own CollectorRegistry (tests build several apps in one process).

    metrics = Metrics(engine)                       # gauges read the engine's live state when scraped
    app.add_middleware(RequestMetrics, metrics_of=lambda: metrics)   # the app's Metrics once it has started
    metrics.observe_stages(decode_ms=..., embed_ms=..., search_ms=..., total_ms=...)
    text = metrics.scrape()                         # the text format GET /metrics answers

Requests are labelled by route template and status (never by path or id). The index generation served
(indexer.store.generations) is a gauge, beside the snapshot's commit counter and the encoder's fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("serve_request_duration_seconds", "Time from a request's start to its answer",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("serve_stage_duration_seconds", "Searches by stage: decode (uploads: decode + "
                               "preprocessing), embed (the whole encoder batch), search, total (in the handler)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("serve_batch_size", "Uploads per encoder batch", buckets=BATCH_BUCKETS, registry=r)
        self.shed = Counter("serve_shed", "Requests answered 503 (busy: try again after Retry-After)", ["route"],
                            registry=r)
        Gauge("serve_queue_depth", "Jobs waiting for the engine's worker", registry=r).set_function(
            engine.batcher.depth)
        Gauge("serve_index_items", "Items in the index snapshot served", registry=r).set_function(
            lambda: engine.status.items)
        Gauge("serve_db_generation", "The served snapshot's DB generation (+1 per committed write)",
              registry=r).set_function(lambda: engine.status.generation)
        Gauge("serve_index_generation", "The index generation served (switched by `generations --activate` or "
              "`index --model`)", registry=r).set_function(lambda: engine.status.index_generation)
        Gauge("serve_faiss_lags", "1 while FAISS is behind LMDB (the rest is searched exactly)",
              registry=r).set_function(lambda: float(engine.status.lagging))
        self._encoder = Info("serve_encoder", "The encoder the DB is bound to", registry=r)
        self._engine = engine

    def observe_stages(self, **ms: float | None) -> None:
        """Stage durations in ms, by stage name without `_ms` (None: the stage did not run)."""
        for name, value in ms.items():
            if value is not None:
                self.stage.labels(name.removesuffix("_ms")).observe(value / 1000)

    def scrape(self) -> bytes:
        status = self._engine.status
        self._encoder.info({"spec": status.encoder_name, "fingerprint": status.fingerprint})
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics_of: Callable[[], Metrics]):
        self.app, self._metrics_of = app, metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "other")  # set by FastAPI's router once matched
            metrics = self._metrics_of()
            metrics.requests.labels(route, scope["method"], str(status)).inc()
            metrics.duration.labels(route).observe(time.perf_counter() - started)
            if status == 503:
                metrics.shed.labels(route).inc()
