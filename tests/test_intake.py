"""The per-worker intake bound, /ready, and big bodies parsed by the helper process:
the same requests and the same errors as orjson and validation (the reference)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal

import numpy as np
import pytest

from app import create_app, jsonio
from app.config import Config, ConfigError, load_config
from app.intake import Intake, Unavailable
from app.parsing import INLINE_MAX_BYTES, BodyParser
from app.streaming import draining
from app.validate import ApiError, parse_request

MIB = 1024 * 1024

# --------------------------------------------------------------------------- the bound


def test_requests_are_taken_until_the_bound_then_refused():
    intake = Intake(max_inflight_bytes=100)
    first, second, third = (intake.ticket({}) for _ in range(3))
    first.take(60)
    second.take(40)
    assert intake.inflight_bytes == 100 and not intake.has_room()
    with pytest.raises(Unavailable) as info:
        third.take(1)
    assert info.value.status == 503 and info.value.retry_after_s >= 1
    assert third.held == 0  # a refused request holds nothing
    first.release()
    third.take(60)
    assert intake.inflight_bytes == 100


def test_a_request_bigger_than_the_bound_is_taken_only_alone():
    intake = Intake(max_inflight_bytes=100)
    small, big = intake.ticket({}), intake.ticket({})
    small.take(1)
    with pytest.raises(Unavailable):
        big.take(500)
    small.release()
    big.take(500)  # alone: taken, so every size under the body limit is served in time
    big.take(500)  # a chunked body growing while it is alone
    assert intake.inflight_bytes == 1000


def test_release_is_idempotent():
    intake = Intake(max_inflight_bytes=100)
    ticket = intake.ticket({})
    ticket.take(30)
    ticket.release()
    ticket.release()
    assert intake.inflight_bytes == 0


def test_the_bound_is_read_from_the_environment():
    assert Config().max_inflight_bytes == 512 * MIB
    assert load_config({"DISTILL_MAX_INFLIGHT_BYTES": "1000"}).max_inflight_bytes == 1000
    for bad in ("0", "-1", "1GB", "1.5"):
        with pytest.raises(ConfigError, match="^DISTILL_MAX_INFLIGHT_BYTES"):
            load_config({"DISTILL_MAX_INFLIGHT_BYTES": bad})


# --------------------------------------------------------------------------- /ready


@pytest.fixture
def app():
    return create_app(Config())


def test_ready_is_in_the_index(app):
    assert "GET /ready" in app.test_client().get("/", headers={"Accept": "application/json"}).get_json()["endpoints"]


def test_ready_turns_503_at_the_bound_and_back(app):
    client, intake = app.test_client(), app.extensions["distill"].intake
    assert (client.get("/ready").status_code, client.get("/ready").get_json()) == (200, {"status": "ready"})
    ticket = intake.ticket({})
    ticket.take(intake.max_inflight_bytes)
    response = client.get("/ready")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "error" in response.get_json()
    assert client.get("/health").status_code == 200  # liveness is not readiness
    ticket.release()
    assert client.get("/ready").status_code == 200


def test_ready_is_503_while_draining(app):
    client = app.test_client()
    draining.start(30)
    try:
        response = client.get("/ready")
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert client.get("/health").status_code == 200
    finally:
        draining.deadline = None
    assert client.get("/ready").status_code == 200


def test_a_request_past_the_bound_is_a_503_with_retry_after(app):
    client, intake = app.test_client(), app.extensions["distill"].intake
    ticket = intake.ticket({})
    ticket.take(intake.max_inflight_bytes)
    try:
        response = client.post("/v1/dedupe", data=json.dumps({"chunks": [{"embedding": [1, 0]}]}))
    finally:
        ticket.release()
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert set(response.get_json()) == {"error"}
    assert intake.inflight_bytes == 0  # the refused request holds nothing


# --------------------------------------------------------------------------- the helper process


@pytest.fixture(scope="module")
def parser():
    parser = BodyParser(Config())
    yield parser
    parser.close()


def big(body: dict) -> bytes:
    """`body` as JSON, padded past INLINE_MAX_BYTES with trailing spaces (still valid JSON)."""
    raw = json.dumps(body).encode()
    return raw + b" " * max(0, INLINE_MAX_BYTES + 1 - len(raw))


def vector(i: int, dim: int = 1536) -> list[float]:
    return np.random.default_rng(i).normal(size=dim).round(8).tolist()


def reference(raw: bytes, config: Config = Config()):
    """What the request was before the fast decoder: orjson, then validation."""
    try:
        parsed = jsonio.loads(raw)
    except jsonio.JSONError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    return parse_request(parsed, config)


def assert_same_request(a, b) -> None:
    assert len(a.chunks) == len(b.chunks)
    for x, y in zip(a.chunks, b.chunks):
        assert (x.id, x.text, x.score, type(x.score)) == (y.id, y.text, y.score, type(y.score))
        assert (x.embedding is None) == (y.embedding is None)
        if x.embedding is not None:
            assert x.embedding.dtype == y.embedding.dtype == np.float32
            assert np.array_equal(x.embedding.view(np.uint32), y.embedding.view(np.uint32))  # bit for bit
    for name in ("threshold", "lambda_", "target_k", "guards", "linkage", "selection", "query", "frozen_count",
                 "explain"):
        assert getattr(a, name) == getattr(b, name)
    assert (a.query_embedding is None) == (b.query_embedding is None)
    if a.query_embedding is not None:
        assert np.array_equal(a.query_embedding.view(np.uint32), b.query_embedding.view(np.uint32))


GOOD = [
    pytest.param(
        {"chunks": [{"id": str(i), "embedding": vector(i), "score": i * 0.1} for i in range(200)],
         "target_k": 5, "threshold": 0.3, "lambda": 0.7, "linkage": "complete"},
        id="decimal-vectors",
    ),
    pytest.param(
        {"chunks": [{"id": str(i), "embedding": base64.b64encode(np.float32(vector(i)).tobytes()).decode(),
                     "score": 2**70 if i == 0 else i} for i in range(100)],
         "query_embedding": vector(999), "selection": "centroid"},
        id="base64-vectors-query-vector",
    ),
    pytest.param(
        {"chunks": [{"id": str(i), "text": "x" * 5000} if i % 2 else {"id": str(i), "text": "y", "embedding": vector(i, 384)}
                    for i in range(300)], "query": "what", "guards": ["numbers"]},
        id="texts-and-vectors",
    ),
    pytest.param({"chunks": [{"id": "é\ud800", "text": "z" * (2 * MIB)}]}, id="texts-only-lone-surrogate"),
    pytest.param(
        {"chunks": [{"id": f"[{i}]", "text": "see [1] and [[2]]", "embedding": [0, 1, -0.0, 5e-324, 3.4e38, 2**53 - 1, 0.1 + i],
                     "cache_control": "" if i else {"type": "ephemeral"}, "meta": {"tags": ["a", ["b"]]}}
                    for i in range(5_000)], "options": {"preserve_cache_prefix": True}},
        id="brackets-in-strings-integers-extremes",
    ),
]


@pytest.mark.parametrize("body", GOOD)
def test_the_helper_gives_the_reference_request(parser, body):
    raw = big(body)
    assert len(raw) > INLINE_MAX_BYTES
    from_helper, validation_s = parser(raw)
    assert_same_request(reference(raw), from_helper)
    assert validation_s >= 0


BAD = [
    pytest.param(b"{" + b'"chunks": [' + b"[1.0, 2.0], " * 200_000 + b"}", id="invalid-json"),
    pytest.param(b'{"chunks": [{"text": "\xff\xfe"}]}' + b" " * INLINE_MAX_BYTES, id="invalid-utf8"),
    pytest.param(big({"chunks": [{"embedding": vector(i, 8)} for i in range(500)] + [{"embedding": [1, "2"]}]}),
                 id="a-string-in-the-last-vector"),
    pytest.param(big({"chunks": [{"embedding": vector(i, 8)} for i in range(500)] + [{"embedding": [[1], [2]]}]}),
                 id="a-nested-vector"),
    pytest.param(big({"chunks": [{"embedding": vector(i, 8)} for i in range(500)] + [{"embedding": [1, True]}]}),
                 id="a-bool-in-a-vector"),
    pytest.param(big({"chunks": [{"embedding": vector(i, 8)} for i in range(50)] + [{"embedding": [1, 2]}]}),
                 id="dimensions-differ"),
    pytest.param(big({"chunks": [{"text": "a"}] * 10_001}), id="too-many-chunks"),
    pytest.param(big({"chunks": [{"embedding": vector(1, 8)}], "target_k": 3.0}), id="float-target-k"),
    pytest.param(big([1, 2, 3]), id="not-an-object"),
    pytest.param(b'{"chunks": [{"embedding": [1e999]}]}' + b" " * INLINE_MAX_BYTES, id="number-too-big"),
    pytest.param(b'{"chunks": [{"embedding": [1e39]}]}' + b" " * INLINE_MAX_BYTES, id="too-big-for-float32"),
    pytest.param(b"\xef\xbb\xbf" + big({"chunks": [{"text": "a"}]}), id="byte-order-mark"),
    pytest.param(b'{"chunks": [{"text": "a", "text": 5}]}' + b" " * INLINE_MAX_BYTES, id="a-repeated-key-last-wins"),
]


@pytest.mark.parametrize("raw", BAD)
def test_the_helper_refuses_what_the_reference_refuses_with_the_same_message(parser, raw):
    assert len(raw) > INLINE_MAX_BYTES
    with pytest.raises(ApiError) as expected:
        reference(raw)
    with pytest.raises(ApiError) as from_helper:
        parser(raw)
    assert (from_helper.value.status, from_helper.value.message) == (expected.value.status, expected.value.message)


def test_the_helper_applies_the_apps_limits_not_the_environments():
    parser = BodyParser(Config(max_chunks=3))
    try:
        with pytest.raises(ApiError) as info:
            parser(big({"chunks": [{"text": "a"}] * 4}))
    finally:
        parser.close()
    assert (info.value.status, info.value.message) == (413, "too many chunks: 4 > DISTILL_MAX_CHUNKS (3)")


def test_a_dead_helper_is_replaced(parser):
    body = big({"chunks": [{"id": "1", "embedding": vector(1)}]})
    parser(body)
    os.kill(parser._helper.process.pid, signal.SIGKILL)
    parser._helper.process.wait()
    assert parser(body)[0].chunks[0].id == "1"  # a new helper answers


def test_a_body_parsed_by_the_helper_gets_the_same_response_bytes(app):
    body = {"chunks": [{"id": str(i), "embedding": vector(i % 40, 64), "score": i % 7} for i in range(120)],
            "target_k": 10}
    small = json.dumps(body).encode()
    client = app.test_client()
    in_place = client.post("/v1/dedupe", data=small)
    helped = client.post("/v1/dedupe", data=big(body))
    assert in_place.status_code == helped.status_code == 200
    strip = lambda raw: re.sub(rb'"latency_ms":\d+', b"", raw)  # noqa: E731
    assert strip(in_place.data) == strip(helped.data)
    assert app.extensions["distill"].intake.inflight_bytes == 0
    app.extensions["distill"].parser.close()
