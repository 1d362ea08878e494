"""Pipeline time (clustering + selection + MMR) on supplied vectors vs the bare X @ X.T."""

from __future__ import annotations

from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest

from .common import best_of, table, unit_vectors


def main() -> None:
    rows = []
    for d in (384, 1536):
        for n in (1000, 2000):
            for duplicates in (False, True):
                vectors = unit_vectors(n, d, duplicates)
                chunks = tuple(Chunk(id=str(i), score=i % 7, embedding=v) for i, v in enumerate(vectors))
                request = DedupeRequest(chunks=chunks, target_k=n // 10)
                bare = best_of(lambda: vectors @ vectors.T)
                result = drain(run(request, embedder=None))
                total = best_of(lambda: drain(run(request, embedder=None)), repeat=3)
                rows.append([
                    n, d, "yes" if duplicates else "no", result.cluster_count,
                    bare * 1000, total * 1000, total / bare,
                ])
    table(
        "Pipeline on supplied vectors (Go mode, target_k = n/10)",
        ["n", "d", "planted dups", "clusters", "bare X@X.T ms", "pipeline ms", "× bare"],
        rows,
    )
