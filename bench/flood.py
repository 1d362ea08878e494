"""The flood: 40 bodies of 35 MB at once on 2 workers (2,000 chunks × 1,536 decimals each).

Meanwhile a prober times `GET /health` on keep-alive connections held by each
worker, and streams with a short heartbeat (`DISTILL_SSE_HEARTBEAT_S` 0.5)
record the silence between their lines. Asserts, with the default
configuration: `/health` never slower than 250 ms; no heartbeat later than
250 ms; every flood request a 200 with the right answer or a 503 with
`Retry-After`; at least half 200; peak RSS at most 3 GB per worker.

`python -m bench.flood --runs 3` runs it 3 times, each on a fresh server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import Server, SSEParser, synthetic_texts

from .common import peak_rss_mb, reset_peak_rss, table, unit_vectors, worker_pids
from .http_bench import _vectors_body

CLIENTS = 40
BODIES = 4  # distinct bodies, each sent by a tenth of the clients
N, D = 2000, 1536
HEARTBEAT_S = 0.5
HEALTH_MAX_MS = 250
LATE_MAX_MS = 250
RSS_MAX_MB = 3 * 1024
STREAM_TEXTS = 300
CONNECTIONS_PER_WORKER = 2


def zero_latency(raw: bytes) -> dict:
    result = json.loads(raw)
    result["stats"]["latency_ms"] = 0
    return result


def connection_owner(server: Server, workers: list[int], client_port: int) -> int | None:
    """The worker whose socket is the server end of our connection from `client_port`."""
    ports = (f"{server.port:04X}", f"{client_port:04X}")
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if (cols[1].split(":")[1], cols[2].split(":")[1]) == ports:
            inode = cols[9]
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class HealthProber(threading.Thread):
    """Times `GET /health` round robin over keep-alive connections held by each worker."""

    def __init__(self, server: Server, workers: list[int]):
        super().__init__(daemon=True)
        self.server, self.workers = server, workers
        self.times: dict[int, list[float]] = {pid: [] for pid in workers}
        self.failures = 0
        self.slow: list[tuple[float, int, float]] = []  # (when, worker, ms) of calls over the bound
        self.stop = threading.Event()
        self.connections = self._connect()

    def _connect(self) -> list[tuple[int, object]]:
        held: list[tuple[int, object]] = []
        for _ in range(40):
            if all(sum(1 for pid, _ in held if pid == w) >= CONNECTIONS_PER_WORKER for w in self.workers):
                break
            conn = self.server.connection()
            self._get(conn)  # accepted and served once: now it belongs to one worker
            owner = connection_owner(self.server, self.workers, conn.sock.getsockname()[1])
            if owner is not None and sum(1 for pid, _ in held if pid == owner) < CONNECTIONS_PER_WORKER:
                held.append((owner, conn))
            else:
                conn.close()
        return held

    @staticmethod
    def _get(conn) -> None:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        assert response.status == 200

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, conn in self.connections:
                start = time.perf_counter()
                try:
                    self._get(conn)
                except (OSError, AssertionError):
                    self.failures += 1
                    continue
                self.times[pid].append((time.perf_counter() - start) * 1000)
                if self.times[pid][-1] > HEALTH_MAX_MS:
                    self.slow.append((start, pid, self.times[pid][-1]))
            time.sleep(0.05)


class StreamWatcher(threading.Thread):
    """Streams back to back; records the longest silence between lines of each."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        texts = synthetic_texts(STREAM_TEXTS, seed=5)
        self.body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}
        self.gaps: list[float] = []
        self.streams = self.heartbeats = self.refused = self.unfinished = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            conn, response = self.server.open_stream(self.body)
            if response.status != 200:
                self.refused += 1
                response.read()
                conn.close()
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            parser, last = SSEParser(), None
            while True:
                line = response.readline()
                now = time.perf_counter()
                if not line:
                    break
                if last is not None:
                    self.gaps.append(now - last)
                last = now
                parser.feed(line.decode())
            conn.close()
            self.streams += 1
            self.heartbeats += len(parser.comments)
            if not any(e.type == "complete" for e in parser.events):
                self.unfinished += 1


