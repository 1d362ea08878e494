"""Model mode on real chunk sizes: latency through gunicorn, and embedding tokens/s.

50 chunks of ~60, ~250, ~700 and ~1,500 tokens, cut from the Python
documentation like `long_chunks` cuts them, sent to a 2-worker server as
streams (the stage stats say what the model read) in three cases:

* cold: chunks no worker has seen;
* repeated: the same request again (an agent resending its context; the
  median of 5 sends after both workers have seen it);
* half new: 25 of those chunks and 25 unseen ones;
* shifted: 50 chunks cut elsewhere from text already sent (the second half of
  one chunk and the first half of another, as a splitter with 50 % overlap
  cuts): only the seams are new.

`python -m bench.whole_chunks_bench [CHECKOUT]` also runs the cold and repeated
cases against another checkout of the service (e.g. an older commit), in the same
run, for the "before" columns. The second table is the embedding stage against raw
fastembed on the same model inputs, one thread each, in this process.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from pipeline.embed import FastEmbedModel
from pipeline.runner import run
from pipeline.vectors import plan_windows
from pipeline.types import Chunk, DedupeRequest, StageEvent
from tests.support import Server, SSEParser

from . import long_chunks
from .common import table

TOKENS = (60, 250, 700, 1500)
CHARS_PER_TOKEN = 4.1  # of this corpus, for the bundled tokenizer
N = 50


def chunk_sets(tokens: int) -> tuple[list[str], list[str]]:
    """Two disjoint sets of N chunks of about `tokens` tokens."""
    size = int(tokens * CHARS_PER_TOKEN)
    chunks = [
        c for doc in long_chunks.documents("eval") for c in long_chunks.split_recursive(doc, size)
        if len(c) >= 0.8 * size
    ]
    step = max(1, len(chunks) // (3 * N))
    picked = list(dict.fromkeys(chunks[::step]))
    return picked[:N], picked[N : 2 * N]


def shifted(texts: list[str]) -> list[str]:
    """Each chunk's second half (from the paragraph break nearest its middle) joined to
    the next chunk's first half."""
    def cut(text: str) -> int:
        breaks = [i for i in range(len(text)) if text.startswith("\n\n", i)] or [len(text) // 2]
        return min(breaks, key=lambda i: abs(i - len(text) // 2))

    return [
        text[cut(text):].strip() + "\n\n" + after[: cut(after)].strip()
        for text, after in zip(texts, texts[1:] + texts[:1])
    ]


def stream_stats(server: Server, texts: list[str]) -> dict:
    """latency_ms, and the embedding stage's tokens and duration, of one streamed request."""
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}
    conn, response = server.open_stream(body)
    parser, stats = SSEParser(), {}
    while line := response.readline():
        for event in parser.feed(line.decode()):
            data = event.json
            if event.type == "progress" and data["stage"] == "embedding" and data.get("stats"):
                stats.update(tokens=data["stats"]["tokens"], embed_ms=data["stats"]["duration_ms"])
            elif event.type == "complete":
                stats["latency_ms"] = data["stats"]["latency_ms"]
            elif event.type == "error":
                raise RuntimeError(data["error"])
    conn.close()
    return stats


def latency_rows(server: Server, before: Server | None = None) -> list[list[object]]:
    """Per size: cold, repeated, half new and shifted on `server`; with `before` (another
    checkout), its cold and repeated right after, so both see the same machine load."""
    rows = []
    for tokens in TOKENS:
        first, second = chunk_sets(tokens)
        cold = stream_stats(server, first)
        repeated = _repeated(lambda: stream_stats(server, first)["latency_ms"])
        half = stream_stats(server, first[: N // 2] + second[: N // 2])
        moved = stream_stats(server, shifted(first))
        rows.append([
            tokens, cold["tokens"] // N, cold["latency_ms"], repeated, half["latency_ms"],
            moved["latency_ms"], int(cold["tokens"] / max(1, cold["embed_ms"]) * 1000),
        ])
        if before is not None:
            body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(first)]}
            rows[-1] += [_latency_ms(before, body), _repeated(lambda: _latency_ms(before, body))]
    return rows


def _repeated(send) -> float:
    """The median of 5 sends, after two more so that both workers have seen the request."""
    for _ in range(2):
        send()
    return statistics.median(send() for _ in range(5))


def _latency_ms(server: Server, body: dict) -> int:
    status, raw = server.post("/v1/dedupe", body)
    assert status == 200, raw[:200]
    return json.loads(raw)["stats"]["latency_ms"]


def tokens_per_second() -> list[list[object]]:
    """The embedding stage (one thread, no cache) against raw fastembed on the same inputs."""
    model = FastEmbedModel()
    model.dim()
    rows = []
    for tokens in TOKENS:
        texts, _ = chunk_sets(tokens)
        windows = [w for plan in plan_windows(texts, model) for w in plan]
        total = sum(n for _, n in windows)
        started = time.perf_counter()
        list(model._model.embed([w for w, _ in windows], batch_size=16))  # fastembed as shipped
        raw_s = time.perf_counter() - started
        request = DedupeRequest(chunks=tuple(Chunk(text=t) for t in texts), guards=())
        stage = [e for e in run(request, model) if isinstance(e, StageEvent) and e.stage == "embedding"][-1]
        ours_s = stage.stats["duration_ms"] / 1000
        rows.append([tokens, len(windows), total, int(total / raw_s), int(total / ours_s), (raw_s / ours_s)])
    return rows


def main(before: Path | None = None) -> None:
    servers = [Server(WEB_CONCURRENCY="2").start()]
    if before is not None:
        servers.append(Server(root=before, WEB_CONCURRENCY="2").start())
    try:
        for server in servers:
            server.post("/v1/dedupe", {"chunks": [{"text": "warm the model up"}]})
        rows = latency_rows(*servers)
    finally:
        for server in servers:
            server.stop()
    table(
        f"Model mode, {N} chunks per request, 2 workers: server latency_ms",
        ["~tokens", "tokens/chunk", "cold", "repeated", "half new", "shifted",
         "embedding tokens/s (cold)"]
        + (["cold before", "repeated before"] if before is not None else []),
        rows,
    )
    table(
        "Embedding stage vs raw fastembed on the same model inputs (one thread, no cache)",
        ["~tokens", "model inputs", "tokens", "raw tokens/s", "stage tokens/s", "stage / raw"],
        tokens_per_second(),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
