"""What `"explain": true` costs: the in-process pipeline with and without it, and its parts.

Go-mode requests on supplied vectors (a third of them noisy copies), every
text carrying a number so the number guard has pairs to hold apart, the
threshold 0.3 and target_k = n/10 (so some rows are `mmr`). The pipeline runs
as a gunicorn worker runs it: two CPU threads of one BLAS thread each;
explain itself is one call on one of them.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as gunicorn.conf.py sets for the workers

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from app import jsonio  # noqa: E402
from pipeline.explain import chunk_rows, explain, guarded_pairs, pca_map  # noqa: E402
from pipeline.guards import NumberGuard  # noqa: E402
from pipeline.offload import Threads  # noqa: E402
from pipeline.runner import drain, run  # noqa: E402
from pipeline.types import Chunk, DedupeRequest  # noqa: E402

from .common import best_of, table, unit_vectors  # noqa: E402

CASES = [(1_000, 384), (10_000, 384), (1_000, 1536), (10_000, 1536)]
THRESHOLD = 0.3


def main() -> None:
    offload = Threads(2)
    try:
        rows = [_case(n, d, offload) for n, d in CASES]
    finally:
        offload.close()
    table(
        "Cost of explain (in-process, Go mode with the number guard, 2 threads)",
        ["n", "d", "pipeline ms", "explain ms", "explain / pipeline", "rows ms", "guarded pairs ms",
         "map ms", "pairs", "response KB", "explain KB"],
        rows,
    )
    print(
        "\npipeline ms: run() without explain; explain ms: `explain()` on the same two threads "
        "(what a request with it adds); rows, guarded pairs, map: each part alone on one thread. "
        "KB: the encoded response without explain, and what explain adds to it."
    )


def _case(n: int, d: int, offload) -> list[object]:
    unit = unit_vectors(n, d, duplicates=True)
    texts = [f"Item {i % 50} shipped in week {i % 7}." for i in range(n)]
    chunks = tuple(Chunk(id=str(i), text=t, score=i % 7, embedding=v) for i, (t, v) in enumerate(zip(texts, unit)))
    request = DedupeRequest(chunks=chunks, threshold=THRESHOLD, guards=("numbers",), target_k=n // 10, explain=True)
    repeat = 5 if n < 10_000 else 2
    result = drain(run(request, None, offload=offload))
    rows = result.explain["chunks"]
    labels = np.array([r["cluster_id"] for r in rows])
    chosen = {r["cluster_id"]: r["index"] for r in rows if r["state"] != "duplicate"}
    per_cluster = [chosen[c] for c in range(len(chosen))]
    kept = [r["index"] for r in rows if r["state"] == "kept"]
    ids = [c.id for c in chunks]
    guards = [NumberGuard(texts)]
    plain_request = dataclasses.replace(request, explain=False)
    pipeline_s = best_of(lambda: drain(run(plain_request, None, offload=offload)), repeat)
    explain_s = best_of(lambda: explain(ids, unit, labels, per_cluster, kept, THRESHOLD, guards, offload), repeat)
    rows_s = best_of(lambda: chunk_rows(ids, unit, labels, per_cluster, kept), repeat)
    pairs_s = best_of(lambda: guarded_pairs(unit, THRESHOLD, guards), repeat)
    map_s = best_of(lambda: pca_map(unit), repeat)
    with_explain = len(jsonio.dumps(result.to_wire()))
    pairs = len(result.explain["guarded_pairs"])
    result.explain = None
    without = len(jsonio.dumps(result.to_wire()))
    return [
        n, d, pipeline_s * 1000, explain_s * 1000, f"{explain_s / pipeline_s:.0%}", rows_s * 1000,
        pairs_s * 1000, map_s * 1000, pairs, without / 1024, (with_explain - without) / 1024,
    ]


if __name__ == "__main__":
    main()
