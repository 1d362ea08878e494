"""OpenTelemetry tracing through the Flask test client, with the real SDK.

Each app gets its own TracerProvider writing to an in-memory exporter (the
global provider can be set only once per process, so the app never uses it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app import create_app
from app.config import Config
from app.tracing import EXTENSION, tracing_requested

from .support import ROOT

DEDUPE = "/v1/dedupe"
STREAM = "/v1/dedupe/stream"
STAGES = ["distill.embedding", "distill.clustering", "distill.selection", "distill.mmr"]
TEXTS = [
    "The flight to Paris departs at nine in the morning.",
    "Revenue rose sharply in the second quarter.",
    "A violin concerto was performed at the museum.",
    "The glacier has retreated two kilometres since 1950.",
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def make_traced(embedder, exporter):
    """Build an app tracing into `exporter` (every span exported as it ends)."""
    providers = []

    def build(model=None, **fields):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        return create_app(Config(**fields), embedder=model or embedder, tracer_provider=provider)

    yield build
    for provider in providers:
        provider.shutdown()


@pytest.fixture
def client(make_traced):
    return make_traced().test_client()


def post(client, body, path=DEDUPE, **kwargs):
    return client.post(path, data=json.dumps(body), **kwargs)


def text_body(**fields) -> dict:
    return {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)], **fields}


def vector_body(**fields) -> dict:
    return {"chunks": [{"id": str(i), "embedding": np.eye(4)[i].tolist()} for i in range(4)], **fields}


def finished(exporter) -> dict[str, ReadableSpan]:
    """The ended spans by name (each name once: one request per test)."""
    spans = exporter.get_finished_spans()
    by_name = {span.name: span for span in spans}
    assert len(by_name) == len(spans), [span.name for span in spans]
    return by_name


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event, data) of each frame; heartbeat comments have no event line."""
    events = []
    for frame in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


class FailingModel:
    """The real model's name and dimension, but every batch fails: a crash mid-stage."""

    def __init__(self, model):
        self.model, self.name, self.batch_size = model, model.name, model.batch_size

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans
        return getattr(self.model, name)

    def encode(self, texts):
        raise RuntimeError("model crashed")


# --------------------------------------------------------------------------- spans and links


def test_every_stage_span_is_a_child_of_the_request_span(client, exporter):
    assert post(client, text_body(target_k=2)).status_code == 200
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == STAGES + ["distill.request"]  # the request ends last
    request = spans[-1]
    assert request.kind is SpanKind.SERVER
    assert request.parent is None  # no traceparent sent: a new trace
    assert request.attributes["distill.endpoint"] == DEDUPE
    for stage in spans[:-1]:
        assert stage.kind is SpanKind.INTERNAL
        assert stage.context.trace_id == request.context.trace_id
        assert stage.parent.span_id == request.context.span_id
        assert stage.status.status_code is StatusCode.UNSET


def test_stage_and_result_attributes(client, exporter, embedder):
    own_vector = embedder.embed(["Bring your own vector."])[0].tolist()
    chunks = [
        {"id": "a", "text": TEXTS[0]},
        {"id": "a2", "text": TEXTS[0]},  # the same text: embedded once, but two chunks
        *({"id": str(i), "text": t} for i, t in enumerate(TEXTS[1:])),
        {"id": "v", "text": "Bring your own vector.", "embedding": own_vector},
    ]
    response = post(client, {"chunks": chunks, "threshold": 0.3, "lambda": 0.7, "target_k": 2})
    assert response.status_code == 200
    stats = response.get_json()["stats"]
    spans = finished(exporter)

    assert spans["distill.embedding"].attributes["distill.embedding.chunk_count"] == 5
    assert dict(spans["distill.clustering"].attributes) == {
        "distill.clustering.input_count": 6,
        "distill.clustering.threshold": 0.3,
    }
    assert stats["cluster_count"] == 5  # the two copies merged; MMR picks 2 of 5
    assert spans["distill.selection"].attributes["distill.selection.cluster_count"] == 5
    assert dict(spans["distill.mmr"].attributes) == {
        "distill.mmr.input_count": 5,
        "distill.mmr.lambda": 0.7,
    }
    result = {k: v for k, v in spans["distill.request"].attributes.items() if k.startswith("distill.result.")}
    assert result == {
        "distill.result.input_count": 6,
        "distill.result.output_count": 2,
        "distill.result.cluster_count": 5,
        "distill.result.latency_ms": stats["latency_ms"],
        "distill.result.reduction_ratio": pytest.approx(4 / 6),
    }


def test_defaults_left_open_are_recorded_as_resolved(make_traced, exporter):
    app = make_traced(lambda_=0.3)
    assert post(app.test_client(), text_body(target_k=2)).status_code == 200
    spans = finished(exporter)
    assert spans["distill.mmr"].attributes["distill.mmr.lambda"] == 0.3
    model_threshold = app.extensions["distill"].defaults.model_threshold
    assert spans["distill.clustering"].attributes["distill.clustering.threshold"] == model_threshold


