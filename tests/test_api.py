"""The HTTP API through Flask's test client, with the real bundled model.

Vectors written by the tests use a small dimension (Go mode: every chunk brings
its own embedding, so the model is not involved); texts go through the model.
"""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest

from app import __version__, create_app
from app.config import Config
from pipeline.embed import BUNDLED_MODEL, FastEmbedModel
from pipeline.profiles import model_threshold

DEDUPE = "/v1/dedupe"
STREAM = "/v1/dedupe/stream"
DIM = 8  # dimension of the vectors the tests write themselves
MODEL_DIM = 384
GO_THRESHOLD = 0.15

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
}
CHUNK_KEYS = ["id", "text", "score", "cluster_id"]
STATS_KEYS = ["input_count", "output_count", "cluster_count", "reduction_pct", "latency_ms"]

# --------------------------------------------------------------------------- helpers


def chunk(id=None, text=None, vec=None, score=None, **extra) -> dict:
    """A request chunk with only the fields given (a vector may be a numpy array)."""
    out = {"id": id, "text": text, "embedding": vec, "score": score}
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(out.get("embedding"), np.ndarray):
        out["embedding"] = out["embedding"].tolist()
    return {**out, **extra}


def basis(i: int, dim: int = DIM) -> list[float]:
    v = [0.0] * dim
    v[i] = 1.0
    return v


def blend(i: int, j: int, cos: float, dim: int = DIM) -> list[float]:
    """A unit vector at cosine `cos` to basis(i) (cosine distance 1 - cos), leaning to basis(j)."""
    v = [0.0] * dim
    v[i], v[j] = cos, math.sqrt(1 - cos * cos)
    return v


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def post(client, body, path=DEDUPE, **kwargs):
    return client.post(path, data=encode(body), **kwargs)


def zero_latency(raw: bytes) -> bytes:
    """Response bytes with the only varying fields (latency_ms, duration_ms) set to 0."""
    return re.sub(rb'"(latency_ms|duration_ms)":\d+', rb'"\1":0', raw)


def dedupe(client, body, **kwargs) -> dict:
    response = post(client, body, **kwargs)
    assert response.status_code == 200, response.data
    return response.get_json()


def ids(result: dict) -> list[str]:
    return [c["id"] for c in result["chunks"]]


def assert_json_error(response, status: int) -> str:
    """A JSON `{"error": <non-empty str>}` with `status`, the CORS header, no traceback."""
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    assert response.headers.get("Access-Control-Allow-Origin") == "*"
    body = json.loads(response.data)
    assert list(body) == ["error"]
    assert isinstance(body["error"], str) and body["error"]
    assert b"Traceback" not in response.data and b'File "' not in response.data
    return body["error"]


def sse_parse(raw: bytes) -> list[tuple[str, bytes]]:
    """Minimal event-stream parser: (event type, data bytes) per dispatched event."""
    events, event_type, data = [], "", []
    for line in re.split(rb"\r\n|\r|\n", raw):
        if line == b"":
            if data:
                events.append((event_type or "message", b"\n".join(data)))
            event_type, data = "", []
        elif line.startswith(b":"):
            continue
        else:
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"event":
                event_type = value.decode()
            elif field == b"data":
                data.append(value)
    return events


def stream(client, body):
    """POST to the stream route; return (response, [(event type, parsed data, raw data)])."""
    response = post(client, body, path=STREAM)
    assert response.status_code == 200, response.data
    raw = response.get_data()
    assert raw.endswith(b"\n\n")
    return response, [(kind, json.loads(data), data) for kind, data in sse_parse(raw)]


def stage_runs(events) -> dict[str, list[dict]]:
    """Progress events grouped by stage, checking each stage's events are contiguous."""
    runs: dict[str, list[dict]] = {}
    order: list[str] = []
    for kind, data, _ in events:
        if kind != "progress":
            continue
        if not order or order[-1] != data["stage"]:
            assert data["stage"] not in runs, f"stage {data['stage']} resumed after another"
            order.append(data["stage"])
        runs.setdefault(data["stage"], []).append(data)
    return runs


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A quick brown fox jumped over the lazy dog.",
    "Python is a popular programming language.",
    "Paris is the capital of France.",
    "The capital of France is Paris.",
    "Revenue rose 3% in the quarter.",
    "Revenue rose 5% in the quarter.",
    "Bananas are rich in potassium.",
]


def text_body(**fields) -> dict:
    return {
        "chunks": [chunk(id=str(i), text=t, score=round(1 - i / 10, 2)) for i, t in enumerate(TEXTS)],
        **fields,
    }


def vector_body(**fields) -> dict:
    """Go mode: 5 chunks, 4 distinct directions (c is a copy of a)."""
    return {
        "chunks": [
            chunk(id="a", text="alpha", vec=basis(0), score=0.5),
            chunk(id="b", text="beta", vec=basis(1), score=0.5),
            chunk(id="c", text="alpha again", vec=basis(0), score=0.9),
            chunk(id="d", text="delta", vec=basis(2), score=0.1),
            chunk(id="e", text="epsilon", vec=basis(3), score=0.3),
        ],
        **fields,
    }


