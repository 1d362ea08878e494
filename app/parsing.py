"""Parse and validate request bodies without freezing the worker's event loop.

simdjson (`jsonio.RequestDecoder`) parses a body ~5x faster than orjson and
hands vectors over as arrays: a 35 MB body of decimal vectors is ~80 ms of
parsing and validation, not ~0.35 s. But its parse is one C call that holds
the GIL, and on 2 busy cores a thread holding the GIL can wait for a core
while the event loop waits for the GIL: parsed on a thread of the worker, such
bodies held `/health` for ~0.5 s in a flood. So a body bigger than
`INLINE_MAX_BYTES` is parsed and validated by a helper process, one per worker.

Nothing big crosses between the two by copy: such a body is read from the
client straight into shared memory (`SharedBuffer`, a memfd mapped by both),
the helper validates it into a matrix of every chunk vector that it makes in
shared memory of its own, and the worker maps that matrix in place. What goes
over the socket is a file descriptor each way and a small pickle (ids, texts,
scores, the other fields). Smaller bodies (~1 ms or less) are parsed in place,
as the hand-off would cost more.

The helper gets the worker's `Config` at start, so both apply the same
limits, and the same code (`jsonio.RequestDecoder`, `validate.parse_request`)
runs in both places: the same answers and the same error messages.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections import deque
from dataclasses import fields
from pathlib import Path

import gevent
import numpy as np
from gevent.lock import Semaphore

from pipeline.types import DedupeRequest, checked_chunk

from . import jsonio
from .config import Config
from .intake import Unavailable
from .validate import ApiError, parse_request

log = logging.getLogger(__name__)

INLINE_MAX_BYTES = 1 << 20  # parsed and validated in ~1-3 ms on the loop
_ROOT = Path(__file__).resolve().parent.parent
_HEADER = struct.Struct("!Q")
_PIECE_BYTES = 256 * 1024  # as bodies are read: the loop serves others between pieces
ARENA_GRAIN = 1 << 20  # arenas are whole MiB, so a body reuses one a little bigger
ARENAS_KEPT = 2  # unused arenas a worker keeps (each as big as a body it took) ...
ARENAS_KEPT_BYTES = 128 << 20  # ... and their bytes: a huge body's is let go (two of 64 MiB fit)


def parse_body(
    body: bytes | bytearray | mmap.mmap,
    config: Config,
    decoder: jsonio.RequestDecoder | None = None,
    allocate=np.empty,
) -> tuple[DedupeRequest, float]:
    """The validated request and the seconds its validation took (a 4xx on any problem).
    `decoder`: one to reuse (its buffers), else a new one; `allocate`: makes the matrix of
    the request's vectors (`validate.parse_request`)."""
    try:
        parsed = (decoder or jsonio.RequestDecoder()).loads(body)
    except jsonio.JSONError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    started = time.perf_counter()
    dedupe_request = parse_request(parsed, config, allocate)
    return dedupe_request, time.perf_counter() - started


