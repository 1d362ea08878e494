"""Metrics through the Flask test client: what a request adds to a real scrape."""

from __future__ import annotations

import json

from app import create_app
from app.config import Config

from .support import FaultInjectingModel, delta, scrape, synthetic_texts

STREAM = "/v1/dedupe/stream"


def stage_ms(raw: bytes) -> int:
    """Sum of the stages' own duration_ms, read from the stream's final progress events."""
    total = 0
    for frame in raw.decode().split("\n\n"):
        lines = frame.split("\n")
        if lines[0] == "event: progress":
            data = json.loads(lines[1][len("data: "):])
            total += data.get("stats", {}).get("duration_ms", 0)
    return total


def test_a_stream_is_timed_until_its_last_byte(client):
    before = scrape(client)
    body = {"chunks": [{"text": t} for t in synthetic_texts(300)]}
    response = client.post(STREAM, json=body)
    raw = response.get_data()
    response.close()  # the server closes the response after the last byte
    after = scrape(client)
    recorded = delta(before, after, "distill_request_duration_seconds_sum", endpoint=STREAM)
    assert recorded * 1000 >= stage_ms(raw) > 0  # not just the time to return the generator
    assert delta(before, after, "distill_requests_total", endpoint=STREAM, status="200") == 1
    assert after[("distill_active_requests", ())] == before.get(("distill_active_requests", ()), 0)


def test_a_stream_ending_in_an_error_event_is_recorded_as_500(embedder):
    client = create_app(Config(), embedder=FaultInjectingModel(embedder)).test_client()
    before = scrape(client)
    response = client.post(STREAM, json={"chunks": [{"text": "a"}, {"text": "b"}]})
    assert response.status_code == 200
    assert b"event: error" in response.get_data()
    response.close()
    after = scrape(client)
    assert delta(before, after, "distill_requests_total", endpoint=STREAM, status="500") == 1
    assert after[("distill_active_requests", ())] == before.get(("distill_active_requests", ()), 0)


def test_refused_requests_are_counted_and_timed(make_app):
    client = make_app(api_keys=("k",)).test_client()
    before = scrape(client)
    assert client.post("/v1/dedupe", json={"chunks": [{"text": "x"}]}).status_code == 401
    after = scrape(client)
    assert delta(before, after, "distill_requests_total", endpoint="/v1/dedupe", status="401") == 1
    assert delta(before, after, "distill_request_duration_seconds_count", endpoint="/v1/dedupe") == 1
