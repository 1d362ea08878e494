"""Embedding throughput: our batching vs raw fastembed on the same texts."""

from __future__ import annotations

import time

from pipeline.embed import FastEmbedModel, length_sorted_batches
from pipeline.offload import Threads
from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest

from .common import table

SHORT = "The quick brown fox jumps over the lazy dog near the river bank {}."
LONG = " ".join(["Retrieval augmented generation systems gather many overlapping passages"] * 12) + " {}"


def main() -> None:
    model = FastEmbedModel()
    model.dim()
    pool = Threads(2)  # as a worker's CPU pool
    rows = []
    for name, template, n in (("short", SHORT, 1000), ("long", LONG, 300)):
        texts = [template.format(i) for i in range(n)]
        raw = _rate(lambda: list(model._model.embed(texts, batch_size=16)), n)  # fastembed as shipped
        batches = length_sorted_batches(model.count_tokens(texts), model.batch_size)
        ours = _rate(lambda: [model.embed([texts[i] for i in b]) for b in batches], n)
        request = DedupeRequest(chunks=tuple(Chunk(id=str(i), text=t) for i, t in enumerate(texts)))
        pipeline = _rate(lambda: drain(run(request, model)), n)
        wide = _rate(lambda: drain(run(request, model, offload=pool)), n)
        rows.append([name, n, raw, ours, pipeline, ours / raw, wide, wide / raw])
    table(
        "Embedding throughput (texts/s, bundled int8 MiniLM, 1 intra-op thread)",
        ["texts", "n", "raw fastembed", "our batches", "whole pipeline", "ours / raw",
         "pipeline, 2 batches at once", "that / raw"],
        rows,
    )
    pool.close()


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