class SharedBuffer(mmap.mmap):
    """`size` bytes of memory another process can map: a memfd, mapped here (`fd` is sent
    over a Unix socket; it is closed when this mapping is collected)."""

    fd: int
    id: int
    _ids = itertools.count(1)

    def __new__(cls, size: int) -> "SharedBuffer":
        fd = os.memfd_create("distill", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self = super().__new__(cls, fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.id = fd, next(cls._ids)
        weakref.finalize(self, os.close, fd)
        return self


def _mapped(fd: int, size: int, access: int = mmap.ACCESS_WRITE) -> mmap.mmap:
    """Map what the other process shared (and close our descriptor: the mapping keeps it)."""
    try:
        return mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)


class Arenas:
    """The shared buffers big bodies are read into, kept for the next bodies.

    A fresh memfd's pages cost ~1 ms per MB to fault in, in each process that touches
    them; a buffer used before costs nothing. One holds a body, then (the helper writes it
    there once the body is parsed) the request's matrix of vectors, until that matrix is
    collected; then it is given back (from any thread: it waits in `returned` until the
    loop takes the next one). At most `keep` wait unused, of at most `keep_bytes` in all
    (the biggest go first). The id of every arena collected
    (dropped from here, or never given back: a body that was not read whole) goes to
    `dropped`, so the helper is told to unmap it.
    """

    def __init__(self, keep: int = ARENAS_KEPT, keep_bytes: int = ARENAS_KEPT_BYTES):
        self.keep, self.keep_bytes = keep, keep_bytes
        self.free: list[SharedBuffer] = []
        self.returned: deque[SharedBuffer] = deque()
        self.dropped: deque[int] = deque()

    def take(self, size: int) -> SharedBuffer:
        self._settle()
        fitting = [arena for arena in self.free if len(arena) >= size]
        if fitting:
            arena = min(fitting, key=len)
            self.free.remove(arena)
            return arena
        arena = SharedBuffer(-(-size // ARENA_GRAIN) * ARENA_GRAIN)
        weakref.finalize(arena, self.dropped.append, arena.id)
        return arena

    def give_back(self, arena: SharedBuffer) -> None:
        self.returned.append(arena)  # (deque.append: safe from any thread)

    def _settle(self) -> None:
        while self.returned:
            self.free.append(self.returned.popleft())
        while len(self.free) > self.keep:
            self.free.remove(min(self.free, key=len))
        while sum(map(len, self.free)) > self.keep_bytes:
            self.free.remove(max(self.free, key=len))


class BodyParser:
    """Small bodies in place; big ones in this worker's helper process, one at a time."""

    def __init__(self, config: Config):
        self.config = config
        self.arenas = Arenas()
        self._decoder = jsonio.RequestDecoder()
        self._helper: _Helper | None = None
        self._turn = Semaphore()

    def buffer(self, size: int) -> memoryview:
        """Where to read a body of `size` bytes: shared memory when the helper will parse it."""
        if size > INLINE_MAX_BYTES:
            try:
                return memoryview(self.arenas.take(size))[:size]
            except OSError as exc:  # no memfd here (or no descriptor left): it is copied later
                log.warning("no shared memory for a request body (%s)", exc)
        # Not a bytearray: that zeroes all of it at once, on the loop (~20 ms for 35 MB);
        # these pages are touched piece by piece as the body arrives.
        return memoryview(np.empty(size, dtype=np.uint8))

    def __call__(self, body: bytes | bytearray | memoryview) -> tuple[DedupeRequest, float]:
        if len(body) <= INLINE_MAX_BYTES:
            return parse_body(bytes(body), self.config, self._decoder)
        arena = body.obj if isinstance(body, memoryview) else None
        if not isinstance(arena, SharedBuffer):
            arena = self._copied(body)
        with self._turn:
            return self._started().parse(arena, len(body), self.arenas)

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

    def _copied(self, body: bytes | bytearray | memoryview) -> SharedBuffer:
        """`body` copied into an arena, in pieces (the loop serves others in between)."""
        arena = self.arenas.take(len(body))
        view = memoryview(body).cast("B")
        for start in range(0, len(view), _PIECE_BYTES):
            piece = view[start : start + _PIECE_BYTES]
            arena[start : start + len(piece)] = piece
            _serve_others()
        return arena


class _Helper:
    """The worker's end of one helper process (its stdin/stdout stay free for logs)."""

    def __init__(self, config: Config):
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from app.parsing import main; main({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),), cwd=_ROOT, env=env,
        )
        theirs.close()
        self.sock = ours
        self.mapped: set[int] = set()  # the arenas it has mapped
        _send(self.sock, pickle.dumps(config))

    def alive(self) -> bool:
        return self.process.poll() is None

    def parse(self, arena: SharedBuffer, size: int, arenas: Arenas) -> tuple[DedupeRequest, float]:
        """The request of the body in `arena[:size]`: the helper writes its matrix of vectors
        into the same arena (or, when it does not fit, into shared memory of its own), and
        it is mapped here in place; the arena goes back to `arenas` when that matrix is
        collected (at once when there is none, or on any failure)."""
        fds: list[int] = []
        kept = False
        try:
            forget = []
            while arenas.dropped:
                forget.append(arenas.dropped.popleft())
            forget = [i for i in forget if i in self.mapped]
            self.mapped.difference_update(forget)
            message = pickle.dumps((arena.id, size, len(arena), forget))
            _send(self.sock, message, None if arena.id in self.mapped else arena.fd)
            self.mapped.add(arena.id)
            length, fds = _receive_header(self.sock)
            reply = pickle.loads(_receive_exactly(self.sock, length))
            if reply[0] == "error":
                raise ApiError(reply[1], reply[2])
            _, fields_, rows, shape, seconds = reply
            count = int(np.prod(shape))
            if fds:  # it did not fit in the arena
                flat = np.frombuffer(_mapped(fds.pop(), count * 4), dtype=np.float32)
            elif count:
                flat = np.frombuffer(arena, dtype=np.float32, count=count)
                weakref.finalize(flat, arenas.give_back, arena)
                kept = True
            else:
                flat = np.empty(0, dtype=np.float32)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            log.error("body parser process failed (%s); starting a new one", exc)
            self.close()
            raise Unavailable("request body parser restarting; retry later") from None
        except ApiError:
            raise
        except BaseException:  # interrupted mid-exchange (the greenlet killed): out of step
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
            if not kept:
                arenas.give_back(arena)  # (a closed helper wrote nothing more into it)
        return _rebuild(fields_, rows, flat.reshape(shape)), seconds

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.mapped.clear()


def _rebuild(request_fields: dict, rows: list, matrix: np.ndarray) -> DedupeRequest:
    """The request back from its parts; chunk vectors are rows of `matrix`, in order (`_split`
    numbers them so). Chunks are made as unpickling makes them (`checked_chunk`), their rows
    taken in order: the dataclass's own __init__, and indexing the matrix for every row, cost
    ~24 ms at 10,000 chunks, all on the event loop; this ~8 ms."""
    vectors = iter(matrix)
    chunks = [
        checked_chunk(id_, text, score, None if row < 0 else next(vectors)) for id_, text, score, row in rows
    ]
    gathered = request_fields.pop("gathered")
    return DedupeRequest(chunks=tuple(chunks), vectors=matrix if gathered else None, **request_fields)


def _split(dedupe_request: DedupeRequest, allocate) -> tuple[dict, list, np.ndarray]:
    """A request as (its other fields, chunk rows, one matrix of every chunk vector, made by
    `allocate`: the request's own `vectors` when it has them)."""
    matrix = dedupe_request.vectors
    if matrix is None:
        vectors = [c.embedding for c in dedupe_request.chunks if c.embedding is not None]
        dim = len(vectors[0]) if vectors else 0
        matrix = allocate((len(vectors), dim), dtype=np.float32)
        if vectors:
            np.stack(vectors, out=matrix)
    rows, next_row = [], 0
    for c in dedupe_request.chunks:
        row = -1 if c.embedding is None else next_row
        next_row += c.embedding is not None
        rows.append((c.id, c.text, c.score, row))
    others = {f.name: getattr(dedupe_request, f.name) for f in fields(dedupe_request) if f.name not in ("chunks", "vectors")}
    others["gathered"] = dedupe_request.vectors is not None
    return others, rows, matrix


# ---------------------------------------------------------------- the wire


def _send(sock: socket.socket, payload: bytes, fd: int | None = None) -> None:
    """A length-prefixed frame, with a file descriptor attached to its header when one is given."""
    _send_header(sock, len(payload), fd)
    sock.sendall(payload)


def _receive(sock: socket.socket) -> bytearray:
    header = _receive_exactly(sock, _HEADER.size)
    return _receive_exactly(sock, _HEADER.unpack(header)[0])


def _send_header(sock: socket.socket, size: int, fd: int | None = None) -> None:
    """A frame's length, with a file descriptor attached when one is given."""
    header = _HEADER.pack(size)
    if fd is None:
        sock.sendall(header)
    elif socket.send_fds(sock, [header], [fd]) != len(header):  # (8 bytes: sent whole)
        raise OSError("header cut short")


def _receive_header(sock: socket.socket) -> tuple[int, list[int]]:
    """A frame's length and the descriptors sent with it (the caller closes them)."""
    header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 1)
    fds = list(fds)
    try:
        if not header:
            raise EOFError("peer closed")
        if len(header) < _HEADER.size:
            header += _receive_exactly(sock, _HEADER.size - len(header))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return _HEADER.unpack(header)[0], fds


def _receive_exactly(sock: socket.socket, size: int) -> bytearray:
    payload = bytearray(size)
    view, got = memoryview(payload), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("peer closed")
        got += n
    return payload


def _serve_others() -> None:
    gevent.sleep(0)


# ---------------------------------------------------------------- the helper process


def serve(fd: int) -> None:
    """The helper's loop: a body in, the validated request (or the error) out, until EOF."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)  # the worker's gevent made its end non-blocking
    config = pickle.loads(_receive(sock))
    decoder = jsonio.RequestDecoder()
    arenas: dict[int, mmap.mmap] = {}  # the worker's, by id
    while True:
        try:
            length, fds = _receive_header(sock)
        except EOFError:
            return
        arena_id, size, capacity, forget = pickle.loads(_receive_exactly(sock, length))
        for dropped in forget:
            arenas.pop(dropped, None)
        if fds:
            arenas[arena_id] = _mapped(fds.pop(), capacity)
            for extra in fds:
                os.close(extra)
        arena = arenas[arena_id]
        own: list[SharedBuffer] = []  # shared memory of its own, for a matrix the arena cannot hold

        def allocate(shape, dtype=np.float32):
            count = int(np.prod(shape))
            if count * np.dtype(dtype).itemsize <= capacity:  # the body is parsed by now
                return np.frombuffer(arena, dtype=dtype, count=count).reshape(shape)
            own.append(SharedBuffer(count * np.dtype(dtype).itemsize))
            return np.frombuffer(own[-1], dtype=dtype).reshape(shape)

        body = memoryview(arena)[:size]
        try:
            dedupe_request, seconds = parse_body(body, config, decoder, allocate)
            others, rows, matrix = _split(dedupe_request, allocate)
        except ApiError as exc:
            _reply(sock, ("error", exc.status, exc.message))
            continue
        except Exception:
            log.exception("parsing a request body failed")
            _reply(sock, ("error", 500, "internal error"))
            continue
        finally:
            try:
                body.release()
            except BufferError:  # still exported somewhere: released when that is collected
                pass
        _reply(sock, ("ok", others, rows, matrix.shape, seconds), own[-1] if own and matrix.size else None)
        del dedupe_request, matrix, own


def _reply(sock: socket.socket, reply: tuple, shared: SharedBuffer | None = None) -> None:
    _send(sock, pickle.dumps(reply, protocol=5), None if shared is None else shared.fd)


def main(fd: int) -> None:
    """The helper process's entry point (its log lines go to the worker's stderr)."""
    logging.basicConfig(level=logging.INFO, format="distill body parser: %(message)s")
    serve(fd)
