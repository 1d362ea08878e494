"""Taking request bodies in: the per-request size limit and the per-worker bound.

Every body is read here in pieces, however it arrives (with a Content-Length
or chunked), under two limits:

* `DISTILL_MAX_BODY_BYTES` per request. A Content-Length over it is refused
  before reading; a chunked body is refused as soon as it passes it. Either
  way it is a 413 and nothing is parsed: a body cut at the limit never
  reaches the JSON parser.
* `DISTILL_MAX_INFLIGHT_BYTES` per worker: the bodies of the requests it has
  taken in and not yet answered (being read, parsed, queued for the CPU pool
  or running). A request that would go past it gets a 503 with `Retry-After`
  before the rest of its body is read, so a flood of big bodies cannot grow a
  worker's memory without bound. A body is held against the bound until its
  response is sent, so the bound also caps the CPU work a worker has queued.
  A request bigger than the whole bound is taken only when the worker holds
  nothing else, so every size under the body limit is served eventually.
"""

from __future__ import annotations

import socket
from typing import Callable

import gevent
import numpy as np
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.exceptions import RequestEntityTooLarge

from .validate import ApiError

TICKET = "distill.ticket"  # the request's `Ticket` in its WSGI environ
BODY_READ = "distill.body_read"  # set once the whole body has been read
# One read. Between pieces the loop serves others: with 20 bodies arriving at
# once, /health waits for one piece of each, a few times over.
PIECE_BYTES = 256 * 1024
RETRY_AFTER_S = 2
DISCARD_IDLE_S = 10


class Unavailable(ApiError):
    """A 503 the client should retry: carries `Retry-After`."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


class Intake:
    """One worker's count of body bytes taken in and not yet answered."""

    def __init__(self, max_inflight_bytes: int):
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0

    def has_room(self) -> bool:
        return self.inflight_bytes < self.max_inflight_bytes

    def ticket(self, environ: dict) -> "Ticket":
        """A new request's ticket, kept in its environ (the app releases it when answered)."""
        environ[TICKET] = ticket = Ticket(self)
        return ticket


class Ticket:
    """The bytes one request holds against its worker's bound, until `release()`."""

    def __init__(self, intake: Intake):
        self.intake = intake
        self.held = 0

    def take(self, nbytes: int) -> None:
        """Hold `nbytes` more, or refuse with a 503 when the bound would be passed."""
        others = self.intake.inflight_bytes - self.held
        if others and self.intake.inflight_bytes + nbytes > self.intake.max_inflight_bytes:
            raise Unavailable("server busy: too many request bytes in progress; retry later")
        self.held += nbytes
        self.intake.inflight_bytes += nbytes

    def release(self) -> None:
        self.intake.inflight_bytes -= self.held
        self.held = 0


def read_body(
    environ: dict, max_body_bytes: int, ticket: Ticket, buffer: Callable[[int], memoryview] | None = None
) -> memoryview:
    """The whole body, read in pieces; a 413 past `max_body_bytes`, a 503 past the worker's bound.
    `buffer(size)`: where a body of a declared size is read (default: fresh memory)."""
    length = _content_length(environ)
    if length is not None and length > max_body_bytes:
        raise RequestEntityTooLarge()
    if length is None and not environ.get("wsgi.input_terminated"):
        return memoryview(b"")  # no length and a server that cannot end the stream: read nothing
    if length is not None:
        ticket.take(length)
        body = (buffer or _fresh)(length)  # one buffer of the declared size, filled in place
        size = _fill(environ, body)
        if size < length:
            raise ApiError(400, f"request body ended after {size} of {length} bytes")
    else:
        grown = bytearray()
        stream = environ["wsgi.input"]
        while piece := _read_piece(stream, PIECE_BYTES):
            if len(grown) + len(piece) > max_body_bytes:
                raise RequestEntityTooLarge()
            ticket.take(len(piece))
            grown += piece
            gevent.sleep(0)
        body = memoryview(grown)
    environ[BODY_READ] = True
    return body


def _fresh(size: int) -> memoryview:
    """Not a bytearray: that zeroes all of it at once, on the loop (~20 ms for 35 MB);
    these pages are touched piece by piece as the body arrives."""
    return memoryview(np.empty(size, dtype=np.uint8))


def _fill(environ: dict, buffer: memoryview) -> int:
    """Read the body into `buffer`, in pieces, the loop serving others in between; the
    bytes read. Under gunicorn, straight from the socket: its own reader copies every
    piece five times over (~20 ms of the loop's time for 17.5 MB)."""
    stream, reader = environ["wsgi.input"], _gunicorn_length_reader(environ)
    if reader is None:
        size = 0
        while size < len(buffer) and (piece := _read_piece(stream, min(PIECE_BYTES, len(buffer) - size))):
            buffer[size : size + len(piece)] = piece
            size += len(piece)
            gevent.sleep(0)
        return size
    unreader = reader.unreader
    held = unreader.take_buffered()  # what gunicorn read past the headers
    size = min(len(held), len(buffer))
    buffer[:size] = held[:size]
    if len(held) > size:
        unreader.unread(held[size:])  # past this body: the next request's
    try:
        while size < len(buffer):
            received = unreader.sock.recv_into(buffer[size : size + PIECE_BYTES])
            if not received:
                break
            size += received
            gevent.sleep(0)
    except OSError as exc:  # the client left
        stream.failed = True  # gunicorn must not reuse the connection
        raise ApiError(400, f"request body could not be read: {exc.__class__.__name__}") from None
    finally:
        reader.length -= size  # so gunicorn knows what is left of the body
    return size


def _gunicorn_length_reader(environ: dict):
    """gunicorn's reader of a Content-Length body when nothing was read from it yet, else None."""
    stream = environ["wsgi.input"]
    reader = getattr(stream, "reader", None)
    if not (isinstance(reader, LengthReader) and isinstance(reader.unreader, SocketUnreader)):
        return None
    if stream.buf.tell() or not hasattr(reader.unreader, "take_buffered"):
        return None
    return reader


def discard_rest(environ: dict, budget: int) -> None:
    """After the response: read and drop what is left of a body that was refused
    (or never looked at), so the client, still sending, sees its answer.

    In pieces, with the loop serving others in between: the server's own
    drain reads 1 KiB at a time and copies its buffer on every read, which
    holds the loop for seconds on a 35 MB body. Past `budget` bytes, or when
    the client sends nothing for `DISCARD_IDLE_S`, the connection is shut.
    """
    if environ.get(BODY_READ):
        return
    stream = environ["wsgi.input"]
    try:
        while True:
            with gevent.Timeout(DISCARD_IDLE_S):  # a client that stops sending is let go
                piece = stream.read(PIECE_BYTES)
            if not piece:
                return
            budget -= len(piece)
            if budget < 0:
                break
            gevent.sleep(0)
    except (Exception, gevent.Timeout):  # the client left or stalled, or its chunking broke
        pass
    _shut(environ.get("gunicorn.socket"))


def _shut(sock) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _content_length(environ: dict) -> int | None:
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    raw = environ.get("CONTENT_LENGTH", "").strip()
    return int(raw) if raw.isdigit() else None


def _read_piece(stream, size: int) -> bytes:
    try:
        return stream.read(size)
    except Exception as exc:  # the server's reader: a broken chunked encoding, a dropped client
        raise ApiError(400, f"request body could not be read: {exc.__class__.__name__}") from None
