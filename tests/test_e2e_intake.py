"""Taking bodies in, through a real gunicorn: the body limit however a body arrives,
and the per-worker bound on bytes in progress (503 with Retry-After, /ready, metrics)."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from app.intake import PIECE_BYTES
from app.parsing import INLINE_MAX_BYTES

from .support import Server, SSEParser, delta, read_events

ENDPOINTS = ("/v1/dedupe", "/v1/dedupe/stream")
TOO_LARGE = {"error": "request body too large"}
PIECE = 64 * 1024


def padded_body(size: int) -> bytes:
    """A valid Go-mode request of exactly `size` bytes (JSON allows trailing spaces)."""
    body = b'{"chunks":[{"id":"a","embedding":[1,0]},{"id":"b","embedding":[0.6,0.8]}]}'
    assert size >= len(body)
    return body + b" " * (size - len(body))


def send(server: Server, path: str, body: bytes, chunked: bool) -> tuple[int, bytes]:
    conn = server.connection()
    try:
        if chunked:  # no Content-Length: Transfer-Encoding: chunked
            pieces = iter([body[i : i + PIECE] for i in range(0, len(body), PIECE)])
            conn.request("POST", path, pieces, {"Content-Type": "application/json"}, encode_chunked=True)
        else:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def answered(path: str, raw: bytes) -> dict:
    """The result, from the JSON endpoint or the stream's `complete` event."""
    if path.endswith("/stream"):
        parser = SSEParser()
        parser.feed(raw.decode())
        return next(e.json for e in parser.events if e.type == "complete")
    return json.loads(raw)


# --------------------------------------------------------------------------- the body limit

LIMITS = [
    pytest.param(1_000_000, id="1MB-parsed-in-place"),
    pytest.param(3_000_000, id="3MB-parsed-by-the-helper"),
]


@pytest.fixture(scope="module", params=LIMITS)
def limited(request):
    server = Server(DISTILL_MAX_BODY_BYTES=str(request.param)).start()
    yield server, request.param
    server.stop()


def test_the_two_limits_send_bodies_both_ways_to_parse():
    assert 1_000_000 <= INLINE_MAX_BYTES < 3_000_000


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_body_exactly_at_the_limit_is_served(limited, path, chunked):
    server, limit = limited
    status, raw = send(server, path, padded_body(limit), chunked)
    assert status == 200, raw[:200]
    result = answered(path, raw)
    assert [c["id"] for c in result["chunks"]] == ["a", "b"]


