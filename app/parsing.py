"""Parse and validate request bodies without freezing the worker's event loop.

simdjson (`jsonio.RequestDecoder`) parses a body ~5x faster than orjson and
hands vectors over as arrays: a 35 MB body of decimal vectors is ~80 ms of
parsing and validation, not ~0.35 s. But its parse is one C call that holds
the GIL, and on 2 busy cores a thread holding the GIL can wait for a core
while the event loop waits for the GIL: parsed on a thread of the worker, such
bodies held `/health` for ~0.5 s in a flood. So a body bigger than
`INLINE_MAX_BYTES` is parsed and validated by a helper process, one per worker,
which sends back the request with every vector in one float32 matrix. On the
loop that costs a socket copy and a small pickle: a few milliseconds, with the
loop serving others between pieces. Smaller bodies (~1 ms or less) are parsed
in place, as the hand-off would cost more.

The helper gets the worker's `Config` at start, so both apply the same
limits, and the same code (`jsonio.RequestDecoder`, `validate.parse_request`)
runs in both places: the same answers and the same error messages.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import gevent
import numpy as np
from gevent.lock import Semaphore

from pipeline.types import Chunk, DedupeRequest

from . import jsonio
from .config import Config
from .intake import Unavailable
from .validate import ApiError, parse_request

log = logging.getLogger(__name__)

INLINE_MAX_BYTES = 1 << 20  # parsed and validated in ~1-3 ms on the loop
_ROOT = Path(__file__).resolve().parent.parent
_HEADER = struct.Struct("!Q")
_SOCKET_BUFFER = 4 << 20
_PIECE_BYTES = 256 * 1024  # as bodies are read: the loop serves others between pieces


def parse_body(
    body: bytes | bytearray, config: Config, decoder: jsonio.RequestDecoder | None = None
) -> tuple[DedupeRequest, float]:
    """The validated request and the seconds its validation took (a 4xx on any problem).
    `decoder`: one to reuse (its buffers), else a new one."""
    try:
        parsed = (decoder or jsonio.RequestDecoder()).loads(body)
    except jsonio.JSONError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    started = time.perf_counter()
    dedupe_request = parse_request(parsed, config)
    return dedupe_request, time.perf_counter() - started


class BodyParser:
    """Small bodies in place; big ones in this worker's helper process, one at a time."""

    def __init__(self, config: Config):
        self.config = config
        self._decoder = jsonio.RequestDecoder()
        self._helper: _Helper | None = None
        self._turn = Semaphore()

    def __call__(self, body: bytes | bytearray | memoryview) -> tuple[DedupeRequest, float]:
        if len(body) <= INLINE_MAX_BYTES:
            return parse_body(bytes(body), self.config, self._decoder)
        with self._turn:
            return self._started().parse(body)

    def start(self) -> None:
        """Start the helper now (it takes ~1 s), so the first big body does not wait for it."""
        with self._turn:
            self._started()

    def close(self) -> None:
        if self._helper is not None:
            self._helper.close()
            self._helper = None

    def _started(self) -> "_Helper":
        if self._helper is None or not self._helper.alive():
            if self._helper is not None:
                self._helper.close()
            self._helper = _Helper(self.config)
        return self._helper