def flood_request(server: Server, payload: bytes, expected: dict, start: threading.Barrier) -> str:
    """'200', '200 wrong', '503', '503 without Retry-After', another status, or 'failed'."""
    start.wait()
    conn = server.connection()
    try:
        conn.request("POST", "/v1/dedupe", payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    except OSError:
        return "failed"
    finally:
        conn.close()
    if response.status == 200:
        return "200" if zero_latency(raw) == expected else "200 wrong"
    if response.status == 503:
        has_json_error = "error" in json.loads(raw)
        return "503" if response.headers.get("Retry-After") and has_json_error else "503 without Retry-After"
    return str(response.status)


def flood(server: Server, payloads: list[bytes], expected: list[dict]) -> list[str]:
    """The 40 clients at once, in a process of their own: their threads must not delay
    the probes' measurements (one GIL per process)."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    child = context.Process(target=_clients, args=(server, payloads, expected, results))
    child.start()
    outcomes = results.get()
    child.join()
    return outcomes


def _clients(server: Server, payloads: list[bytes], expected: list[dict], results) -> None:
    barrier = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [
            pool.submit(flood_request, server, payloads[k % BODIES], expected[k % BODIES], barrier)
            for k in range(CLIENTS)
        ]
        results.put([f.result(timeout=600) for f in futures])


def run_once() -> dict:
    server = Server(WEB_CONCURRENCY="2", DISTILL_SSE_HEARTBEAT_S=str(HEARTBEAT_S)).start()
    try:
        workers = worker_pids(server.process.pid)
        payloads = [_vectors_body(unit_vectors(N, D, duplicates=True, seed=s), "numbers") for s in range(BODIES)]
        expected = []
        for payload in payloads:  # one at a time, before the flood: the right answers
            conn = server.connection()
            conn.request("POST", "/v1/dedupe", payload, {"Content-Type": "application/json"})
            expected.append(zero_latency(conn.getresponse().read()))
            conn.close()
        processes = workers + [c for w in workers for c in worker_pids(w)]  # with the body parsers
        reset_peak_rss(processes)
        prober, watcher = HealthProber(server, workers), StreamWatcher(server)
        prober.start()
        watcher.start()
        time.sleep(1.0)  # a load script: let the probes settle before the flood
        started = time.perf_counter()
        outcomes = flood(server, payloads, expected)
        wall = time.perf_counter() - started
        time.sleep(1.0)
        prober.stop.set()
        watcher.stop.set()
        prober.join()
        watcher.join(timeout=300)
        worker_peak = {pid: peak_rss_mb([pid]) for pid in workers}
        helper_peak = peak_rss_mb([c for w in workers for c in worker_pids(w)])
    finally:
        server.stop()
    health = [t for times in prober.times.values() for t in times]
    for when, pid, ms in prober.slow:
        print(f"  /health {ms:.0f} ms on worker {pid}, {when - started:+.1f} s after the flood began")
    return {
        "outcomes": outcomes,
        "wall_s": wall,
        "health_max_ms": max(health, default=float("inf")),
        "health_p50_ms": statistics.median(health) if health else float("inf"),
        "health_p99_ms": statistics.quantiles(health, n=100)[98] if len(health) > 1 else float("inf"),
        "health_over_ms": sum(1 for t in health if t > HEALTH_MAX_MS),
        "health_calls": len(health),
        "health_failures": prober.failures,
        "health_workers": sum(1 for times in prober.times.values() if times),
        "late_max_ms": max((g - HEARTBEAT_S) * 1000 for g in watcher.gaps) if watcher.gaps else float("inf"),
        "streams": watcher.streams,
        "heartbeats": watcher.heartbeats,
        "streams_refused": watcher.refused,
        "streams_unfinished": watcher.unfinished,
        "worker_peak_mb": max(worker_peak.values()),
        "helper_peak_mb": helper_peak,
    }


def failures(run: dict) -> list[str]:
    counts = {k: run["outcomes"].count(k) for k in set(run["outcomes"])}
    found = []
    if set(counts) - {"200", "503"}:
        found.append(f"unexpected outcomes {counts}")
    if counts.get("200", 0) * 2 < CLIENTS:
        found.append(f"only {counts.get('200', 0)} of {CLIENTS} got 200")
    if run["health_max_ms"] > HEALTH_MAX_MS or run["health_failures"] or run["health_workers"] < 2:
        found.append(f"/health max {run['health_max_ms']:.0f} ms, {run['health_failures']} failed, "
                     f"{run['health_workers']} workers probed")
    if run["late_max_ms"] > LATE_MAX_MS or run["streams_unfinished"] or not run["streams"]:
        found.append(f"heartbeat late by {run['late_max_ms']:.0f} ms; streams {run['streams']}, "
                     f"unfinished {run['streams_unfinished']}")
    if run["worker_peak_mb"] > RSS_MAX_MB:
        found.append(f"worker peak RSS {run['worker_peak_mb']:.0f} MB")
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    runs = [run_once() for _ in range(parser.parse_args(argv).runs)]
    table(
        f"Flood: {CLIENTS} × {N} × {D} decimal vectors (35 MB) at once, 2 workers, default bounds",
        ["run", "200", "503 + Retry-After", "other", "wall s", "/health calls", "/health p50 ms", "/health p99 ms",
         "/health max ms", "/health > 250 ms", "streams", "keep-alives", "heartbeat max late ms", "worker peak MB",
         "parser peak MB"],
        [[i + 1, r["outcomes"].count("200"), r["outcomes"].count("503"),
          len(r["outcomes"]) - r["outcomes"].count("200") - r["outcomes"].count("503"), r["wall_s"],
          r["health_calls"], r["health_p50_ms"], r["health_p99_ms"], r["health_max_ms"], r["health_over_ms"], r["streams"], r["heartbeats"],
          r["late_max_ms"], r["worker_peak_mb"], r["helper_peak_mb"]] for i, r in enumerate(runs)],
    )
    problems = [f"run {i + 1}: {p}" for i, r in enumerate(runs) for p in failures(r)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