@pytest.mark.parametrize("over", [1, 500_000], ids=["one-byte-over", "half-a-MB-over"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_body_over_the_limit_is_a_413_before_parsing(limited, path, chunked, over):
    server, limit = limited
    status, raw = send(server, path, padded_body(limit + over), chunked)
    assert (status, json.loads(raw)) == (413, TOO_LARGE)  # not a 400 from parsing a cut body
    assert server.get("/health")[0] == 200  # and the worker serves on


@pytest.mark.parametrize("first_size", [300, 2_500_000], ids=["small-first", "big-first"])
def test_requests_pipelined_on_one_connection_are_each_read_whole(limited, first_size):
    """The body is read straight from the socket: what gunicorn had already read past the
    headers counts, and bytes past the body (the next request) stay the next request's."""
    server, limit = limited
    first = padded_body(min(first_size, limit))
    second = b'{"chunks":[{"id":"c","embedding":[0,1]}]}'
    requests = b"".join(
        b"POST /v1/dedupe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        for body in (first, second)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(requests)  # both at once: the second may arrive with the first's headers
        replies = sock.makefile("rb")  # one reader for both answers
        answers = [read_answer(replies) for _ in range(2)]
    assert [(status, [c["id"] for c in json.loads(body)["chunks"]]) for status, body in answers] == [
        (200, ["a", "b"]), (200, ["c"])
    ]


def read_answer(replies) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from a buffered reader: status and body."""
    status = int(replies.readline().split()[1])
    length = 0
    while (line := replies.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, replies.read(length)


def test_a_body_cut_short_is_a_400_and_the_worker_serves_on(limited):
    server, _ = limited
    body = padded_body(200_000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        head = b"POST /v1/dedupe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
        sock.sendall(head + body[:150_000])
        sock.shutdown(socket.SHUT_WR)  # the client stops sending 50,000 bytes early
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, error = response.status, json.loads(response.read())["error"]
    assert (status, error) == (400, f"request body ended after 150000 of {len(body)} bytes")
    assert server.get("/health")[0] == 200


# --------------------------------------------------------------------------- the per-worker bound

BOUND = 100_000


@pytest.fixture(scope="module")
def bounded():
    server = Server(DISTILL_MAX_INFLIGHT_BYTES=str(BOUND)).start()  # one worker
    yield server
    server.stop()


def raw_request(server: Server, path: str, headers: dict[str, str], first_bytes: bytes = b"") -> socket.socket:
    """Headers and the start of a body on a raw socket; the rest is for the caller to send."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first_bytes)
    return sock


def response_on(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def wait_until_ready_is(server: Server, status: int) -> None:
    """Poll /ready (a bounded number of round trips) until it answers `status`."""
    for _ in range(500):
        if server.get("/ready")[0] == status:
            return
    raise AssertionError(f"/ready never answered {status}")


def test_ready_is_200_when_the_worker_takes_work(bounded):
    status, raw = bounded.get("/ready")
    assert (status, json.loads(raw)) == (200, {"status": "ready"})


@pytest.mark.parametrize("path", ENDPOINTS)
def test_past_the_bound_requests_get_503_with_retry_after_before_their_body_is_read(bounded, path):
    body = padded_body(BOUND)
    before = bounded.metrics()
    holder = raw_request(bounded, "/v1/dedupe", {"Content-Length": str(len(body))}, body[:10])
    try:
        wait_until_ready_is(bounded, 503)  # the whole declared body counts from the headers on
        status, raw = bounded.get("/ready")
        assert status == 503 and "error" in json.loads(raw)

        # Declared length: refused at once, though not one byte of its body was sent.
        refused = raw_request(bounded, path, {"Content-Length": "5000"})
        response = response_on(refused)
        assert response.status == 503
        assert int(response.getheader("Retry-After")) >= 1
        assert "error" in json.loads(response.read())
        refused.close()

        # Chunked: refused at its first piece read (PIECE_BYTES), the rest never sent.
        piece = padded_body(PIECE_BYTES + 1)
        first = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        chunked = raw_request(bounded, path, {"Transfer-Encoding": "chunked"}, first)
        response = response_on(chunked)
        assert response.status == 503 and response.getheader("Retry-After")
        chunked.close()

        # A client that sends its whole body before it reads (as most do) sees the 503 too.
        status, raw = send(bounded, path, padded_body(3 * PIECE_BYTES), chunked=False)
        assert status == 503 and "error" in json.loads(raw)

        holder.sendall(body[10:])  # the request held all along is served in full
        response = response_on(holder)
        assert response.status == 200
        assert [c["id"] for c in json.loads(response.read())["chunks"]] == ["a", "b"]
    finally:
        holder.close()
    assert bounded.get("/ready")[0] == 200  # its bytes are released once it is answered
    assert send(bounded, path, padded_body(5000), chunked=False)[0] == 200
    after = bounded.metrics()
    assert delta(before, after, "distill_requests_total", endpoint=path, status="503") == 3
    assert delta(before, after, "distill_requests_total", endpoint="/ready", status="503") >= 1


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_answer_releases_its_bytes(bounded, path):
    """A full-bound request, answered (a stream, an error), leaves the worker empty again:
    if its bytes stayed counted, /ready would say 503 and the next one would be refused."""
    for body in (padded_body(BOUND), b"[" + b" " * (BOUND - 1)):  # served, then a 400
        status, _ = send(bounded, path, body, chunked=False)
        assert status in (200, 400)
        assert bounded.get("/ready")[0] == 200
    conn = bounded.connection()
    conn.request("POST", "/v1/dedupe/stream", padded_body(BOUND), {"Content-Type": "application/json"})
    read_events(conn.getresponse(), SSEParser(), until=lambda e: e.type == "progress")
    conn.close()  # the client leaves mid-stream: once the server sees it, its bytes are free
    wait_until_ready_is(bounded, 200)
    assert send(bounded, path, padded_body(BOUND), chunked=False)[0] == 200


@pytest.mark.parametrize("value", ["0", "lots", "1.5e9"])
def test_a_bad_bound_stops_gunicorn_at_once_naming_the_variable(value):
    finished = Server(DISTILL_MAX_INFLIGHT_BYTES=value).run_until_exit()
    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DISTILL_MAX_INFLIGHT_BYTES" in lines[0]
    assert "Traceback" not in finished.stderr
