"""Test helpers: a real gunicorn on 127.0.0.1, and an SSE parser that follows WHATWG rules."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "model data cache query river mountain engine garden policy market signal window "
    "planet teacher coffee battery network museum protein harbor winter library camera "
    "contract vaccine tunnel orbit violin desert invoice kernel pasta glacier tariff"
).split()

# Five chunks that show every decision: a paraphrase pair, a loner, and a pair the
# number guard keeps apart.
FIVE = [
    "A plane is taking off.",
    "An air plane is taking off.",
    "A man is playing a flute.",
    "Revenue rose 3% in the second quarter.",
    "Revenue rose 5% in the second quarter.",
]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences of 8-20 words (deterministic)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 20))) for i in range(n)]


@dataclass
class Event:
    type: str
    data: str

    @property
    def json(self):
        return json.loads(self.data)


@dataclass
class SSEParser:
    """Incremental parser per the WHATWG event-stream rules.

    Lines end with CR, LF or CRLF; lines starting with ':' are comments;
    one leading space after 'field:' is stripped; data lines are joined
    with LF; a blank line dispatches the event.
    """

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    _buffer: str = ""
    _type: str = ""
    _data: list[str] = field(default_factory=list)
    _ended_with_cr: bool = False

    def feed(self, text: str) -> list[Event]:
        if self._ended_with_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across two reads
        self._ended_with_cr = text.endswith("\r")
        self._buffer += text
        lines = re.split(r"\r\n|\r|\n", self._buffer)
        self._buffer = lines.pop()  # incomplete last line (or "")
        new: list[Event] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                new.append(event)
        self.events.extend(new)
        return new

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data and not self._type:
                return None
            event = Event(self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None


class FaultInjectingModel:
    """Fault injection (not a stand-in): the real model, except that `embed` fails.

    A stage that raises cannot be produced with valid input on purpose, so
    this is how the tests make one fail.
    """

    def __init__(self, model):
        self.model, self.name, self.batch_size = model, model.name, model.batch_size

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans
        return getattr(self.model, name)

    def encode(self, texts):
        raise RuntimeError("injected fault")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


class Server:
    """`gunicorn -c gunicorn.conf.py` on 127.0.0.1 with the given environment."""

    def __init__(self, root: Path = ROOT, **env: str):
        self.root = root  # the checkout whose gunicorn.conf.py and packages run
        self.port = free_port()
        self._cache_dir = tempfile.TemporaryDirectory(prefix="distill-cache-")  # unless env names one
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "1",
            "DISTILL_CACHE_DIR": self._cache_dir.name,
            **env,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.log = open(ROOT / f".e2e-{self.port}.log", "w+b")
        self.process = subprocess.Popen(
            GUNICORN, cwd=self.root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        for _ in range(600):  # up to ~60 s for the server to answer
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not become ready")

    def run_until_exit(self, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run gunicorn in the foreground until it exits, its output captured as text (for
        a setting that must stop it at start)."""
        return subprocess.run(GUNICORN, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=70)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        self._cache_dir.cleanup()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def open_stream(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self.connection()
        conn.request("POST", "/v1/dedupe/stream", json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Samples of the current scrape (see `parse_metrics`)."""
        status, body = self.get("/metrics")
        assert status == 200
        return parse_metrics(body.decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text as samples keyed by (name, sorted labels), via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client) -> dict[tuple[str, tuple], float]:
    """The samples of `GET /metrics` through a Flask test client."""
    return parse_metrics(client.get("/metrics").data.decode())


def delta(before: dict, after: dict, name: str, **labels) -> float:
    """How much one series grew between two scrapes."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def read_events(response: http.client.HTTPResponse, parser: SSEParser, until=None) -> list[Event]:
    """Read the stream until `until(event)` is true or it ends; return the new events."""
    seen: list[Event] = []
    while True:
        line = response.readline()
        if not line:
            return seen
        for event in parser.feed(line.decode()):
            seen.append(event)
            if until is not None and until(event):
                return seen


class RedisServer:
    """Debian's `redis-server` on 127.0.0.1 and a free port, without persistence."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="distill-redis-")
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self._dir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):  # up to ~10 s to answer
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not answer")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()
