"""The shared embedding cache: a request answered cold, then again by each layer.

40 chunks of ~700 tokens (cut from the Python documentation like `long_chunks`
cuts them) sent to 2-worker servers:

* cold: no process has seen them (disk store, empty);
* same worker: repeated, answered by the worker that embedded them (memory);
* other worker: repeated, answered by the other worker (disk store);
* after a restart: a new server on the same directory (disk store);
* second server via Redis: one server embeds them, another answers (Redis);
* Redis stopped: a new server whose Redis is dead (the model, plus the fault).

Which worker answers is the kernel's choice: the worker of each request is read
from the access log, and repeats go one at a time until each worker has
answered one. Then what a worker holds after 10,000 distinct short
chunks with the default settings (RSS), and the disk store's size, bounded
by DISTILL_CACHE_DISK_MB=16 so that it evicts.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import RedisServer, Server

from . import long_chunks
from .common import table

N, TOKENS, CHARS_PER_TOKEN = 40, 700, 4.1
MANY, PER_REQUEST, DISK_MB = 10_000, 100, 16
LAYERS = ("memory", "disk", "redis")


def chunks(n: int = N, tokens: int = TOKENS, offset: int = 0) -> list[str]:
    size = int(tokens * CHARS_PER_TOKEN)
    cut = [
        c for doc in long_chunks.documents("eval") for c in long_chunks.split_recursive(doc, size)
        if len(c) >= 0.8 * size
    ]
    return list(dict.fromkeys(cut))[offset : offset + n]


def body(texts: list[str]) -> dict:
    return {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}


def send(server: Server, texts: list[str]) -> tuple[int, str, bytes]:
    """(milliseconds, the pid of the worker that answered, the answer without latency_ms)."""
    started = time.perf_counter()
    status, raw = server.post("/v1/dedupe", body(texts))
    ms = int((time.perf_counter() - started) * 1000)
    assert status == 200, raw
    return ms, _last_pid(server), raw.split(b'"latency_ms":')[0]


def _last_pid(server: Server) -> str:
    lines = [line for line in server.output().splitlines() if "POST /v1/dedupe" in line]
    return lines[-1].split("[")[2].split("]")[0]


def hits(server: Server) -> dict[str, tuple[int, int]]:
    samples = server.metrics()
    return {
        layer: tuple(
            int(samples.get(("distill_embedding_cache_lookups_total", (("layer", layer), ("result", r))), 0))
            for r in ("hit", "miss")
        )
        for layer in LAYERS
    }


def found_in(before: dict, after: dict) -> str:
    """Which layers answered how many lookups between two scrapes: 'disk 285/285'."""
    parts = []
    for layer in LAYERS:
        hit, miss = (after[layer][i] - before[layer][i] for i in (0, 1))
        if hit or miss:
            parts.append(f"{layer} {hit}/{hit + miss}")
    return ", ".join(parts)


def layer_rows(texts: list[str]) -> list[list[object]]:
    rows: list[list[object]] = []

    def row(case: str, ms: int, answered: str, answer: bytes) -> None:
        rows.append([case, ms, ms / rows[0][1] if rows else 1.0, answered, answer == reference])  # the cold answer

    def measured(server: Server) -> tuple[int, str, bytes, str]:
        before = hits(server)
        ms, pid, answer = send(server, texts)
        return ms, pid, answer, found_in(before, hits(server))

    with tempfile.TemporaryDirectory(prefix="distill-bench-cache-") as directory:
        server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=directory).start()
        try:
            server.post("/v1/dedupe", body(["warm up the workers"]))
            ms, cold_pid, reference, answered = measured(server)
            row("cold", ms, answered, reference)
            for case, ms, answered, answer in _first_on_each_worker(server, measured, cold_pid):
                row(case, ms, answered, answer)
        finally:
            server.stop()
        server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=directory).start()
        try:
            ms, _, answer, answered = measured(server)
            row("after a restart (disk)", ms, answered, answer)
        finally:
            server.stop()
    redis = RedisServer().start()
    try:
        first = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_URL=redis.url).start()
        second = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_URL=redis.url).start()
        try:
            send(first, texts)
            ms, _, answer, answered = measured(second)
            row("second server (redis)", ms, answered, answer)
        finally:
            first.stop()
            second.stop()
        redis.kill()
        third = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_URL=redis.url).start()
        try:
            third.post("/v1/dedupe", body(["warm up the workers"]))
            ms, _, answer, answered = measured(third)
            row("Redis stopped (model)", ms, answered, answer)
        finally:
            third.stop()
    finally:
        redis.stop()
    return rows


def _first_on_each_worker(server: Server, measured, cold_pid: str) -> list[tuple[str, int, str, bytes]]:
    """Repeats, one at a time, until each worker has answered one: the first on the worker
    that embedded the texts (from its memory), the first on the other (from the disk store)."""
    cases: dict[str, tuple[str, int, str, bytes]] = {}
    for _ in range(60):
        ms, pid, answer, answered = measured(server)
        case = "same worker (memory)" if pid == cold_pid else "other worker (disk)"
        cases.setdefault(case, (case, ms, answered, answer))
        if len(cases) == 2:
            return [cases["same worker (memory)"], cases["other worker (disk)"]]
    raise RuntimeError(f"one worker answered every repeat: {list(cases)}")


def footprint_rows() -> list[list[object]]:
    """RSS of each worker after MANY distinct short chunks (default settings, but for a
    disk store bounded at DISK_MB so that it evicts), and the store's size on disk."""
    texts = chunks(MANY, 60)
    with tempfile.TemporaryDirectory(prefix="distill-bench-cache-") as directory:
        server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=directory, DISTILL_CACHE_DISK_MB=str(DISK_MB)).start()
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda i: send(server, texts[i : i + PER_REQUEST]), range(0, len(texts), PER_REQUEST)))
            seconds = time.perf_counter() - started
            rss = sorted(_rss_mb(pid) for pid in _worker_pids(server))
            disk = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file()) / 2**20
            entries = hits(server)
        finally:
            server.stop()
    lookups = sum(entries["disk"])
    return [[len(texts), int(seconds), " / ".join(f"{r:.0f}" for r in rss), DISK_MB, disk, lookups]]


def _worker_pids(server: Server) -> set[str]:
    return {line.split("[")[2].split("]")[0] for line in server.output().splitlines() if "POST /v1/dedupe" in line}


def _rss_mb(pid: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    texts = chunks()
    table(
        f"Shared embedding cache: {len(texts)} chunks of ~{TOKENS} tokens, 2-worker servers (ms)",
        ["case", "ms", "x cold", "lookups answered (hits/lookups)", "same bytes"],
        layer_rows(texts),
    )
    table(
        f"Embedding cache footprint: {MANY:,} distinct chunks of ~60 tokens, {PER_REQUEST} a request",
        ["chunks", "s", "worker RSS MB", "DISTILL_CACHE_DISK_MB", "disk store MB", "disk lookups"],
        footprint_rows(),
    )


if __name__ == "__main__":
    main()
