"""End to end through gunicorn on 127.0.0.1: streaming latencies and big vector requests."""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from functools import partial

import numpy as np
import orjson

from tests.support import Server, SSEParser, synthetic_texts

from .common import bare_product, peak_rss_mb, reset_peak_rss, seconds_for, table, unit_vectors, worker_pids


VECTOR_CASES = [(n, 384) for n in (100, 1_000, 2_000, 10_000, 100_000)]
VECTOR_CASES += [(n, 1536) for n in (100, 1_000, 2_000, 10_000, 20_000)]


def main() -> None:
    server = Server(  # limits raised to fit the largest case (~460 MB of decimal text)
        WEB_CONCURRENCY="2", DISTILL_MAX_CHUNKS="100000", DISTILL_MAX_BODY_BYTES=str(1 << 30)
    ).start()
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
    """Supplied vectors as JSON numbers and as base64 float32, next to the bare product.

    bare is X @ X.T on one thread (for n = 100,000, where it does not fit, the
    clustering tiles' products); the worker runs the tiles of n > 4,000 on its
    two CPU threads. Peak MB: the workers' largest RSS high-water mark during the case.
    """
    workers = worker_pids(server.process.pid)
    rows = []
    for n, d in VECTOR_CASES:
        for duplicates in (False, True):
            x = unit_vectors(n, d, duplicates)
            bare = seconds_for(partial(bare_product, x), n, repeat=3)
            for form in ("numbers", "base64"):
                payload = _vectors_body(x, form)
                reset_peak_rss(workers)
                wall, latency = _post_timed(server, payload, repeat=5 if n <= 2000 else 1)
                rows.append([
                    n, d, "yes" if duplicates else "no", form, len(payload) / 1e6, bare * 1000,
                    latency, wall * 1000, wall / bare, peak_rss_mb(workers),
                ])
    table(
        "POST /v1/dedupe with supplied vectors (Go mode, target_k = min(n/10, 100)), through gunicorn",
        ["n", "d", "planted dups", "embedding form", "body MB", "bare ms (1 thread)",
         "server latency_ms", "client wall ms", "wall × bare", "worker peak MB"],
        rows,
    )


def _vectors_body(x: np.ndarray, form: str) -> bytes:
    if form == "numbers":  # 8 decimals, as float32 clients write them
        vectors: list = np.round(x.astype(np.float64), 8).tolist()
    else:
        vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in x]
    chunks = [{"id": str(i), "score": i % 7, "embedding": v} for i, v in enumerate(vectors)]
    return orjson.dumps({"chunks": chunks, "target_k": min(len(x) // 10, 100)})


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
