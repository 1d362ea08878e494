"""`make test-load`: many concurrent streams and plain requests against 2 gunicorn workers.

Bounded in count and time, 127.0.0.1 only. Every stream must end with exactly
one terminal event whose result equals `/v1/dedupe` for the same body; some
clients read slowly, and must not hold up the others. Then SIGTERM arrives
while a second wave of streams runs: none may be cut mid-frame. Then a flood
(see `bench/flood.py`), three times: 40 bodies of 35 MB at once, with `/health`
p50/p99/max. Exits non-zero if anything was lost, wrong or cut, or a flood
missed a bound.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support import Server, SSEParser, synthetic_texts

from . import flood
from .common import peak_rss_mb, worker_pids

STREAMS = 60
PLAIN = 60
BODIES = 12
SLOW_EVERY = 5  # every 5th stream reads one line at a time with pauses
FLOOD_RUNS = 3  # /health's worst case varies from run to run


def bodies() -> list[dict]:
    """Distinct request bodies of 20-60 texts, a third of them repeated (duplicates)."""
    rng = random.Random(7)
    out = []
    for b in range(BODIES):
        texts = synthetic_texts(rng.randint(20, 60), seed=100 + b)
        texts += rng.sample(texts, len(texts) // 3)
        out.append({"chunks": [{"id": str(i), "text": t, "score": rng.random()} for i, t in enumerate(texts)]})
    return out


def zero_latency(result: dict) -> dict:
    result["stats"]["latency_ms"] = 0
    return result


def one_stream(server: Server, body: dict, expected: dict, slow: bool) -> str:
    """'completed', 'incorrect', 'error' (an error event), 'refused' (never accepted)
    or 'lost' (accepted, then no terminal event or cut mid-frame)."""
    try:
        conn, response = server.open_stream(body)
    except OSError:
        return "refused"
    try:
        parser, raw = SSEParser(), b""
        while True:
            line = response.readline()
            if not line:
                break
            raw += line
            parser.feed(line.decode())
            if slow:
                time.sleep(0.01)
        conn.close()
    except OSError:
        return "lost"
    terminal = [e for e in parser.events if e.type in ("complete", "error")]
    if len(terminal) != 1 or not raw.endswith(b"\n\n") or parser._buffer:
        return "lost"
    if terminal[0].type == "error":
        return "error"
    return "completed" if zero_latency(terminal[0].json) == expected else "incorrect"


def one_plain(server: Server, body: dict, expected: dict) -> str:
    try:
        status, raw = server.post("/v1/dedupe", body)
    except OSError:
        return "lost"
    if status != 200:
        return "lost"
    return "completed" if zero_latency(json.loads(raw)) == expected else "incorrect"


def tally(outcomes: list[str]) -> dict[str, int]:
    return {k: outcomes.count(k) for k in ("completed", "incorrect", "error", "lost", "refused")}


def main() -> int:
    server = Server(WEB_CONCURRENCY="2", GUNICORN_CMD_ARGS="--graceful-timeout 20").start()
    try:
        requests = bodies()
        expected = [zero_latency(json.loads(server.post("/v1/dedupe", b)[1])) for b in requests]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=STREAMS + PLAIN) as pool:
            streams = [
                pool.submit(one_stream, server, requests[k % BODIES], expected[k % BODIES], k % SLOW_EVERY == 0)
                for k in range(STREAMS)
            ]
            plain = [pool.submit(one_plain, server, requests[k % BODIES], expected[k % BODIES]) for k in range(PLAIN)]
            stream_outcomes = [f.result(timeout=300) for f in streams]
            plain_outcomes = [f.result(timeout=300) for f in plain]
        wall = time.perf_counter() - started
        peak = peak_rss_mb(worker_pids(server.process.pid))

        # Second wave: SIGTERM while streams run.
        with ThreadPoolExecutor(max_workers=STREAMS) as pool:
            wave = [
                pool.submit(one_stream, server, requests[k % BODIES], expected[k % BODIES], False)
                for k in range(STREAMS)
            ]
            time.sleep(0.5)  # let the wave get going: this is a load script, not a test assertion
            server.process.send_signal(signal.SIGTERM)
            term_outcomes = [f.result(timeout=300) for f in wave]
        exit_code = server.process.wait(timeout=120)
    finally:
        server.stop()

    s, p, t = tally(stream_outcomes), tally(plain_outcomes), tally(term_outcomes)
    print(f"streams started {STREAMS} / completed {s['completed']} / lost {s['lost'] + s['refused']} / "
          f"incorrect {s['incorrect']} / error events {s['error']}")
    print(f"plain requests {PLAIN} / completed {p['completed']} / lost {p['lost']} / incorrect {p['incorrect']}")
    print(f"wall time {wall:.1f} s for the first wave; max worker RSS {peak:.0f} MB")
    print(f"SIGTERM wave: {STREAMS} streams / completed {t['completed']} / error events {t['error']} / "
          f"incorrect {t['incorrect']} / cut {t['lost']} / refused after SIGTERM {t['refused']}; "
          f"server exit code {exit_code}")
    failed = sum(s[k] for k in ("lost", "refused", "incorrect", "error"))
    failed += p["lost"] + p["incorrect"] + t["incorrect"] + t["lost"]
    return 1 if failed or flood.main(["--runs", str(FLOOD_RUNS)]) else 0


if __name__ == "__main__":
    sys.exit(main())
