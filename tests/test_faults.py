"""Faults: a stage that raises, a model that cannot load; the worker keeps serving."""

from __future__ import annotations

import json

from app import create_app
from app.config import Config

from .support import FaultInjectingModel

TEXTS = {"chunks": [{"id": "a", "text": "first text"}, {"id": "b", "text": "second text"}]}
VECTORS = {"chunks": [{"id": "a", "embedding": [1.0, 0.0]}, {"id": "b", "embedding": [0.0, 1.0]}]}


def events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for frame in raw.decode().strip().split("\n\n"):
        kind, data = frame.split("\n")
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_a_failing_stage_is_an_error_event_then_the_next_request_works(embedder):
    client = create_app(Config(), embedder=FaultInjectingModel(embedder)).test_client()
    response = client.post("/v1/dedupe/stream", json=TEXTS)
    stream = events(response.get_data())
    response.close()
    assert stream[0] == ("progress", {"stage": "embedding", "progress": 0.0})
    assert stream[-1] == ("error", {"error": "embedding failed: RuntimeError", "stage": "embedding"})
    assert [kind for kind, _ in stream].count("error") == 1
    assert b"Traceback" not in response.get_data() and b"injected" not in response.get_data()
    plain = client.post("/v1/dedupe", json=TEXTS)
    assert plain.status_code == 500
    assert plain.get_json() == {"error": "internal error in stage embedding"}
    assert client.post("/v1/dedupe", json=VECTORS).status_code == 200  # no model needed: fine


def test_a_model_that_cannot_load_is_a_503_and_vectors_still_work():
    client = create_app(Config(embedding_model="no-such/model")).test_client()
    for path in ("/v1/dedupe", "/v1/dedupe/stream"):
        response = client.post(path, json=TEXTS)
        assert response.status_code == 503
        assert response.get_json()["error"].startswith("embedding model unavailable")
    assert client.post("/v1/dedupe", json=VECTORS).status_code == 200
    assert client.get("/health").status_code == 200
