"""End to end through a real `gunicorn -c gunicorn.conf.py` (gevent workers) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .support import Server, SSEParser, read_events, synthetic_texts

pytestmark = pytest.mark.e2e

SMALL = {
    "chunks": [
        {"id": "1", "text": "React is a JavaScript library for building user interfaces.", "score": 0.9},
        {"id": "2", "text": "React.js is a JS library for building UIs.", "score": 0.8},
        {"id": "3", "text": "Vue is a progressive JavaScript framework.", "score": 0.7},
        {"id": "4", "text": "Revenue rose 3% in the second quarter.", "score": 0.6},
        {"id": "5", "text": "Revenue rose 5% in the second quarter.", "score": 0.5},
    ],
    "target_k": 3,
}


def big_body(n: int = 2000, seed: int = 0) -> dict:
    return {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(synthetic_texts(n, seed))]}


def without_latency(result: dict) -> dict:
    result["stats"]["latency_ms"] = 0
    return result


@pytest.fixture(scope="module")
def server():
    """One worker, so "the worker stays responsive" means this very worker."""
    running = Server(WEB_CONCURRENCY="1", DISTILL_SSE_HEARTBEAT_S="0.02").start()
    yield running
    running.stop()


def is_fractional_embedding(event) -> bool:
    data = event.json
    return event.type == "progress" and data["stage"] == "embedding" and 0 < data["progress"] < 1


def test_stream_events_and_complete_equal_the_json_endpoint(server):
    conn, response = server.open_stream(SMALL)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Cache-Control") == "no-cache"
    assert response.getheader("X-Accel-Buffering") == "no"
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    events = read_events(response, SSEParser())
    conn.close()
    progress = [(e.json["stage"], e.json["progress"]) for e in events if e.type == "progress"]
    stages = list(dict.fromkeys(stage for stage, _ in progress))
    assert stages == ["embedding", "clustering", "selection", "mmr"]
    for stage in stages:
        own = [p for s, p in progress if s == stage]
        assert own[0] == 0 and own[-1] == 1
    assert [e.type for e in events].count("complete") == 1 and events[-1].type == "complete"
    status, body = server.post("/v1/dedupe", SMALL)
    assert status == 200
    assert without_latency(events[-1].json) == without_latency(json.loads(body))


def test_bad_input_is_a_plain_4xx_before_any_stream(server):
    conn, response = server.open_stream({"chunks": []})
    assert response.status == 400
    assert response.getheader("Content-Type") == "application/json"
    assert "error" in json.loads(response.read())
    conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_shows_events_while_the_work_happens(server):
    curl = subprocess.Popen(
        ["curl", "-sN", "--data-binary", "@-", f"http://127.0.0.1:{server.port}/v1/dedupe/stream"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    curl.stdin.write(json.dumps(big_body(600)).encode())
    curl.stdin.close()
    first = curl.stdout.readline()
    data = curl.stdout.readline()
    assert first == b"event: progress\n"
    assert json.loads(data.removeprefix(b"data: ")) == {"stage": "embedding", "progress": 0.0}
    assert curl.poll() is None  # the event arrived while the request was still running
    rest = curl.stdout.read()
    assert curl.wait() == 0
    assert rest.count(b"event: complete\n") == 1
    assert rest.rstrip(b"\n").split(b"\n\n")[-1].startswith(b"event: complete\n")


def test_health_answers_and_heartbeats_flow_while_a_large_stream_computes(server):
    conn, response = server.open_stream(big_body())
    parser = SSEParser()
    read_events(response, parser, until=is_fractional_embedding)
    reached = parser.events[-1].json["progress"]
    status, body = server.get("/health")  # same single worker, mid-computation
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    later = read_events(response, parser)
    conn.close()
    assert any(is_fractional_embedding(e) and e.json["progress"] > reached for e in later)
    assert "keep-alive" in parser.comments
    assert parser.events[-1].type == "complete"
    assert parser.events[-1].json["stats"]["input_count"] == 2000


def test_a_client_that_disconnects_stops_the_work(server):
    before = server.metrics()
    conn, response = server.open_stream(big_body(seed=113))  # texts no earlier request cached
    read_events(response, SSEParser(), until=is_fractional_embedding)
    conn.sock.close()
    conn.close()
    for _ in range(600):  # wait (bounded) for the server to notice and clean up
        after = server.metrics()
        if after[("distill_active_requests", ())] == 0:
            break
        server.get("/health")
    assert after[("distill_active_requests", ())] == 0
    stream_499 = ("distill_requests_total", (("endpoint", "/v1/dedupe/stream"), ("status", "499")))
    assert after.get(stream_499, 0) == before.get(stream_499, 0) + 1
    clustering = ("distill_stage_duration_seconds_count", (("stage", "clustering"),))
    embedded = ("distill_embedded_texts_total", ())
    assert after.get(clustering, 0) == before.get(clustering, 0)  # no later stage ran
    assert after.get(embedded, 0) == before.get(embedded, 0)  # embedding never finished
    status, _ = server.post("/v1/dedupe", SMALL)  # and the worker serves the next request
    assert status == 200


@pytest.mark.parametrize(
    "variable, value",
    [("DISTILL_MAX_CHUNKS", "lots"), ("DISTILL_THRESHOLD", "3"), ("WEB_CONCURRENCY", "0")],
)
def test_a_bad_setting_stops_gunicorn_at_once_naming_the_variable(variable, value):
    finished = Server(**{variable: value}).run_until_exit()
    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in finished.stderr