@pytest.fixture
def broken_app():
    """An app whose model cannot load: fastembed refuses the unknown name at once."""
    app = create_app(Config(embedding_model="no-such/model"))
    assert isinstance(app.extensions["distill"].embedder, FastEmbedModel)
    return app


# --------------------------------------------------------------------------- routes


def test_index_names_the_service(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert list(body) == ["name", "version", "endpoints"]
    assert body["name"] == "distill"
    assert body["version"] == __version__


def test_index_lists_every_route(make_app):
    app = make_app()
    endpoints = app.test_client().get("/").get_json()["endpoints"]
    routes = [
        f"{method} {rule.rule}"
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
    ]
    assert {"GET /", "GET /health", "GET /metrics", "POST /v1/dedupe", "POST /v1/dedupe/stream"} <= set(routes)
    for route in routes:
        assert isinstance(endpoints.get(route), str) and endpoints[route], route


def test_every_listed_endpoint_exists(client):
    for route in client.get("/").get_json()["endpoints"]:
        method, path = route.split(" ", 1)
        response = client.open(path, method=method, data=b"{}")
        assert response.status_code not in (404, 405), route


def test_metrics_route(client):
    post(client, vector_body())
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers.get("Access-Control-Allow-Origin") == "*"
    assert b"# TYPE distill_requests_total counter" in response.data


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok"}
    assert response.headers.get("Access-Control-Allow-Origin") == "*"


def test_dedupe_route(client):
    response = post(client, vector_body())
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers.get("Access-Control-Allow-Origin") == "*"
    body = response.get_json()
    assert ids(body) == ["c", "b", "d", "e"]


def test_stream_route_headers(client):
    response = post(client, vector_body(), path=STREAM)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.mimetype_params.get("charset", "utf-8").lower() == "utf-8"
    assert response.headers.get("Cache-Control") == "no-cache"
    assert response.headers.get("X-Accel-Buffering") == "no"
    assert response.headers.get("Access-Control-Allow-Origin") == "*"
    assert "Connection" not in response.headers  # hop-by-hop: WSGI forbids it
    assert sse_parse(response.get_data())[-1][0] == "complete"


@pytest.mark.parametrize(
    "path", ["/", "/health", DEDUPE, STREAM, "/metrics", "/no/such/path", "/v1/whatever"]
)
def test_options_on_any_path_is_a_cors_preflight(client, path):
    response = client.options(path, headers={"Access-Control-Request-Method": "POST"})
    assert response.status_code == 200
    for name, value in CORS.items():
        assert response.headers.get(name) == value


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/dedupe/"), ("GET", "/static/app.js"), ("GET", "/v2/dedupe")],
)
def test_unknown_path_is_a_json_404(client, method, path):
    assert_json_error(client.open(path, method=method), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", DEDUPE, "POST"),
        ("PUT", DEDUPE, "POST"),
        ("DELETE", DEDUPE, "POST"),
        ("GET", STREAM, "POST"),
        ("PATCH", STREAM, "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/", "GET"),
    ],
)
def test_wrong_method_is_a_json_405(client, method, path, allowed):
    response = client.open(path, method=method, data=encode(vector_body()))
    assert_json_error(response, 405)
    assert allowed in response.headers["Allow"]


# --------------------------------------------------------------------------- bad bodies

V384_A = [1.0] + [0.0] * (MODEL_DIM - 1)
HUGE = b"1" + b"0" * 400  # an integer literal far beyond float64
SURROGATE_TEXT = b'{"chunks":[{"text":"a\\ud800","embedding":[1,0]' # lone surrogate: jsonio's fallback path