def test_traceparent_makes_the_request_span_its_child(client, exporter):
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{caller_span}-01"}
    assert post(client, vector_body(), headers=headers).status_code == 200
    spans = finished(exporter)
    request = spans["distill.request"]
    assert request.parent.is_remote
    assert request.parent.span_id == int(caller_span, 16)
    assert {s.context.trace_id for s in spans.values()} == {int(trace_id, 16)}


def test_supplied_embeddings_have_no_embedding_span(client, exporter):
    assert post(client, vector_body()).status_code == 200
    assert set(finished(exporter)) == {"distill.request", "distill.clustering", "distill.selection"}


# --------------------------------------------------------------------------- the stream


def test_a_streams_request_span_ends_when_the_stream_is_closed(client, exporter):
    response = post(client, text_body(target_k=2), path=STREAM)
    events = sse_events(response.get_data())
    assert events[-1][0] == "complete"
    assert [s.name for s in exporter.get_finished_spans()] == STAGES  # the request: still open

    response.close()  # what the server does after the last byte
    spans = finished(exporter)
    request = spans["distill.request"]
    assert request.attributes["distill.endpoint"] == STREAM
    assert all(spans[name].parent.span_id == request.context.span_id for name in STAGES)
    stats = events[-1][1]["stats"]
    assert request.attributes["distill.result.output_count"] == stats["output_count"] == 2
    assert request.attributes["distill.result.latency_ms"] == stats["latency_ms"]


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_a_failing_stage_ends_its_span_with_an_error(make_traced, exporter, embedder, path):
    client = make_traced(model=FailingModel(embedder)).test_client()
    response = post(client, text_body(), path=path)
    if path == STREAM:
        assert response.status_code == 200 and sse_events(response.get_data())[-1][0] == "error"
        response.close()
    else:
        assert response.status_code == 500
    spans = finished(exporter)
    assert set(spans) == {"distill.request", "distill.embedding"}  # no later stage ran
    embedding = spans["distill.embedding"]
    assert embedding.status.status_code is StatusCode.ERROR
    assert embedding.status.description == "embedding failed: RuntimeError"
    assert [event.name for event in embedding.events] == ["exception"]
    assert embedding.attributes["distill.embedding.chunk_count"] == len(TEXTS)
    assert spans["distill.request"].status.status_code is StatusCode.ERROR


def test_a_rejected_body_is_traced_without_stage_spans(client, exporter):
    assert post(client, {"chunks": "not a list"}).status_code == 400
    request = finished(exporter)["distill.request"]
    assert set(finished(exporter)) == {"distill.request"}
    assert request.attributes["http.response.status_code"] == 400
    assert request.status.status_code is StatusCode.UNSET  # the client's mistake, not ours


def test_probes_scrapes_and_preflights_are_not_traced(client, exporter):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.options(DEDUPE).status_code == 200
    assert exporter.get_finished_spans() == ()


# --------------------------------------------------------------------------- switching it on


@pytest.mark.parametrize(
    "env, on",
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "distill"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask(env, on):
    assert tracing_requested(env) is on


# Runs in a fresh interpreter where importing opentelemetry fails, as when the
# extra is not installed; prints the opentelemetry modules it ended up loading.
WITHOUT_OPENTELEMETRY = """
import json, sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
from app import create_app
from app.config import Config
client = create_app(Config()).test_client()
body = json.dumps({"chunks": [{"id": "a", "embedding": [1, 0]}, {"id": "b", "embedding": [0, 1]}]})
for path in ("/v1/dedupe", "/v1/dedupe/stream"):
    response = client.post(path, data=body)
    assert response.status_code == 200 and b'"output_count":2' in response.get_data(), path
    response.close()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


@pytest.mark.parametrize("requested", [False, True])
def test_the_service_runs_without_opentelemetry_installed(requested):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if requested:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4318"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPENTELEMETRY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert ("pip install 'distill-py[tracing]'" in done.stderr) is requested


def test_the_environment_turns_on_otlp_export(monkeypatch, embedder):
    """The shipped path: OTEL_EXPORTER_OTLP_ENDPOINT alone sends OTLP/HTTP to that collector."""
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        app = create_app(Config(), embedder=embedder)
        assert post(app.test_client(), vector_body()).status_code == 200
        provider = app.extensions[EXTENSION].provider
        assert provider.force_flush()
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()

    assert received and {(path, kind) for path, kind, _ in received} == {
        ("/v1/traces", "application/x-protobuf")
    }
    exports = [ExportTraceServiceRequest.FromString(body) for _, _, body in received]
    resources = [rs for export in exports for rs in export.resource_spans]
    names = {span.name for rs in resources for ss in rs.scope_spans for span in ss.spans}
    assert names == {"distill.request", "distill.clustering", "distill.selection"}
    service = {a.value.string_value for rs in resources for a in rs.resource.attributes if a.key == "service.name"}
    assert service == {"distill"}
