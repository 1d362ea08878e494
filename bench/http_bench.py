"""End to end through gunicorn on 127.0.0.1: streaming latencies and big vector requests."""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import threading
import time

import numpy as np

from tests.support import Server, SSEParser, synthetic_texts

from .common import best_of, table, unit_vectors


def main() -> None:
    server = Server(WEB_CONCURRENCY="2").start()
    try:
        server.post("/v1/dedupe", {"chunks": [{"text": "warm the model up"}]})
        vectors(server)
        streaming(server)
    finally:
        server.stop()


def streaming(server: Server) -> None:
    """First-event latency and /health latency while a 2,000-text stream computes."""
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(synthetic_texts(2000, seed=11))]}
    payload = json.dumps(body)
    health_ms: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        while not done.is_set():
            start = time.perf_counter()
            server.get("/health")
            health_ms.append((time.perf_counter() - start) * 1000)
            time.sleep(0.05)

    conn = server.connection()
    start = time.perf_counter()
    conn.request("POST", "/v1/dedupe/stream", payload, {"Content-Type": "application/json"})
    response = conn.getresponse()
    parser = SSEParser()
    first_event_ms = None
    poller = threading.Thread(target=poll_health)
    while True:
        line = response.readline()
        if not line:
            break
        if parser.feed(line.decode()) and first_event_ms is None:
            first_event_ms = (time.perf_counter() - start) * 1000
            poller.start()
    total_s = time.perf_counter() - start
    done.set()
    poller.join()
    conn.close()
    progress = sum(1 for e in parser.events if e.type == "progress")
    table(
        "Stream of 2,000 texts (model mode), 2 workers",
        ["first event ms", "stream total s", "progress events", "keep-alives", "/health calls",
         "/health median ms", "/health max ms"],
        [[first_event_ms, total_s, progress, len(parser.comments), len(health_ms),
          statistics.median(health_ms), max(health_ms)]],
    )


def vectors(server: Server) -> None:
    """Supplied vectors as JSON numbers and as base64 float32, next to the bare product."""
    rows = []
    for n, d in ((1000, 384), (1000, 1536), (2000, 1536), (10000, 384)):
        x = unit_vectors(n, d, duplicates=True)
        bare = best_of(lambda: x @ x.T, repeat=3)
        for form in ("numbers", "base64"):
            if form == "numbers":
                rounded = np.round(x.astype(np.float64), 8).tolist()  # as float32 clients write them
                chunks = [{"id": str(i), "embedding": v} for i, v in enumerate(rounded)]
            else:
                chunks = [
                    {"id": str(i), "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                    for i, v in enumerate(x)
                ]
            payload = json.dumps({"chunks": chunks}).encode()
            wall, latency = _post_timed(server, payload)
            rows.append([n, d, form, len(payload) / 1e6, bare * 1000, latency, wall * 1000, wall / bare])
    table(
        "POST /v1/dedupe with supplied vectors (Go mode), through gunicorn",
        ["n", "d", "embedding form", "body MB", "bare X@X.T ms", "server latency_ms",
         "client wall ms", "wall × bare"],
        rows,
    )


def _post_timed(server: Server, payload: bytes, repeat: int = 3) -> tuple[float, int]:
    """Median client wall time and server latency_ms of `repeat` posts."""
    walls, latencies = [], []
    for _ in range(repeat):
        conn = server.connection()
        start = time.perf_counter()
        conn.request("POST", "/v1/dedupe", payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        walls.append(time.perf_counter() - start)
        conn.close()
        assert response.status == 200, body[:200]
        latencies.append(json.loads(body)["stats"]["latency_ms"])
    return statistics.median(walls), int(statistics.median(latencies))


if __name__ == "__main__":
    main()
