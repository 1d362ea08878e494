"""The in-process pipeline on supplied vectors, next to the bare float32 all-pairs product.

`python -m bench.pipeline_bench` prints the table (as `make bench` does). Each case
runs in its own subprocess (`python -m bench.pipeline_bench KIND N D DUPS THREADS`) so its peak RSS is its own: the child builds its input, resets the
kernel's high-water mark (/proc/self/clear_refs), runs, and reports VmHWM.

"ours" is `run()` in Go mode (threshold 0.15, average linkage, target_k =
min(n/10, 100)) with `THREADS` CPU threads of one BLAS thread each, as a
gunicorn worker runs it. "bare" is `X @ X.T` with `THREADS` BLAS threads or,
above n = 20,000 where that matrix does not fit, the same upper-triangle tiles'
products alone: the least any exact method that looks at every pair must do.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

from pipeline.offload import INLINE, Threads
from pipeline.runner import run
from pipeline.types import Chunk, DedupeRequest, Result, StageEvent

from .common import BARE_MAX_N, bare_product, peak_rss_mb, reset_peak_rss, seconds_for, table, unit_vectors

CASES = [(n, 384) for n in (100, 1_000, 2_000, 10_000, 100_000)]
CASES += [(n, 1536) for n in (100, 1_000, 2_000, 10_000, 20_000)]
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main() -> None:
    runs = [(n, d, dups, 2) for n, d in CASES for dups in (False, True)]
    runs += [(100_000, 384, dups, 1) for dups in (False, True)]  # one core: both workers busy
    bare_times: dict[tuple[int, int, int], dict] = {}
    rows = []
    for n, d, dups, threads in runs:
        ours = _child("ours", n, d, dups, threads)
        if (n, d, threads) not in bare_times:
            bare_times[n, d, threads] = _child("bare", n, d, False, threads)
        bare = bare_times[n, d, threads]
        rows.append([
            n, d, "yes" if dups else "no", threads, ours["clusters"], bare["seconds"] * 1000,
            ours["clustering_ms"], ours["seconds"] * 1000, ours["seconds"] / bare["seconds"],
            ours["peak_mb"],
        ])
    table(
        "In-process pipeline on supplied vectors (Go mode) vs the bare float32 all-pairs product",
        ["n", "d", "planted dups", "threads", "clusters", "bare ms", "clustering ms",
         "pipeline ms", "× bare", "peak MB"],
        rows,
    )
    print(
        "\nthreads: CPU threads for the pipeline (one BLAS thread each) and BLAS threads for bare. "
        f"bare: X @ X.T up to n = {BARE_MAX_N:,}, above it the tiles' products alone. clustering ms: "
        "the stage's own duration_ms. Peak MB: the child's RSS high-water mark during the run "
        "(its input included)."
    )


def _child(kind: str, n: int, d: int, dups: bool, threads: int) -> dict:
    import subprocess

    blas_threads = threads if kind == "bare" else 1
    env = dict(os.environ, **{var: str(blas_threads) for var in BLAS_VARS})
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline_bench", kind, str(n), str(d), str(int(dups)), str(threads)],
        env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(kind: str, n: int, d: int, dups: bool, threads: int) -> dict:
    """Run one case in this process; the dict main() reads back."""
    unit = unit_vectors(n, d, dups)
    request = DedupeRequest(
        chunks=tuple(Chunk(id=str(i), score=i % 7, embedding=v) for i, v in enumerate(unit)),
        target_k=min(n // 10, 100),
    )
    offload = Threads(threads) if threads > 1 else INLINE
    reset_peak_rss([os.getpid()])  # measure the run, not the input's build
    result: dict = {}

    def ours() -> None:
        for item in run(request, embedder=None, offload=offload):
            if isinstance(item, StageEvent) and item.stage == "clustering" and item.stats:
                result["clustering_ms"] = item.stats["duration_ms"]
            elif isinstance(item, Result):
                result["clusters"] = item.cluster_count

    fn = ours if kind == "ours" else partial(bare_product, unit)
    seconds = seconds_for(fn, n, repeat=5 if n < 10_000 else 1)
    return dict(result, seconds=seconds, peak_mb=int(peak_rss_mb([os.getpid()])))


if __name__ == "__main__" and len(sys.argv) == 1:
    main()
elif __name__ == "__main__":
    kind, n, d, dups, threads = sys.argv[1:]
    print(json.dumps(_case(kind, int(n), int(d), dups == "1", int(threads))))
