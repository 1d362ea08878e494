"""Prometheus metrics: the Go service's names and labels, plus per-stage timing.

Declared once at import; the app only calls `.labels(...).inc()` and friends.
Under gunicorn, `PROMETHEUS_MULTIPROC_DIR` (set by gunicorn.conf.py) makes
prometheus_client write per-process files, and `/metrics` sums them, so a
scrape shows every worker, not the one that happened to answer.

A stream's duration and status are recorded when its last byte is sent (or
the client leaves), not when Flask returns the generator.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator

from flask import Flask, Response, request
from prometheus_client import Counter, Gauge, Histogram

from pipeline.types import Result, StageEvent

from .streaming import ShuttingDown

# .005 ... 5 as the Go service; 10-120 s added because a large stream lasts that long.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATIO_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))
STATUS_CLIENT_CLOSED = "499"  # nginx's code for "the client went away first"

REQUESTS = Counter(
    "distill_requests_total", "HTTP requests by endpoint and status.", ["endpoint", "status"]
)
REQUEST_DURATION = Histogram(
    "distill_request_duration_seconds",
    "Request duration (a stream: until its last byte).",
    ["endpoint"],
    buckets=DURATION_BUCKETS,
)
CHUNKS_PROCESSED = Counter(
    "distill_chunks_processed_total", "Chunks in and out of de-duplication.", ["direction"]
)
REDUCTION_RATIO = Histogram(
    "distill_reduction_ratio",
    "Share of input chunks removed, per request.",
    ["endpoint"],
    buckets=RATIO_BUCKETS,
)
ACTIVE_REQUESTS = Gauge(
    "distill_active_requests", "Requests in progress (streams until they end).",
    multiprocess_mode="livesum",
)
CLUSTERS_FORMED = Counter(
    "distill_clusters_formed_total", "Clusters formed.", ["endpoint"]
)
STAGE_DURATION = Histogram(
    "distill_stage_duration_seconds", "Pipeline stage duration.", ["stage"],
    buckets=DURATION_BUCKETS,
)
EMBEDDED_TEXTS = Counter("distill_embedded_texts_total", "Texts the model embedded.")
CACHE_LOOKUPS = Counter(
    "distill_embedding_cache_lookups_total",
    "Texts, windows and sentences looked up in each embedding cache layer.",
    ["layer", "result"],
)
CACHE_ERRORS = Counter(
    "distill_embedding_cache_errors_total",
    "Shared embedding store faults, each answered as a miss.",
    ["layer"],
)


class CacheMetrics:
    """The embedding cache's events (`pipeline.cache.CacheEvents`) as the counters above."""

    def lookups(self, layer: str, hits: int, misses: int) -> None:
        if hits:
            CACHE_LOOKUPS.labels(layer, "hit").inc(hits)
        if misses:
            CACHE_LOOKUPS.labels(layer, "miss").inc(misses)

    def faults(self, layer: str, count: int) -> None:
        CACHE_ERRORS.labels(layer).inc(count)


CACHE_METRICS = CacheMetrics()

_STARTED = "distill.started"
_DEFERRED = "distill.deferred"
_COUNTS = "distill.counts"

access_log = logging.getLogger("distill.access")


def init_metrics(app: Flask) -> None:
    """Expose `/metrics` (summed over workers under gunicorn) and time every request."""
    from prometheus_flask_exporter import PrometheusMetrics
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        GunicornInternalPrometheusMetrics(app, export_defaults=False)
    else:
        PrometheusMetrics(app, export_defaults=False)

    @app.before_request
    def start_timer():
        if request.path != "/metrics":
            request.environ[_STARTED] = time.perf_counter()
            ACTIVE_REQUESTS.inc()

    @app.after_request
    def record(response: Response) -> Response:
        if _STARTED in request.environ and not request.environ.get(_DEFERRED):
            finish(request.environ, _endpoint(), str(response.status_code))
        return response


def _endpoint() -> str:
    """The route's pattern, so unknown paths cannot explode label cardinality."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def finish(environ: dict, endpoint: str, status: str) -> None:
    """Record one request's count, duration and access-log line (once)."""
    started = environ.pop(_STARTED, None)
    if started is None:
        return
    seconds = time.perf_counter() - started
    REQUESTS.labels(endpoint, status).inc()
    REQUEST_DURATION.labels(endpoint).observe(seconds)
    ACTIVE_REQUESTS.dec()
    chunks_in, chunks_out = environ.get(_COUNTS, ("-", "-"))
    access_log.info(
        "%s %s %s %.1fms chunks_in=%s chunks_out=%s",
        environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), status, seconds * 1000,
        chunks_in, chunks_out,
    )


class StreamTracker:
    """Records a stream when the server closes it (last byte sent, or client gone).

    The stream reports how it ended through `on_end`; one that never reported
    (the client left first) counts as 499.
    """

    def __init__(self, environ: dict, endpoint: str):
        environ[_DEFERRED] = True
        self.environ, self.endpoint = environ, endpoint
        self.status = STATUS_CLIENT_CLOSED

    def on_end(self, outcome: Any) -> None:
        if isinstance(outcome, Result):
            self.status = "200"
        elif isinstance(outcome, ShuttingDown):
            self.status = "503"
        elif outcome is not None:
            self.status = "500"

    def close(self) -> None:
        finish(self.environ, self.endpoint, self.status)


def observe(
    events: Iterator[StageEvent | Result], endpoint: str, environ: dict
) -> Iterator[StageEvent | Result]:
    """Pass the runner's items through, recording stage timings and the result."""
    for item in events:
        if isinstance(item, StageEvent) and item.progress == 1.0 and item.stats:
            STAGE_DURATION.labels(item.stage).observe(item.stats["duration_ms"] / 1000)
            if item.stage == "embedding":
                EMBEDDED_TEXTS.inc(item.stats["embedded"])
        elif isinstance(item, Result):
            environ[_COUNTS] = (item.input_count, item.output_count)
            CHUNKS_PROCESSED.labels("input").inc(item.input_count)
            CHUNKS_PROCESSED.labels("output").inc(item.output_count)
            CLUSTERS_FORMED.labels(endpoint).inc(item.cluster_count)
            REDUCTION_RATIO.labels(endpoint).observe(1 - item.output_count / item.input_count)
        yield item
