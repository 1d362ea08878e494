"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.cluster import tile_rows

BARE_MAX_N = 20_000  # X @ X.T is 1.6 GB at 20k; at 100k it would be 40 GB


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of `repeat` runs, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_for(fn: Callable[[], object], n: int, repeat: int) -> float:
    """`best_of(fn, repeat)` up to BARE_MAX_N; above, one cold run (a warm-up
    would double a case that takes ~40 s)."""
    if n <= BARE_MAX_N:
        return best_of(fn, repeat)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


RESULTS = Path(__file__).resolve().parent / "results"
_recorded_this_run: set[str] = set()


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a markdown table and record it (see `record`)."""
    record(title, header, rows, bench=_calling_bench())
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")


def record(title: str, header: list[str], rows: list[list[object]], bench: str) -> None:
    """Keep a printed table as JSON in bench/results/<bench>.json, so the docs' figures are
    drawn from what a benchmark measured (`make docs-figures`), never from typed-in numbers.
    A bench's first table in a run replaces the file; later ones are added to it."""
    path = RESULTS / f"{bench.removeprefix('bench.')}.json"
    if bench in _recorded_this_run:
        results = json.loads(path.read_text())
    else:
        command = f"python -m {bench}"
        results = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "tables": []}
        _recorded_this_run.add(bench)
    results["tables"].append({"title": title, "header": header, "rows": rows})
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=_plain) + "\n")


def _plain(value: object) -> object:
    """numpy scalars as the Python numbers they hold."""
    return value.item() if hasattr(value, "item") else str(value)


def _calling_bench() -> str:
    """The module that called `table` (`bench.x`, also when run as `python -m bench.x`)."""
    caller = sys._getframe(2).f_globals
    spec = caller.get("__spec__")
    return spec.name if spec is not None else caller["__name__"]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


def unit_vectors(n: int, d: int, duplicates: bool, seed: int = 0) -> np.ndarray:
    """n random unit vectors; with `duplicates`, a third are noisy copies of others."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    if duplicates:
        copies = n // 3
        source = rng.integers(0, n - copies, copies)
        vectors[n - copies :] = vectors[source] + 0.1 * rng.normal(size=(copies, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bare_product(x: np.ndarray) -> None:
    """The least an exact method that looks at every pair must do: X @ X.T or, above
    BARE_MAX_N where that does not fit, the clustering tiles' products alone."""
    n, d = x.shape
    if n <= BARE_MAX_N:
        x @ x.T
        return
    tiles = tile_rows(n, d)
    buffer = np.empty(max((r1 - r0) * (n - r0) for r0, r1 in tiles), dtype=np.float32)
    for r0, r1 in tiles:
        np.matmul(x[r0:r1], x[r0:].T, out=buffer[: (r1 - r0) * (n - r0)].reshape(r1 - r0, n - r0))


def worker_pids(master_pid: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()]


def reset_peak_rss(pids: list[int]) -> None:
    """Start the processes' RSS high-water marks afresh (VmHWM := current RSS)."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pids: list[int]) -> float:
    """The largest RSS high-water mark among the processes, in MB."""
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=0.0)