class _Helper:
    """The worker's end of one helper process (its stdin/stdout stay free for logs)."""

    def __init__(self, config: Config):
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):  # fewer round trips per body (the kernel caps the size)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from app.parsing import main; main({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),), cwd=_ROOT, env=env,
        )
        theirs.close()
        self.sock = ours
        _send(self.sock, pickle.dumps(config))

    def alive(self) -> bool:
        return self.process.poll() is None

    def parse(self, body: bytes | bytearray | memoryview) -> tuple[DedupeRequest, float]:
        try:
            _send(self.sock, body, _serve_others)
            reply = pickle.loads(_receive(self.sock, _serve_others))
            if reply[0] == "error":
                raise ApiError(reply[1], reply[2])
            _, fields_, rows, shape, seconds = reply
            matrix = np.empty(shape, dtype=np.float32)
            if matrix.size:
                _receive_into(self.sock, memoryview(matrix).cast("B"), _serve_others)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            log.error("body parser process failed (%s); starting a new one", exc)
            self.close()
            raise Unavailable("request body parser restarting; retry later") from None
        except BaseException:  # interrupted mid-exchange (the greenlet killed): out of step
            self.close()
            raise
        return _rebuild(fields_, rows, matrix), seconds

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _rebuild(request_fields: dict, rows: list, matrix: np.ndarray) -> DedupeRequest:
    """The request back from its parts; chunk vectors are rows of `matrix`."""
    chunks = tuple(
        Chunk(id=id_, text=text, score=score, embedding=None if row < 0 else matrix[row])
        for id_, text, score, row in rows
    )
    return DedupeRequest(chunks=chunks, **request_fields)


def _split(dedupe_request: DedupeRequest) -> tuple[dict, list, np.ndarray]:
    """A request as (its other fields, chunk rows, one matrix of every chunk vector)."""
    vectors = [c.embedding for c in dedupe_request.chunks if c.embedding is not None]
    dim = len(vectors[0]) if vectors else 0
    matrix = np.vstack(vectors) if vectors else np.empty((0, dim), dtype=np.float32)
    rows, next_row = [], 0
    for c in dedupe_request.chunks:
        row = -1 if c.embedding is None else next_row
        next_row += c.embedding is not None
        rows.append((c.id, c.text, c.score, row))
    others = {f.name: getattr(dedupe_request, f.name) for f in fields(dedupe_request) if f.name != "chunks"}
    return others, rows, matrix


# ---------------------------------------------------------------- the wire: length-prefixed frames


def _send(sock: socket.socket, payload: bytes | bytearray | memoryview, pause=None) -> None:
    """A frame; with `pause`, called between pieces (the worker's loop serves others: while
    the helper keeps up, the socket never fills and a plain sendall would not yield)."""
    view = memoryview(payload).cast("B")
    sock.sendall(_HEADER.pack(len(view)))
    for start in range(0, len(view), _PIECE_BYTES):
        sock.sendall(view[start : start + _PIECE_BYTES])
        if pause is not None:
            pause()


def _receive(sock: socket.socket, pause=None) -> bytearray:
    header = bytearray(_HEADER.size)
    _receive_into(sock, memoryview(header))
    payload = bytearray(_HEADER.unpack(header)[0])
    _receive_into(sock, memoryview(payload), pause)
    return payload


def _receive_into(sock: socket.socket, view: memoryview, pause=None) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got : got + _PIECE_BYTES])
        if not n:
            raise EOFError("peer closed")
        got += n
        if pause is not None:
            pause()


def _serve_others() -> None:
    gevent.sleep(0)


# ---------------------------------------------------------------- the helper process


def serve(fd: int) -> None:
    """The helper's loop: a body in, the validated request (or the error) out, until EOF."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)  # the worker's gevent made its end non-blocking
    config = pickle.loads(_receive(sock))
    decoder = jsonio.RequestDecoder()
    while True:
        try:
            body = _receive(sock)
        except EOFError:
            return
        try:
            dedupe_request, seconds = parse_body(body, config, decoder)
        except ApiError as exc:
            _send(sock, pickle.dumps(("error", exc.status, exc.message)))
            continue
        except Exception:
            log.exception("parsing a request body failed")
            _send(sock, pickle.dumps(("error", 500, "internal error")))
            continue
        del body
        others, rows, matrix = _split(dedupe_request)
        _send(sock, pickle.dumps(("ok", others, rows, matrix.shape, seconds), protocol=5))
        if matrix.size:
            sock.sendall(memoryview(np.ascontiguousarray(matrix)).cast("B"))


def main(fd: int) -> None:
    """The helper process's entry point (its log lines go to the worker's stderr)."""
    logging.basicConfig(level=logging.INFO, format="distill body parser: %(message)s")
    serve(fd)
