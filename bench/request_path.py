"""The request path, before and after: four big Go-mode requests through a real gunicorn,
next to the float32 GEMM bound measured in the same run, with a stage breakdown.

Shapes: 1,000 x 1,536 decimal vectors, the same as base64 float32, 2,000 x 384 and
10,000 x 384 decimal (target_k = min(n/10, 100), as `http_bench`). Servers run side by
side on 127.0.0.1, each with 2 workers and the default limits: this checkout and a
`git worktree` of each commit in `BEFORE` (or those named on the command line) in a
temporary directory (removed afterwards); requests alternate between them, so a busy
machine slows all alike.

* e2e ms: client wall time of one POST (median); latency_ms: the server's own (median);
  server ms: the app's access-log time (from the request's start, body read included,
  to the response built); bound: `X @ X.T` in float32 on one BLAS thread (the ratios'
  denominator), and on two (a worker's two pool threads share the clustering's products;
  OpenBLAS's own default here, so a run that did not pin it measured this one), each
  timed before every round of requests, the fastest of them (other work on the machine
  only adds to it).
* The stage breakdown runs each tree's own functions in process on the same body
  (`python bench/request_path.py --stages TREE BODY`): parse, validate (what
  `app.parsing.parse_body` reports), gather (one matrix of the vectors), normalise,
  candidates (the clustering's float32 tiles, two at once), linkage (the rest of the
  clustering stage), selection, mmr, serialise. "read & hand-offs" is what the server
  spent outside them (server ms - latency_ms - parse - serialise: reading the body,
  handing it between threads or processes); "transfer" is e2e - server ms (sending the
  body and the answer over the socket).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# 09b353e: the last commit before the request-path work; ca8f09a: before its second round
# (shared memory to the body parser, one matrix of the vectors, balanced tiles).
BEFORE = ("09b353e", "ca8f09a")
SHAPES = [(1000, 1536, "numbers"), (1000, 1536, "base64"), (2000, 384, "numbers"), (10000, 384, "numbers")]
TARGETS = {  # what the request path should reach, against the bound measured in the same run
    (1000, 1536, "numbers"): "e2e ≤ 10×, latency_ms ≤ 60",
    (1000, 1536, "base64"): "e2e ≤ 4×",
    (2000, 384, "numbers"): "e2e ≤ 6×",
    (10000, 384, "numbers"): "e2e ≤ 1.2 s",
}
STAGES = ["parse", "validate", "gather", "normalise", "candidates", "linkage", "selection", "mmr", "serialise"]


def main(*before: str) -> None:
    from tests.support import Server

    from .common import table, unit_vectors
    from .http_bench import _vectors_body

    before = before or BEFORE
    with tempfile.TemporaryDirectory(prefix="distill-before-") as scratch:
        trees: dict[str, Path] = {}
        try:
            for rev in before:
                trees[rev] = Path(scratch) / rev
                subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(trees[rev]), rev],
                               cwd=ROOT, check=True)
            trees["this"] = ROOT
            servers = {name: Server(root=tree, WEB_CONCURRENCY="2").start() for name, tree in trees.items()}
            try:
                rows, stage_rows = [], []
                for n, d, form in SHAPES:
                    x = unit_vectors(n, d, duplicates=True)
                    body = Path(scratch) / "body.json"
                    body.write_bytes(_vectors_body(x, form))
                    bounds: dict[int, list[float]] = {1: [], 2: []}
                    measured = _alternate(servers, body.read_bytes(), 5 if n > 2000 else 15, x, bounds)
                    bound, bound2 = min(bounds[1]), min(bounds[2])
                    for name, tree in trees.items():
                        wall, latency, server_ms = measured[name]
                        stages = _stages(tree, body)
                        shape = f"{n:,} x {d:,} {form}"
                        rows.append([shape, name, bound * 1000, bound2 * 1000, wall, latency, server_ms,
                                     wall / 1000 / bound, latency / 1000 / bound, wall / 1000 / bound2,
                                     TARGETS[n, d, form]])
                        outside = server_ms - latency - stages["parse"] - stages["serialise"]
                        stage_rows.append([shape, name, wall - server_ms, max(outside, 0.0)]
                                          + [stages[s] for s in STAGES])
            finally:
                for server in servers.values():
                    server.stop()
        finally:
            for rev in before:
                subprocess.run(["git", "worktree", "remove", "--force", str(Path(scratch) / rev)], cwd=ROOT, check=False)
    table(
        f"The request path: POST /v1/dedupe (Go mode, 2 workers), {', '.join(before)} and this checkout, same run",
        ["shape", "version", "bound ms", "2-thread bound ms", "e2e ms", "latency_ms", "server ms", "e2e × bound",
         "latency × bound", "e2e × 2-thread bound", "target"],
        rows,
    )
    table(
        "Where the time goes (ms; in process on each tree's own functions, medians)",
        ["shape", "version", "transfer", "read & hand-offs"] + STAGES,
        stage_rows,
    )


def _alternate(servers: dict, payload: bytes, repeat: int, x, bounds: dict[int, list[float]]
               ) -> dict[str, tuple[float, float, float]]:
    """Median (e2e ms, latency_ms, server ms) per server, posting to each in turn; before each
    round, one bare product of `x` timed on each number of BLAS threads in `bounds` (the bound
    is their minimum: other work on the machine only ever adds to it)."""
    from threadpoolctl import threadpool_limits

    from .common import bare_product

    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    logged = {name: len(_access_ms(server)) for name, server in servers.items()}
    for i in range(repeat + 1):  # the first round warms them up
        for threads, times in bounds.items():
            with threadpool_limits(threads, user_api="blas"):
                start = time.perf_counter()
                bare_product(x)
                times.append(time.perf_counter() - start)
        for name, server in servers.items():
            conn = server.connection()
            start = time.perf_counter()
            conn.request("POST", "/v1/dedupe", payload, {"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            wall = time.perf_counter() - start
            conn.close()
            assert response.status == 200, raw[:200]
            if i:
                samples[name].append((wall * 1000, json.loads(raw)["stats"]["latency_ms"]))
    out = {}
    for name, server in servers.items():
        server_ms = _access_ms(server)[logged[name] + 1 :]  # the warm-up's line dropped
        out[name] = (
            statistics.median(s[0] for s in samples[name]),
            statistics.median(s[1] for s in samples[name]),
            statistics.median(server_ms) if server_ms else float("nan"),
        )
    return out


def _access_ms(server) -> list[float]:
    return [float(ms) for ms in re.findall(r"POST /v1/dedupe 200 ([0-9.]+)ms", server.output())]


def _stages(tree: Path, body: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--stages", str(tree), str(body)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_times(body_path: str, repeat: int = 5) -> dict[str, float]:
    """Median ms of each stage, on the functions of the tree on sys.path (any version)."""
    import inspect
    from functools import partial

    import numpy as np

    from app import jsonio
    from app.config import load_config
    from app.parsing import parse_body
    from pipeline.cluster import tile_rows
    from pipeline.distance import candidate_margin, candidate_pairs
    from pipeline.embed import l2_normalise
    from pipeline.offload import Threads
    from pipeline.runner import run
    from pipeline.types import Result, StageEvent

    body = Path(body_path).read_bytes()
    config = load_config()
    parse_args = (config,)
    if "decoder" in inspect.signature(parse_body).parameters:  # reused, as the body parser does
        parse_args += (jsonio.RequestDecoder(),)
    threads = Threads(2)
    times: dict[str, list[float]] = {s: [] for s in STAGES}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        times[name].append((time.perf_counter() - start) * 1000)
        return value

    for _ in range(repeat + 1):
        start = time.perf_counter()
        request, validation_s = parse_body(bytearray(body), *parse_args)
        total = time.perf_counter() - start
        times["parse"].append((total - validation_s) * 1000)
        times["validate"].append(validation_s * 1000)
        gathered = getattr(request, "vectors", None)  # (validation gathers them since ca8f09a)
        vectors = timed("gather", lambda: gathered if gathered is not None else np.vstack(
            [c.embedding for c in request.chunks], dtype=np.float32))
        unit = timed("normalise", l2_normalise, vectors)
        min_similarity = np.float32(1.0 - 0.15 - candidate_margin(unit))
        tiles = tile_rows(*unit.shape)

        def candidates():
            for start_tile in range(0, len(tiles), 2):
                pair = tiles[start_tile : start_tile + 2]
                threads.all([partial(candidate_pairs, unit, r0, r1, min_similarity) for r0, r1 in pair])

        timed("candidates", candidates)
        durations = {}
        result = None
        for item in run(request, embedder=None, offload=threads):
            if isinstance(item, StageEvent) and item.stats:
                durations[item.stage] = item.stats["duration_ms"]
            elif isinstance(item, Result):
                result = item
        times["linkage"].append(max(durations["clustering"] - times["candidates"][-1], 0.0))
        times["selection"].append(durations["selection"])
        times["mmr"].append(durations.get("mmr", 0))
        timed("serialise", lambda: jsonio.dumps(result.to_wire()))
    threads.close()
    return {name: statistics.median(values[1:]) for name, values in times.items()}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stages"]:
        sys.path.insert(0, sys.argv[2])
        print(json.dumps(stage_times(sys.argv[3])))
    else:
        main(*sys.argv[1:])