def b64(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def one(**fields) -> dict:
    return {"chunks": [chunk(text="hello", **fields)]}


def top(**fields) -> dict:
    return {"chunks": [chunk(vec=basis(0))], **fields}


BAD_BODIES = [
    # malformed JSON
    pytest.param(b'{"chunks": [', 400, {}, id="truncated"),
    pytest.param(b'{"chunks": [{"text": "a"}]} x', 400, {}, id="trailing-garbage"),
    pytest.param(b"", 400, {}, id="empty-body"),
    pytest.param(b"{'chunks': []}", 400, {}, id="single-quotes"),
    pytest.param(b'{"chunks": [{"text": "a",}]}', 400, {}, id="trailing-comma"),
    # not an object
    pytest.param(b'[{"text": "a"}]', 400, {}, id="top-level-array"),
    pytest.param(b'"hello"', 400, {}, id="top-level-string"),
    pytest.param(b"null", 400, {}, id="top-level-null"),
    pytest.param(b"42", 400, {}, id="top-level-number"),
    # not UTF-8
    pytest.param(b'{"chunks": [{"text": "a\xffb"}]}', 400, {}, id="utf8-invalid-byte"),
    pytest.param(b'{"chunks": [{"text": "a\xed\xa0\x80"}]}', 400, {}, id="utf8-encoded-surrogate"),
    pytest.param(b'{"chunks": [{"text": "\xc3"}]}', 400, {}, id="utf8-truncated"),
    pytest.param(b'{"chunks": [{"text": "\\ud800\xff"}]}', 400, {}, id="utf8-invalid-with-escape"),
    # non-finite tokens
    pytest.param(b'{"chunks": [{"text": "a", "score": NaN}]}', 400, {}, id="nan-score"),
    pytest.param(b'{"chunks": [{"text": "a"}], "threshold": Infinity}', 400, {}, id="infinity-threshold"),
    pytest.param(b'{"chunks": [{"embedding": [1, -Infinity]}]}', 400, {}, id="minus-infinity-vector"),
    pytest.param(b'{"chunks": [{"text": "\\ud800", "score": NaN}]}', 400, {}, id="nan-with-surrogate"),
    pytest.param(b'{"chunks": [{"text": "a", "score": 1e400}]}', 400, {}, id="score-1e400"),
    # chunks
    pytest.param({"chunks": []}, 400, {}, id="chunks-empty"),
    pytest.param({"chunks": None}, 400, {}, id="chunks-null"),
    pytest.param({"threshold": 0.2}, 400, {}, id="chunks-missing"),
    pytest.param({"chunks": {"text": "a"}}, 400, {}, id="chunks-object"),
    pytest.param({"chunks": "hello"}, 400, {}, id="chunks-string"),
    pytest.param({"chunks": 3}, 400, {}, id="chunks-number"),
    pytest.param({"chunks": ["hello"]}, 400, {}, id="chunk-string"),
    pytest.param({"chunks": [None]}, 400, {}, id="chunk-null"),
    pytest.param({"chunks": [[1, 2]]}, 400, {}, id="chunk-array"),
    pytest.param({"chunks": [{}]}, 400, {}, id="chunk-empty-object"),
    pytest.param({"chunks": [{"id": "x", "score": 1}]}, 400, {}, id="chunk-no-text-no-vector"),
    pytest.param({"chunks": [{"text": ""}]}, 400, {}, id="chunk-text-empty"),
    pytest.param({"chunks": [{"text": None, "embedding": None}]}, 400, {}, id="chunk-text-and-vector-null"),
    pytest.param({"chunks": [{"text": "", "embedding": []}]}, 400, {}, id="chunk-text-and-vector-empty"),
    # field types
    pytest.param({"chunks": [{"text": 5}]}, 400, {}, id="text-number"),
    pytest.param({"chunks": [{"text": ["a"]}]}, 400, {}, id="text-array"),
    pytest.param({"chunks": [{"text": True}]}, 400, {}, id="text-bool"),
    pytest.param(one(id=7), 400, {}, id="id-number"),
    pytest.param(one(id={"a": 1}), 400, {}, id="id-object"),
    pytest.param(one(score="0.9"), 400, {}, id="score-string"),
    pytest.param(one(score=True), 400, {}, id="score-bool"),
    pytest.param(one(score=[1]), 400, {}, id="score-array"),
    # embeddings
    pytest.param({"chunks": [chunk(vec=["1", "0"])]}, 400, {}, id="vector-strings"),
    pytest.param({"chunks": [chunk(vec=[True, False])]}, 400, {}, id="vector-bools"),
    pytest.param({"chunks": [chunk(vec=[[1, 0], [0, 1]])]}, 400, {}, id="vector-nested"),
    pytest.param({"chunks": [chunk(vec=[1, None])]}, 400, {}, id="vector-null-item"),
    pytest.param({"chunks": [chunk(vec={"0": 1})]}, 400, {}, id="vector-object"),
    pytest.param({"chunks": [chunk(vec=1.5)]}, 400, {}, id="vector-number"),
    pytest.param({"chunks": [chunk(vec=[1e39, 0])]}, 400, {}, id="vector-float32-overflow"),
    pytest.param({"chunks": [chunk(vec=[0, -1e39])]}, 400, {}, id="vector-float32-negative-overflow"),
    pytest.param({"chunks": [chunk(vec="!!not base64!!")]}, 400, {}, id="base64-invalid"),
    pytest.param({"chunks": [chunk(vec="AAA=")]}, 400, {}, id="base64-2-bytes"),
    pytest.param({"chunks": [chunk(vec="AAAAAAA=")]}, 400, {}, id="base64-5-bytes"),
    pytest.param({"chunks": [chunk(vec=b64([1.0, math.nan]))]}, 400, {}, id="base64-nan"),
    pytest.param({"chunks": [chunk(vec=basis(0)), chunk(vec=basis(0, 4))]}, 400, {}, id="mixed-dims"),
    pytest.param({"chunks": [chunk(vec=b64(basis(0))), chunk(vec=basis(0, 4))]}, 400, {}, id="mixed-dims-b64"),
    pytest.param({"chunks": [chunk(text="embed me"), chunk(vec=basis(0))]}, 400, {}, id="dim-not-model-dim"),
    pytest.param({"chunks": [chunk(text="embed me"), chunk(vec=V384_A)], "query_embedding": [1, 0]},
                 400, {}, id="query-dim-mismatch"),
    pytest.param({"chunks": [chunk(vec=basis(0))], "query": "what is it?"}, 400, {}, id="query-needs-model-dim"),
    # parameters
    pytest.param(top(threshold=-0.1), 400, {}, id="threshold-negative"),
    pytest.param(top(threshold=2.5), 400, {}, id="threshold-over-2"),
    pytest.param(top(threshold="0.2"), 400, {}, id="threshold-string"),
    pytest.param(top(threshold=True), 400, {}, id="threshold-bool"),
    pytest.param(top(**{"lambda": -0.1}), 400, {}, id="lambda-negative"),
    pytest.param(top(**{"lambda": 1.5}), 400, {}, id="lambda-over-1"),
    pytest.param(top(**{"lambda": "0.5"}), 400, {}, id="lambda-string"),
    pytest.param(top(target_k=-1), 400, {}, id="target-k-negative"),
    pytest.param(b'{"chunks": [{"text": "a"}], "target_k": 3.0}', 400, {}, id="target-k-3.0"),
    pytest.param(top(target_k=2.5), 400, {}, id="target-k-fraction"),
    pytest.param(top(target_k="3"), 400, {}, id="target-k-string"),
    pytest.param(top(target_k=False), 400, {}, id="target-k-bool"),
    pytest.param(top(guards=["digits"]), 400, {}, id="guards-unknown"),
    pytest.param(top(guards="numbers"), 400, {}, id="guards-not-list"),
    pytest.param(top(guards={"numbers": True}), 400, {}, id="guards-object"),
    pytest.param(top(linkage="ward"), 400, {}, id="linkage-unknown"),
    pytest.param(top(selection="random"), 400, {}, id="selection-unknown"),
    pytest.param(top(query=["q"]), 400, {}, id="query-not-string"),
    # integers beyond float64 (only parseable through the lone-surrogate fallback)
    pytest.param(SURROGATE_TEXT + b',"score":' + HUGE + b"}]}", 400, {}, id="huge-int-score"),
    pytest.param(SURROGATE_TEXT + b'}],"threshold":' + HUGE + b"}", 400, {}, id="huge-int-threshold"),
    pytest.param(SURROGATE_TEXT + b'}],"lambda":' + HUGE + b"}", 400, {}, id="huge-int-lambda"),
    # limits
    pytest.param({"chunks": [chunk(vec=basis(i)) for i in range(4)]}, 413, {"max_chunks": 3}, id="too-many-chunks"),
    pytest.param({"chunks": [None] * 4}, 413, {"max_chunks": 3}, id="too-many-bad-chunks"),
    pytest.param({"chunks": [chunk(text="x" * 200)]}, 413, {"max_body_bytes": 100}, id="body-too-large"),
]


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
@pytest.mark.parametrize(("body", "status", "config"), BAD_BODIES)
def test_bad_body_is_a_json_error(make_app, path, body, status, config):
    response = post(make_app(**config).test_client(), body, path=path)
    assert_json_error(response, status)


def test_bad_body_table_is_big_enough():
    assert len(BAD_BODIES) >= 40


def test_limits_are_not_off_by_one(make_app):
    assert post(make_app(max_chunks=3).test_client(), {"chunks": [chunk(vec=basis(i)) for i in range(3)]}).status_code == 200
    body = encode({"chunks": [chunk(vec=basis(0))]})
    assert post(make_app(max_body_bytes=len(body)).test_client(), body).status_code == 200
    assert post(make_app(max_body_bytes=len(body) - 1).test_client(), body).status_code == 413


def test_dimension_error_names_both_dimensions(client):
    message = assert_json_error(post(client, {"chunks": [chunk(text="x"), chunk(vec=basis(0))]}), 400)
    assert str(DIM) in message and str(MODEL_DIM) in message


# --------------------------------------------------------------------------- Go-client compatibility


def test_threshold_zero_null_or_missing_means_the_default(client):
    # a-b at distance 0.1, c-d at 0.2, everything else ~1
    chunks = [
        chunk(id="a", vec=basis(0)),
        chunk(id="b", vec=blend(0, 1, 0.9)),
        chunk(id="c", vec=basis(2)),
        chunk(id="d", vec=blend(2, 3, 0.8)),
    ]
    clusters = {}
    for name, extra in {"missing": {}, "null": {"threshold": None}, "zero": {"threshold": 0},
                        "0.05": {"threshold": 0.05}, "0.3": {"threshold": 0.3}}.items():
        clusters[name] = dedupe(client, {"chunks": chunks, **extra})["stats"]["cluster_count"]
    assert clusters == {"missing": 3, "null": 3, "zero": 3, "0.05": 4, "0.3": 2}


def test_default_threshold_comes_from_the_config(make_app):
    chunks = [chunk(id="c", vec=basis(2)), chunk(id="d", vec=blend(2, 3, 0.8))]  # distance 0.2
    assert dedupe(make_app().test_client(), {"chunks": chunks})["stats"]["cluster_count"] == 2
    loose = make_app(threshold=0.25).test_client()
    assert dedupe(loose, {"chunks": chunks, "threshold": 0})["stats"]["cluster_count"] == 1


def mmr_body(**fields) -> dict:
    """3 singleton clusters: c (low score), a (top score), b (mid score, similar to a: cos 0.8)."""
    return {
        "chunks": [
            chunk(id="c", vec=basis(1), score=0.0),
            chunk(id="a", vec=basis(0), score=1.0),
            chunk(id="b", vec=blend(0, 2, 0.8), score=0.5),
        ],
        "target_k": 2,
        **fields,
    }


@pytest.mark.parametrize("extra", [{}, {"lambda": None}, {"lambda": 0}, {"lambda": 0.5}],
                         ids=["missing", "null", "zero", "half"])
def test_lambda_zero_null_or_missing_means_half(client, extra):
    # λ = 0.5: a first, then b scores 0.25 - 0.5*0.8 < 0 = c's, so c.
    # (a literal λ = 0 would pick c first; λ = 1 picks a, b)
    result = dedupe(client, mmr_body(**extra))
    assert ids(result) == ["a", "c"]
    assert [c["cluster_id"] for c in result["chunks"]] == [1, 0]  # MMR order, first-member ids


def test_lambda_is_used(client):
    assert ids(dedupe(client, mmr_body(**{"lambda": 1}))) == ["a", "b"]


def test_text_null_with_an_embedding(client):
    result = dedupe(client, {"chunks": [{"id": "x", "text": None, "embedding": basis(0), "score": 1}]})
    assert result["chunks"] == [{"id": "x", "text": "", "score": 1, "cluster_id": 0}]


@pytest.mark.parametrize("empty", [[], None], ids=["empty-list", "null"])
def test_empty_or_null_embedding_means_embed_the_text(make_app, empty):
    client = make_app().test_client()
    plain = {"chunks": [chunk(id="1", text=TEXTS[0]), chunk(id="2", text=TEXTS[2])]}
    with_empty = {"chunks": [{**c, "embedding": empty} for c in plain["chunks"]]}
    expected = zero_latency(post(client, plain).data)
    assert zero_latency(post(client, with_empty).data) == expected
    _, events = stream(client, with_empty)
    embedding = stage_runs(events)["embedding"]
    assert embedding[-1]["stats"]["embedded"] == 2


def test_unknown_fields_are_ignored(client):
    body = vector_body()
    noisy = {
        "chunks": [{**c, "metadata": {"source": "x"}, "extra": [1, 2]} for c in body["chunks"]],
        "model": "text-embedding-3-small",
        "options": {"deep": [None, True]},
    }
    assert zero_latency(post(client, noisy).data) == zero_latency(post(client, body).data)


def test_negative_scores_are_accepted_and_ranked(client):
    result = dedupe(client, {"chunks": [
        chunk(id="low", vec=basis(0), score=-2.5),
        chunk(id="high", vec=basis(0), score=-0.5),
        chunk(id="other", vec=basis(1), score=-10),
    ]})
    assert [(c["id"], c["score"]) for c in result["chunks"]] == [("high", -0.5), ("other", -10)]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream"])
def test_body_is_json_whatever_the_content_type(client, content_type):
    body = encode(vector_body())
    expected = zero_latency(client.post(DEDUPE, data=body, content_type="application/json").data)
    response = client.post(DEDUPE, data=body, content_type=content_type)
    if content_type is None:
        assert response.request.environ.get("CONTENT_TYPE") in (None, "")
    assert response.status_code == 200
    assert zero_latency(response.data) == expected


def test_lone_surrogate_becomes_a_replacement_character(client):
    raw = b'{"chunks": [{"id": "i\\udc00", "text": "caf\\u00e9 \\ud800 ok"}]}'
    response = post(client, raw)
    assert response.status_code == 200, response.data
    [out] = response.get_json()["chunks"]
    assert out["text"] == "café \ufffd ok"
    assert out["id"] == "i\ufffd"
    assert "\ufffd".encode() in response.data  # valid UTF-8 on the wire, not an escape of a surrogate


def test_scores_echo_exactly(client):
    raw = (
        b'{"chunks": [{"id": "a", "text": "x", "embedding": [1, 0], "score": 0.9},'
        b' {"id": "b", "text": "y", "embedding": [0, 1], "score": 3},'
        b' {"id": "c", "text": "z", "embedding": [-1, 0.1], "score": 0.1}]}'
    )
    response = post(client, raw)
    assert response.status_code == 200
    assert b'"score":0.9,' in response.data
    assert b'"score":3,' in response.data
    assert b'"score":0.1,' in response.data
    assert [c["score"] for c in response.get_json()["chunks"]] == [0.9, 3, 0.1]


def test_text_echoes_exactly(client):
    texts = ["tab\there", "line\nbreak", 'quote " and \\ backslash', "emoji \U0001F600 é 中文", "  spaced  "]
    body = {"chunks": [chunk(id=str(i), text=t, vec=basis(i)) for i, t in enumerate(texts)]}
    assert [c["text"] for c in dedupe(client, body)["chunks"]] == texts


def test_keys_are_in_go_struct_order(client):
    raw = post(client, vector_body()).data
    pairs = json.loads(raw, object_pairs_hook=lambda kv: kv)
    assert [k for k, _ in pairs] == ["chunks", "stats"]
    chunks, stats = pairs[0][1], pairs[1][1]
    assert chunks and all([k for k, _ in c] == CHUNK_KEYS for c in chunks)
    assert [k for k, _ in stats] == STATS_KEYS


def test_reduction_pct_truncates_like_go(client):
    stats = dedupe(client, vector_body())["stats"]
    assert stats["input_count"] == 5 and stats["output_count"] == 4 and stats["cluster_count"] == 4
    assert stats["reduction_pct"] == 19  # int((1 - 4/5) * 100), not 20


def test_reduction_pct_values(client):
    three = {"chunks": [chunk(id=i, vec=basis(0)) for i in "abc"]}
    assert dedupe(client, three)["stats"]["reduction_pct"] == 66
    assert dedupe(client, {"chunks": three["chunks"] + [chunk(vec=basis(1))]})["stats"]["reduction_pct"] == 50


@pytest.mark.parametrize("with_vector", [True, False], ids=["vector", "text"])
def test_single_chunk_is_returned_as_is(client, with_vector):
    one_chunk = chunk(id="only", text="Just one chunk here.", score=0.25, vec=basis(3) if with_vector else None)
    result = dedupe(client, {"chunks": [one_chunk], "target_k": 1})
    assert result["chunks"] == [{"id": "only", "text": "Just one chunk here.", "score": 0.25, "cluster_id": 0}]
    assert {k: v for k, v in result["stats"].items() if k != "latency_ms"} == {
        "input_count": 1, "output_count": 1, "cluster_count": 1, "reduction_pct": 0}
    assert isinstance(result["stats"]["latency_ms"], int) and result["stats"]["latency_ms"] >= 0


def test_cluster_ids_follow_first_members_and_selection_takes_top_score(client):
    result = dedupe(client, {"chunks": [
        chunk(id="x0", vec=basis(0), score=0.2),
        chunk(id="y0", vec=basis(1), score=0.5),
        chunk(id="x1", vec=basis(0), score=0.8),  # best of cluster 0
        chunk(id="z0", vec=basis(2), score=0.1),
        chunk(id="y1", vec=basis(1), score=0.5),  # ties y0: earliest wins
    ]})
    assert [(c["id"], c["cluster_id"]) for c in result["chunks"]] == [("x1", 0), ("y0", 1), ("z0", 2)]
    assert result["stats"]["cluster_count"] == 3


def test_ids_may_repeat_and_are_echoed(client):
    result = dedupe(client, {"chunks": [chunk(id="same", vec=basis(0)), chunk(id="same", vec=basis(1))]})
    assert ids(result) == ["same", "same"]


def test_base64_embeddings_give_the_same_bytes_as_json_numbers(client):
    rng = np.random.default_rng(42)
    base = rng.standard_normal((4, 16)).astype(np.float32)
    vectors = np.vstack([base, base[1] + 0.05 * rng.standard_normal(16).astype(np.float32)])
    scores = [0.1, 0.5, 0.3, 0.9, 0.7]

    def body(encode_vector):
        return {"chunks": [chunk(id=str(i), text=f"t{i}", vec=encode_vector(v), score=s)
                           for i, (v, s) in enumerate(zip(vectors, scores))], "target_k": 3}

    as_numbers = post(client, body(lambda v: v.tolist()))
    as_base64 = post(client, body(b64))
    assert as_numbers.status_code == as_base64.status_code == 200
    assert as_numbers.get_json()["stats"]["cluster_count"] == 4  # the near-copy merged
    assert zero_latency(as_base64.data) == zero_latency(as_numbers.data)


def test_mixed_input_embeds_only_the_missing_texts(client, embedder):
    given = embedder.embed(["A vector brought by the client."])[0]
    body = {"chunks": [chunk(id="v", text="irrelevant words", vec=given),
                       chunk(id="t1", text=TEXTS[2]), chunk(id="t2", text=TEXTS[3])]}
    _, events = stream(client, body)
    assert stage_runs(events)["embedding"][-1]["stats"]["embedded"] == 2
    assert ids(events[-1][1]) == ["v", "t1", "t2"]


# --------------------------------------------------------------------------- auth


@pytest.fixture
def auth_client(make_app):
    return make_app(api_keys=("k1", "k2")).test_client()


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_missing_key_is_a_401(auth_client, path):
    response = post(auth_client, vector_body(), path=path)
    assert assert_json_error(response, 401) == "Authorization header required"


@pytest.mark.parametrize("header", ["Bearer k3", "k3", "Bearer k1k2", "Basic k1", "Bearer "])
@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_wrong_key_is_a_401(auth_client, path, header):
    response = post(auth_client, vector_body(), path=path, headers={"Authorization": header})
    assert assert_json_error(response, 401) == "Invalid API key"


def test_auth_comes_before_the_body_is_read(auth_client):
    assert_json_error(post(auth_client, b"{not json"), 401)


@pytest.mark.parametrize("header", ["Bearer k2", "k1"])
def test_valid_key_is_accepted(auth_client, header):
    response = post(auth_client, vector_body(), headers={"Authorization": header})
    assert response.status_code == 200
    assert ids(response.get_json()) == ["c", "b", "d", "e"]
    streamed = post(auth_client, vector_body(), path=STREAM, headers={"Authorization": header})
    assert streamed.status_code == 200 and sse_parse(streamed.get_data())[-1][0] == "complete"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/"])
def test_open_routes_need_no_key(auth_client, path):
    assert auth_client.get(path).status_code == 200


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_preflight_needs_no_key(auth_client, path):
    response = auth_client.options(path, headers={"Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization"})
    assert response.status_code == 200
    for name, value in CORS.items():
        assert response.headers.get(name) == value


def test_without_keys_the_api_is_open(client):
    assert post(client, vector_body(), headers={"Authorization": "Bearer anything"}).status_code == 200


# --------------------------------------------------------------------------- model unavailable


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_texts_need_the_model_so_unavailable_is_a_503(broken_app, path):
    response = post(broken_app.test_client(), {"chunks": [chunk(text="hello"), chunk(text="world")]}, path=path)
    assert_json_error(response, 503)


def test_query_text_needs_the_model_too(broken_app):
    body = {"chunks": [chunk(vec=basis(0)), chunk(vec=basis(1))], "query": "what?", "target_k": 1}
    assert_json_error(post(broken_app.test_client(), body), 503)


def test_unavailable_model_stays_a_503(broken_app):
    client = broken_app.test_client()
    for _ in range(2):  # the failed load is remembered, not retried into a different error
        assert_json_error(post(client, {"chunks": [chunk(text="hello")]}), 503)


def test_vectors_need_no_model(broken_app, client):
    response = post(broken_app.test_client(), vector_body())
    assert response.status_code == 200
    assert zero_latency(response.data) == zero_latency(post(client, vector_body()).data)
    _, events = stream(broken_app.test_client(), vector_body())
    assert events[-1][0] == "complete"


# --------------------------------------------------------------------------- stream events

STAGE_STATS = {
    "embedding": ["embedded", "windows", "tokens", "duration_ms"],
    "clustering": ["clusters_formed", "input_count", "threshold", "guarded_pairs", "guarded_by", "duration_ms"],
    "selection": ["selected", "duration_ms"],
    "mmr": ["output_count", "duration_ms"],
}


def check_stream(events) -> tuple[dict[str, list[dict]], dict]:
    """Structural checks common to every stream; return the stage runs and the result."""
    kinds = [kind for kind, _, _ in events]
    assert set(kinds) <= {"progress", "complete", "error"}
    terminal = [k for k in kinds if k in ("complete", "error")]
    assert terminal == ["complete"] and kinds[-1] == "complete"
    runs = stage_runs(events)
    for stage, run in runs.items():
        progress = [e["progress"] for e in run]
        assert progress[0] == 0 and progress[-1] == 1, stage
        assert all(0 <= p <= 1 for p in progress)
        assert progress == sorted(progress)
        assert "stats" not in run[0]
        stats = run[-1]["stats"]
        keys = [k for k in stats if k != "sentences"]  # sentences: with the coverage guard
        assert keys == STAGE_STATS[stage], stage
        assert all(isinstance(stats[k], int) for k in stats if k not in ("threshold", "guarded_by"))
        if stage == "clustering":
            assert sum(stats["guarded_by"].values()) == stats["guarded_pairs"]
            assert ("sentences" in stats) == ("coverage" in stats["guarded_by"])
        assert stats["duration_ms"] >= 0
    return runs, events[-1][1]


def test_stream_runs_every_stage_in_order(client):
    _, events = stream(client, text_body(target_k=3))
    runs, result = check_stream(events)
    assert list(runs) == ["embedding", "clustering", "selection", "mmr"]
    stats = {stage: run[-1]["stats"] for stage, run in runs.items()}
    assert stats["embedding"]["embedded"] == len(TEXTS)
    assert stats["clustering"]["input_count"] == len(TEXTS)
    assert stats["clustering"]["clusters_formed"] == result["stats"]["cluster_count"]
    assert stats["selection"]["selected"] == result["stats"]["cluster_count"] > 3
    assert stats["mmr"]["output_count"] == result["stats"]["output_count"] == 3


def test_stream_complete_equals_the_dedupe_response(client):
    for body in [text_body(target_k=3), text_body(), vector_body(), mmr_body()]:
        _, events = stream(client, body)
        check_stream(events)
        kind, _, data = events[-1]
        assert kind == "complete"
        assert zero_latency(data) == zero_latency(post(client, body).data)


def test_stream_skips_embedding_when_every_chunk_has_a_vector(client):
    _, events = stream(client, vector_body())
    runs, result = check_stream(events)
    assert list(runs) == ["clustering", "selection"]
    clustering = runs["clustering"][-1]["stats"]
    assert clustering["threshold"] == GO_THRESHOLD  # Go mode
    assert clustering["guarded_pairs"] == 0
    assert clustering["clusters_formed"] == 4 == result["stats"]["cluster_count"]


@pytest.mark.parametrize(("target_k", "mmr_runs"), [(0, False), (1, True), (2, True), (3, False), (4, False)])
def test_stream_runs_mmr_only_when_it_would_cut(client, target_k, mmr_runs):
    _, events = stream(client, mmr_body(target_k=target_k))  # 3 representatives
    runs, result = check_stream(events)
    assert ("mmr" in runs) is mmr_runs
    assert result["stats"]["output_count"] == (target_k if mmr_runs else 3)


@pytest.mark.parametrize(
    ("config", "extra", "expected"),
    [
        ({}, {}, model_threshold(BUNDLED_MODEL)),
        ({}, {"threshold": 0}, model_threshold(BUNDLED_MODEL)),
        ({"model_threshold": 0.4}, {}, 0.4),
        ({"model_threshold": 0.4}, {"threshold": 0.5}, 0.5),
        ({"threshold": 0.3}, {}, model_threshold(BUNDLED_MODEL)),  # the Go-mode default does not apply
    ],
)
def test_model_mode_threshold(make_app, config, extra, expected):
    _, events = stream(make_app(**config).test_client(), text_body(**extra))
    runs, _ = check_stream(events)
    assert runs["clustering"][-1]["stats"]["threshold"] == expected


def test_go_mode_threshold_from_config_and_request(make_app):
    for config, extra, expected in [({}, {}, 0.15), ({"threshold": 0.3}, {}, 0.3), ({}, {"threshold": 1.5}, 1.5)]:
        _, events = stream(make_app(**config).test_client(), vector_body(**extra))
        assert stage_runs(events)["clustering"][-1]["stats"]["threshold"] == expected


def test_number_guard_keeps_different_numbers_apart(client):
    chunks = [chunk(id="3", text="Revenue rose 3% in the quarter."),
              chunk(id="5", text="Revenue rose 5% in the quarter."),
              chunk(id="cat", text="The cat sat on the mat.")]
    _, events = stream(client, {"chunks": chunks})  # model mode: guards ["numbers"] by default
    runs, result = check_stream(events)
    assert runs["clustering"][-1]["stats"]["guarded_pairs"] == 1
    assert ids(result) == ["3", "5", "cat"]
    _, events = stream(client, {"chunks": chunks, "guards": []})
    runs, result = check_stream(events)
    assert runs["clustering"][-1]["stats"]["guarded_pairs"] == 0
    assert ids(result) == ["3", "cat"]


def test_stream_frames_are_one_line_json(client):
    raw = post(client, text_body(target_k=2), path=STREAM).get_data()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    for frame in frames[:-1]:
        event, data = frame.split(b"\n")
        assert re.fullmatch(rb"event: (progress|complete)", event)
        assert data.startswith(b"data: {") and data.endswith(b"}")


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("path", [DEDUPE, STREAM])
def test_same_request_same_bytes(client, path):
    body = encode(text_body(target_k=3, chunks=text_body()["chunks"] + vector_free_duplicates()))
    first = zero_latency(post(client, body, path=path).get_data())
    assert b'"chunks"' in first
    for _ in range(19):
        assert zero_latency(post(client, body, path=path).get_data()) == first


def vector_free_duplicates() -> list[dict]:
    """Exact and near duplicates with tied scores, so tie-breaking is exercised."""
    return [chunk(id="dup-fox", text=TEXTS[0], score=1.0), chunk(id="dup-paris", text=TEXTS[4], score=0.6)]


def test_with_the_embedding_cache_on_the_answer_is_the_same(make_app):
    client = make_app(embed_cache_mb=1).test_client()
    body = {"chunks": [chunk(id=str(i), text=t) for i, t in enumerate(TEXTS)]}
    first, second = post(client, body), post(client, body)
    assert first.status_code == second.status_code == 200
    assert zero_latency(first.data) == zero_latency(second.data)
    _, events = stream(client, body)
    assert stage_runs(events)["embedding"][-1]["stats"]["embedded"] == len(TEXTS)  # as without the cache


GO_MODE_GOLDEN = (
    b'{"chunks":[{"id":"a","text":"","score":0.5,"cluster_id":0},'
    b'{"id":"d","text":"","score":3,"cluster_id":1},'
    b'{"id":"e","text":"t","score":-1,"cluster_id":2}],'
    b'"stats":{"input_count":5,"output_count":3,"cluster_count":3,"reduction_pct":40,"latency_ms":0}}'
)


def test_go_mode_answer_is_fixed_byte_for_byte(client):
    """Supplied vectors: Go threshold 0.15, no guard, highest score kept; these exact bytes."""
    body = {
        "chunks": [
            {"id": "a", "embedding": blend(0, 1, 0.99), "score": 0.5},
            {"id": "b", "embedding": basis(0), "score": 0.4},
            {"id": "c", "embedding": basis(2), "score": 2},
            {"id": "d", "embedding": blend(2, 3, 0.9), "score": 3},
            {"id": "e", "text": "t", "embedding": basis(4), "score": -1},
        ]
    }
    assert zero_latency(post(client, body).data) == GO_MODE_GOLDEN
