"""Helpers for the client's tests: a busy front server, and shared chunk sets."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REACT = [
    {"id": "1", "text": "React is a JavaScript library for building user interfaces.", "score": 0.9},
    {"id": "2", "text": "React.js is a JS library for building UIs.", "score": 0.8},
    {"id": "3", "text": "Vue is a progressive JavaScript framework.", "score": 0.7},
    {"id": "4", "text": "Revenue rose 3% in the second quarter.", "score": 0.6},
    {"id": "5", "text": "Revenue rose 5% in the second quarter.", "score": 0.5},
]


class BusyFront:
    """A real HTTP server in front of the real gunicorn, standing in for a worker over its bound.

    Its first `busy` POSTs are refused the way a busy service refuses them
    (`mode="503"`: 503 `{"error": ...}` with `Retry-After`, as SPEC's "Under
    load" asks; `mode="drop"`: the connection closed with no answer). Every
    later POST is forwarded to gunicorn and the answer relayed as received,
    except that `cut_stream` relays a stream only up to its `complete` event.
    """

    BUSY_MESSAGE = "server busy: retry later"

    def __init__(self, upstream_port: int, *, busy: int = 0, mode: str = "503", retry_after: str | None = "0",
                 cut_stream: bool = False):
        self.upstream_port, self.busy, self.mode = upstream_port, busy, mode
        self.retry_after, self.cut_stream = retry_after, cut_stream
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> BusyFront:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _count(self) -> int:
        with self._lock:
            self.requests += 1
            return self.requests

    def _handler(self):
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if front._count() <= front.busy:
                    return self._refuse()
                upstream = http.client.HTTPConnection("127.0.0.1", front.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                upstream.request("POST", self.path, body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if front.cut_stream:
                    data = data[: data.index(b"event: complete")]
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refuse(self):
                if front.mode == "drop":
                    self.close_connection = True
                    return
                data = b'{"error": "%s"}' % front.BUSY_MESSAGE.encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                if front.retry_after is not None:
                    self.send_header("Retry-After", front.retry_after)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
