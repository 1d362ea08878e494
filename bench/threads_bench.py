"""Intra-op threads per worker: 1 vs 2, with one or two busy workers on this machine."""

from __future__ import annotations

import multiprocessing
import time

from .common import table

TEXTS = 400


def _worker(threads: int, start, results) -> None:
    from pipeline.embed import FastEmbedModel, length_sorted_batches
    from tests.support import synthetic_texts

    model = FastEmbedModel(threads=threads)
    model.dim()
    texts = synthetic_texts(TEXTS, seed=3)
    start.wait()
    begun = time.perf_counter()
    for batch in length_sorted_batches(texts, model.batch_size):
        model.embed([texts[i] for i in batch])
    results.put(time.perf_counter() - begun)


def _run(workers: int, threads: int) -> float:
    """Total texts/s of `workers` processes embedding at once."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, start, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(3)  # let every process load its model before the common start
    start.set()
    slowest = max(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return workers * TEXTS / slowest


def main() -> None:
    rows = [[w, t, _run(w, t)] for w in (1, 2) for t in (1, 2)]
    table("Embedding texts/s by busy workers and intra-op threads each", ["busy workers", "threads", "texts/s"], rows)


if __name__ == "__main__":
    main()
