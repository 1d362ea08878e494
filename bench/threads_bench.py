"""Embedding threads per worker, with one or two busy workers on this machine.

Three ways to use the 2 cores: onnxruntime with 1 intra-op thread and one batch
at a time; 2 intra-op threads; 1 intra-op thread and two batches at once on
two threads (what a worker does: its CPU pool is 2 wide).
"""

from __future__ import annotations

import multiprocessing
import time

from .common import table

TEXTS = 400


def _worker(threads: int, at_once: int, start, results) -> None:
    from functools import partial

    from pipeline.embed import FastEmbedModel, length_sorted_batches
    from pipeline.offload import Threads
    from tests.support import synthetic_texts

    model = FastEmbedModel(threads=threads)
    model.dim()
    texts = synthetic_texts(TEXTS, seed=3)
    batches = length_sorted_batches(model.count_tokens(texts), model.batch_size)
    batches = [[texts[i] for i in batch] for batch in batches]
    pool = Threads(at_once)
    start.wait()
    begun = time.perf_counter()
    for k in range(0, len(batches), at_once):
        pool.all([partial(model.embed, batch) for batch in batches[k : k + at_once]])
    results.put(time.perf_counter() - begun)


def _run(workers: int, threads: int, at_once: int) -> float:
    """Total texts/s of `workers` processes embedding at once."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, at_once, start, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(3)  # let every process load its model before the common start
    start.set()
    slowest = max(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return workers * TEXTS / slowest


def main() -> None:
    settings = [(1, 1), (2, 1), (1, 2)]  # (intra-op threads, batches at once)
    rows = [[w, t, b, _run(w, t, b)] for w in (1, 2) for t, b in settings]
    table(
        "Embedding texts/s (all busy workers together) by onnxruntime threads and batches at once",
        ["busy workers", "intra-op threads", "batches at once", "texts/s"],
        rows,
    )


if __name__ == "__main__":
    main()
