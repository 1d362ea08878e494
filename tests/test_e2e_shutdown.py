"""Graceful shutdown through gunicorn: SIGTERM never cuts a stream mid-frame."""

from __future__ import annotations

import signal

import pytest

from .support import Server, SSEParser, synthetic_texts

pytestmark = pytest.mark.e2e


def stream_body(n: int) -> dict:
    return {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(synthetic_texts(n, seed=n))]}


def read_raw_until_fractional(response, parser: SSEParser) -> bytes:
    raw = b""
    while True:
        line = response.readline()
        assert line, "stream ended early"
        raw += line
        for event in parser.feed(line.decode()):
            data = event.json
            if event.type == "progress" and 0 < data["progress"] < 1:
                return raw


def sigterm_mid_stream(server: Server, n: int) -> tuple[SSEParser, bytes]:
    conn, response = server.open_stream(stream_body(n))
    parser = SSEParser()
    raw = read_raw_until_fractional(response, parser)
    server.process.send_signal(signal.SIGTERM)
    rest = response.read()  # to the end of the chunked body: the server closed it properly
    conn.close()
    parser.feed(rest.decode())
    assert server.process.wait(timeout=90) == 0
    return parser, raw + rest


def assert_whole_frames(raw: bytes, parser: SSEParser) -> None:
    assert raw.endswith(b"\n\n")
    assert parser._buffer == "" and not parser._data  # nothing half-received
    terminal = [e.type for e in parser.events if e.type in ("complete", "error")]
    assert len(terminal) == 1


def test_a_started_stream_finishes_after_sigterm():
    server = Server(GUNICORN_CMD_ARGS="--graceful-timeout 60").start()
    try:
        parser, raw = sigterm_mid_stream(server, 400)
    finally:
        server.stop()
    assert_whole_frames(raw, parser)
    assert parser.events[-1].type == "complete"
    assert parser.events[-1].json["stats"]["input_count"] == 400


def test_a_stream_that_cannot_finish_in_time_ends_with_an_error_event():
    server = Server(GUNICORN_CMD_ARGS="--graceful-timeout 3").start()
    try:
        parser, raw = sigterm_mid_stream(server, 6000)
    finally:
        server.stop()
    assert_whole_frames(raw, parser)
    last = parser.events[-1]
    assert last.type == "error"
    assert last.json == {"error": "server shutting down before the stream could finish", "stage": "embedding"}
