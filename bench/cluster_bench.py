"""Clustering time and peak memory next to the bare float32 all-pairs product.

Each case runs in its own subprocess (`python -m bench.cluster_bench KIND N D DUPS`)
so its peak RSS is its own: the child builds its input, resets the kernel's
high-water mark (/proc/self/clear_refs), runs, and reports VmHWM. "ours" is
`Clustering` at the Go-mode default (threshold 0.15, average linkage, no
guard), full matrix or tiles as it chooses; "bare" is `X @ X.T`, or for n
where that does not fit, the same tiles' products alone (the lower bound of
any exact method that looks at every pair).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import FULL_MATRIX_MAX_N, Clustering, tile_rows

from .common import best_of, table, unit_vectors

THRESHOLD = 0.15
BARE_MAX_N = 20_000  # X @ X.T is 1.6 GB here; at 100k it would be 40 GB
CASES = [(n, 384) for n in (1_000, 10_000, 20_000, 100_000)] + [(n, 1536) for n in (1_000, 10_000, 20_000)]
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main() -> None:
    rows = []
    runs = [(n, d, dups, 1) for n, d in CASES for dups in (False, True)]
    runs += [(100_000, 384, dups, 2) for dups in (False, True)]  # both cores, for the 30 s target
    bare_times: dict[tuple[int, int, int], dict] = {}
    for n, d, dups, threads in runs:
        ours = _child("ours", n, d, dups, threads)
        if (n, d, threads) not in bare_times:
            bare_times[n, d, threads] = _child("bare", n, d, False, threads)
        bare = bare_times[n, d, threads]
        rows.append([
            n, d, "yes" if dups else "no", threads, ours["path"], ours["clusters"],
            bare["seconds"], ours["seconds"], ours["seconds"] / bare["seconds"],
            ours["peak_mb"], bare["peak_mb"],
        ])
    table(
        f"Clustering (threshold {THRESHOLD}, average) vs the bare float32 all-pairs product",
        ["n", "d", "planted dups", "BLAS threads", "path", "clusters", "bare s", "ours s", "× bare",
         "ours peak MB", "bare peak MB"],
        rows,
    )
    print(
        f"\nbare: X @ X.T up to n = {BARE_MAX_N:,}, above it the tiled products alone. path: "
        f"full (n <= {FULL_MATRIX_MAX_N:,}) or tiles/batches of components. Peak MB: the "
        "child's RSS high-water mark after its input was built (the input itself included)."
    )


def _child(kind: str, n: int, d: int, dups: bool, threads: int) -> dict:
    import subprocess

    env = dict(os.environ, **{var: str(threads) for var in BLAS_VARS})
    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster_bench", kind, str(n), str(d), str(int(dups))],
        env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(kind: str, n: int, d: int, dups: bool) -> dict:
    """Run one case in this process; the dict main() reads back."""
    unit = unit_vectors(n, d, dups)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the run, not the input's build
    result: dict = {}

    def ours() -> None:
        job = Clustering(unit, THRESHOLD)
        steps = 0
        while job.step() < 1.0:
            steps += 1
        result.update(clusters=int(job.labels.max()) + 1, path=f"tiled, {steps + 1} steps" if steps else "full")

    def bare() -> None:
        if n <= BARE_MAX_N:
            unit @ unit.T
            return
        tiles = tile_rows(n, d)
        buffer = np.empty(max((r1 - r0) * (n - r0) for r0, r1 in tiles), dtype=np.float32)
        for r0, r1 in tiles:
            np.matmul(unit[r0:r1], unit[r0:].T, out=buffer[: (r1 - r0) * (n - r0)].reshape(r1 - r0, n - r0))

    fn = ours if kind == "ours" else bare
    if n <= BARE_MAX_N:
        seconds = best_of(fn, repeat=3)
    else:  # one cold run each for ours and bare
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    return dict(result, seconds=seconds, peak_mb=peak_kb // 1024)


if __name__ == "__main__":
    kind, n, d, dups = sys.argv[1:]
    print(json.dumps(_case(kind, int(n), int(d), dups == "1")))
