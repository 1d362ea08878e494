"""Routes. Thin: read and validate the body, run the one stage runner, encode."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, request

from pipeline.embed import ModelUnavailable
from pipeline.runner import drain, run
from pipeline.types import DedupeRequest, StageError

from . import jsonio
from .metrics import StreamTracker, observe
from .intake import Unavailable, read_body
from .page import ENDPOINTS as PAGE_ENDPOINTS
from .page import page_response, wants_page
from .streaming import draining, sse_frames
from .tracing import traced
from .validate import ApiError, check_against_model

api = Blueprint("api", __name__)

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event through at once
}

ENDPOINTS = {
    "POST /v1/dedupe": "de-duplicate chunks; one JSON response",
    "POST /v1/dedupe/stream": "de-duplicate chunks; Server-Sent Events of per-stage progress",
    "GET /health": "liveness",
    "GET /ready": "readiness: 503 while the worker is at its in-flight bound or draining",
    "GET /metrics": "Prometheus metrics",
    "GET /": "this index (a browser gets the page, as at /playground)",
    "GET /openapi.json": "this API's OpenAPI 3.1 document",
    **PAGE_ENDPOINTS,
}


def json_response(obj, status: int = 200) -> Response:
    return Response(jsonio.dumps(obj), status=status, mimetype="application/json")


@api.get("/")
def index() -> Response:
    """The JSON index; a browser (Accept names text/html) gets the page instead."""
    from . import __version__

    if wants_page():
        response = page_response()
    else:
        response = json_response({"name": "distill", "version": __version__, "endpoints": ENDPOINTS})
    response.vary.add("Accept")
    return response


@api.get("/health")
def health() -> Response:
    return json_response({"status": "ok"})


@api.get("/ready")
def ready() -> Response:
    """For load balancers: this worker takes work (503 at its intake bound or while draining)."""
    if draining.started:
        raise Unavailable("not ready: shutting down")
    if not current_app.extensions["distill"].intake.has_room():
        raise Unavailable("not ready: at its bound of request bytes in progress")
    return json_response({"status": "ready"})


@api.post("/v1/dedupe")
def dedupe() -> Response:
    started, dedupe_request = _read_request()
    try:
        result = drain(_run(dedupe_request, started, "/v1/dedupe"))
    except StageError as exc:
        if isinstance(exc.__cause__, ModelUnavailable):
            raise ApiError(503, exc.message) from exc
        current_app.logger.error("dedupe failed in %s", exc.stage, exc_info=exc.__cause__)
        raise ApiError(500, f"internal error in stage {exc.stage}") from exc
    return json_response(result.to_wire())


@api.post("/v1/dedupe/stream")
def dedupe_stream() -> Response:
    endpoint = "/v1/dedupe/stream"
    started, dedupe_request = _read_request()
    tracker = StreamTracker(request.environ, endpoint)
    frames = sse_frames(
        _run(dedupe_request, started, endpoint),
        current_app.extensions["distill"].heartbeat_s,
        tracker.on_end,
    )
    response = Response(frames, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(tracker.close)
    return response


def _read_request() -> tuple[float, DedupeRequest]:
    """Take the body in, parse and validate it (a 4xx, or a 503 past the worker's bound);
    note when parsing ended."""
    service = current_app.extensions["distill"]
    ticket = service.intake.ticket(request.environ)
    body = read_body(request.environ, service.config.max_body_bytes, ticket, service.parser.buffer)
    dedupe_request, validation_s = service.parser(body)
    del body
    started = time.perf_counter() - validation_s
    if dedupe_request.needs_model:  # (else the check has nothing to do: no hand-off for it)
        service.offload(check_against_model, dedupe_request, service.embedder, service.cache, service.config)
    return started, dedupe_request


def _run(dedupe_request: DedupeRequest, started: float, endpoint: str):
    service = current_app.extensions["distill"]
    events = run(
        dedupe_request,
        service.embedder,
        service.defaults,
        service.offload,
        started=started,
        cache=service.cache,
    )
    return traced(observe(events, endpoint, request.environ), dedupe_request)
