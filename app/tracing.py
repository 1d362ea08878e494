"""OpenTelemetry tracing, off unless the standard `OTEL_*` variables ask for it.

The opentelemetry packages are an optional extra (`pip install -e '.[tracing]'`):
most deployments only scrape `/metrics`, so nothing here imports them until
tracing is on, and the service runs without them installed.

Each request to a `/v1/` route gets a `distill.request` server span, a child of
the caller's W3C `traceparent` if it sent one. It ends when the response is
closed: for a stream that is its last byte or the client leaving, the moment
`StreamTracker.close` also records it. The pipeline knows nothing of spans:
`traced()` wraps the runner's items and opens one child span per stage, from the
stage's progress-0 event to its progress-1 event, as `metrics.observe` does for
timings.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from flask import Flask, Response, current_app, request

from pipeline.runner import CLUSTERING, EMBEDDING, MMR, SELECTION
from pipeline.types import DedupeRequest, Result, StageEvent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

EXTENSION = "distill.tracing"
REQUEST_SPAN = "distill.request"
SERVICE_NAME = "distill"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one
_SPAN = "distill.span"  # request.environ key of the request's span


@dataclass(frozen=True)
class Tracing:
    """Kept in `app.extensions`: the provider (to flush or shut down) and our tracer."""

    provider: TracerProvider
    tracer: Tracer


def tracing_requested(env: Mapping[str, str]) -> bool:
    """On when an exporter is named, or an OTLP endpoint is set, as OpenTelemetry's own
    auto-instrumentation reads them; `OTEL_SDK_DISABLED=true` or exporter `none` wins."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def init_tracing(app: Flask, provider: TracerProvider | None = None) -> None:
    """Trace `/v1/` requests into `provider`, or into one built from the environment.

    A test passes its own provider: OpenTelemetry lets a process set the global
    one only once, so the app never touches the global.
    """
    if provider is None:
        if not tracing_requested(os.environ):
            return
        provider = _provider_from_env(os.environ)
        if provider is None:
            return
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from . import __version__

    tracer = provider.get_tracer("distill", __version__)
    app.extensions[EXTENSION] = Tracing(provider, tracer)
    propagator = TraceContextTextMapPropagator()

    @app.before_request
    def start_request_span() -> None:
        rule = request.url_rule
        if rule is None or request.method == "OPTIONS" or not rule.rule.startswith("/v1/"):
            return  # probes, scrapes and preflights would only be noise
        request.environ[_SPAN] = tracer.start_span(
            REQUEST_SPAN,
            context=propagator.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "distill.endpoint": rule.rule,
                "http.route": rule.rule,
                "http.request.method": request.method,
            },
        )

    @app.after_request
    def end_request_span(response: Response) -> Response:
        span = request.environ.get(_SPAN)
        if span is None:
            return response
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 500:
            span.set_status(Status(StatusCode.ERROR))
        if response.is_streamed:
            response.call_on_close(span.end)  # last byte sent, or the client gone
        else:
            span.end()
        return response


def traced(
    events: Iterator[StageEvent | Result], dedupe_request: DedupeRequest
) -> Iterator[StageEvent | Result]:
    """The runner's items, unchanged; with tracing on, a child span per stage.

    Call it inside the request: it reads the request's span and the service's
    default lambda now, because a stream iterates in another greenlet, outside
    the request context.
    """
    request_span = request.environ.get(_SPAN)
    if request_span is None:
        return events
    lambda_ = dedupe_request.lambda_
    if lambda_ is None:
        lambda_ = current_app.extensions["distill"].defaults.lambda_
    tracer = current_app.extensions[EXTENSION].tracer
    return _stage_spans(events, tracer, request_span, dedupe_request, lambda_)


def _stage_spans(
    events: Iterator[StageEvent | Result],
    tracer: Tracer,
    request_span: Span,
    dedupe_request: DedupeRequest,
    lambda_: float,
) -> Iterator[StageEvent | Result]:
    from opentelemetry.trace import Status, StatusCode, set_span_in_context

    parent = set_span_in_context(request_span)  # explicit: not whatever is current when iterated
    stage_span: Span | None = None
    selected = 0  # the selection's output is MMR's input
    try:
        for item in events:
            if isinstance(item, StageEvent) and item.progress == 0.0:
                stage_span = tracer.start_span(
                    f"distill.{item.stage}",
                    context=parent,
                    attributes=_known_before(item.stage, dedupe_request, lambda_, selected),
                )
            elif isinstance(item, StageEvent) and item.progress == 1.0 and stage_span is not None:
                stats = item.stats or {}
                stage_span.set_attributes(_known_after(item.stage, stats))
                if item.stage == SELECTION:
                    selected = stats["selected"]
                stage_span.end()
                stage_span = None
            elif isinstance(item, Result):
                request_span.set_attributes(_result_attributes(item))
            yield item
    except Exception as exc:
        status = Status(StatusCode.ERROR, getattr(exc, "message", type(exc).__name__))
        if stage_span is not None:
            stage_span.record_exception(exc)
            stage_span.set_status(status)
        request_span.set_status(status)
        raise
    finally:
        if stage_span is not None:  # failed, or the client left mid-stage
            stage_span.end()


def _known_before(
    stage: str, dedupe_request: DedupeRequest, lambda_: float, selected: int
) -> dict[str, Any]:
    """Attributes a stage span gets when it starts (so a failed stage has them too)."""
    if stage == EMBEDDING:
        return {"distill.embedding.chunk_count": len(dedupe_request.texts_to_embed)}
    if stage == MMR:
        return {"distill.mmr.input_count": selected, "distill.mmr.lambda": lambda_}
    return {}


def _known_after(stage: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Attributes only the stage's own stats tell (the runner resolves the threshold)."""
    if stage == CLUSTERING:
        return {
            "distill.clustering.input_count": stats["input_count"],
            "distill.clustering.threshold": stats["threshold"],
        }
    if stage == SELECTION:
        return {"distill.selection.cluster_count": stats["selected"]}
    return {}


def _result_attributes(result: Result) -> dict[str, Any]:
    return {
        "distill.result.input_count": result.input_count,
        "distill.result.output_count": result.output_count,
        "distill.result.cluster_count": result.cluster_count,
        "distill.result.latency_ms": result.latency_ms,
        "distill.result.reduction_ratio": 1 - result.output_count / result.input_count,
    }


def _provider_from_env(env: Mapping[str, str]) -> TracerProvider | None:
    """A provider batching spans to an OTLP-over-HTTP exporter, which reads its own
    `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers, timeout, compression).

    None, with a warning, when the extra is not installed: a platform may set
    `OTEL_*` for every service, and that must not stop this one from starting.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "tracing requested by OTEL_* variables, but %s; it stays off "
            "(install the extra: pip install 'distill-py[tracing]')", exc,
        )
        return None
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the SDK reads OTEL_TRACES_SAMPLER itself
    names = {n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")}
    if names - {"otlp", ""}:
        log.warning("OTEL_TRACES_EXPORTER=%s: only otlp is supported; exporting with otlp",
                    env["OTEL_TRACES_EXPORTER"])
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
