"""The stage runner: one generator drives a request through every stage.

`run()` yields `StageEvent`s and, last, the `Result`. `/v1/dedupe` drains it;
`/v1/dedupe/stream` turns each event into an SSE frame. Closing the generator
between two events stops the work: no later batch or stage runs.

CPU-heavy steps go through an `Offload` (see `offload.py`): inline by default;
a server passes one that runs them on a thread pool so its event loop keeps
serving other requests meanwhile. A step is bounded: `offload.width`
embedding batches, clustering tiles or batches of components at once, one per
thread; that is how far work can run on after a client leaves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np

from .cluster import Clustering, members
from .coverage import Coverage
from .cache import EmbeddingCache
from .embed import BUNDLED_MODEL, Embedder, ModelUnavailable, l2_normalise
from .explain import explain, with_frozen_prefix
from .guards import NumberGuard
from .mmr import mmr_order
from .offload import INLINE, Offload
from .prefix import estimated_tokens, prefix_hash
from .profiles import GO_THRESHOLD, coverage_threshold, model_threshold
from .select import best_scored, min_max, representatives
from .types import CachePrefix, DedupeRequest, OutputChunk, Result, StageError, StageEvent
from .vectors import PROGRESS_INTERVAL_S, embed_request

EMBEDDING, CLUSTERING, SELECTION, MMR = "embedding", "clustering", "selection", "mmr"
SPLIT_NORMALISE = 1 << 18  # vector entries from which the rows are normalised in blocks at once

@dataclass(frozen=True)
class Defaults:
    """Values a request leaves open. Go mode: every chunk brought a vector;
    model mode: the model embedded at least one, so its calibrated profile applies."""

    go_threshold: float = GO_THRESHOLD
    model_threshold: float = model_threshold(BUNDLED_MODEL)
    lambda_: float = 0.5
    model_guards: tuple[str, ...] = ("numbers", "coverage")
    coverage_threshold: float = coverage_threshold(BUNDLED_MODEL)


def run(
    request: DedupeRequest,
    embedder: Embedder,
    defaults: Defaults = Defaults(),
    offload: Offload = INLINE,
    clock: Callable[[], float] = time.perf_counter,
    started: float | None = None,
    cache: EmbeddingCache | None = None,
) -> Iterator[StageEvent | Result]:
    """Yield the stage events of `request`, then its `Result`.

    A frozen cache prefix (`request.frozen_count` leading chunks) skips every
    stage: the stages see only the suffix, and the prefix comes first in the
    result, as sent, with `cluster_id` -1. When every chunk is frozen no stage
    runs at all. `started` is when the request body was parsed (for
    `latency_ms`; default: now); `cache` holds vectors of texts seen before.
    """
    started = clock() if started is None else started
    if not request.frozen_count:
        yield from _run_stages(request, embedder, defaults, offload, clock, started, cache)
        return
    frozen = request.chunks[: request.frozen_count]
    vectors = None if request.vectors is None else request.vectors[request.frozen_count :]
    suffix = replace(request, chunks=request.chunks[request.frozen_count :], frozen_count=0, vectors=vectors)
    result = Result(chunks=[], input_count=0, cluster_count=0)
    if suffix.chunks:
        for item in _run_stages(suffix, embedder, defaults, offload, clock, started, cache):
            if isinstance(item, Result):
                result = item
            else:
                yield item
    yield Result(
        chunks=[OutputChunk(c.id, c.text, c.score, -1) for c in frozen] + result.chunks,
        input_count=len(request.chunks),
        cluster_count=result.cluster_count,
        latency_ms=int((clock() - started) * 1000),
        cache_prefix=CachePrefix(
            tokens=estimated_tokens(frozen),
            hash=prefix_hash(frozen),
            suffix_input_count=len(suffix.chunks),
            suffix_output_count=len(result.chunks),
        ),
        explain=with_frozen_prefix(result.explain, [c.id for c in frozen]) if request.explain else None,
    )


def _run_stages(
    request: DedupeRequest,
    embedder: Embedder,
    defaults: Defaults,
    offload: Offload,
    clock: Callable[[], float],
    started: float,
    cache: EmbeddingCache | None,
) -> Iterator[StageEvent | Result]:
    """`run` for a request with nothing frozen: every stage, then the `Result`.

    `started` is when the request body was parsed (for `latency_ms`); `cache`
    holds vectors of texts seen before (no stat depends on it).
    Any failure inside a stage is raised as `StageError(stage, message)`.
    """
    chunks = request.chunks
    embedding = yield from _stage(EMBEDDING, embed_request(request, embedder, offload, clock, cache), clock)
    vectors, query_vector, model_mode = embedding.vectors, embedding.query, embedding.model_mode
    unit = _unit_rows(vectors, offload)
    threshold = request.threshold
    if threshold is None:
        threshold = defaults.model_threshold if model_mode else defaults.go_threshold
    guards = request.guards
    if guards is None:
        guards = defaults.model_guards if model_mode else ()
    texts = [c.text for c in chunks]
    coverage = None
    if "coverage" in guards:
        coverage = Coverage(texts, embedder, defaults.coverage_threshold, cache, embedding.texts)
    labels, eligible, guard_objects = yield from _stage(
        CLUSTERING, _cluster(unit, texts, threshold, guards, coverage, request.linkage, offload, clock), clock
    )
    picked, scores, cluster_count = yield from _stage(
        SELECTION, _select(labels, request.selection, unit, chunks, texts, eligible, offload), clock
    )
    per_cluster = picked
    if 0 < request.target_k < len(picked):
        lambda_ = defaults.lambda_ if request.lambda_ is None else request.lambda_
        picked = yield from _stage(
            MMR, _mmr(picked, scores, unit, query_vector, lambda_, request.target_k, offload), clock
        )
    explained = None
    if request.explain:
        ids = [c.id for c in chunks]
        explained = explain(ids, unit, labels, per_cluster, picked, threshold, guard_objects, offload)
    yield Result(
        chunks=[
            OutputChunk(chunks[i].id, chunks[i].text, chunks[i].score, int(labels[i]))
            for i in picked
        ],
        input_count=len(chunks),
        cluster_count=cluster_count,
        latency_ms=int((clock() - started) * 1000),
        labels=tuple(labels.tolist()),
        explain=explained,
    )


def _unit_rows(vectors: np.ndarray, offload: Offload) -> np.ndarray:
    """`l2_normalise(vectors)` off the event loop (~3 ms at 1,000 x 1,536); a big matrix in
    `offload.width` row blocks at once (each row's result is the same in any block)."""
    if offload.width < 2 or vectors.size < SPLIT_NORMALISE:
        return offload(l2_normalise, vectors)
    unit = np.empty(vectors.shape, dtype=np.float32)
    bounds = np.linspace(0, len(vectors), offload.width + 1).astype(int)

    def rows(a: int, b: int) -> None:
        unit[a:b] = l2_normalise(vectors[a:b])

    offload.all([partial(rows, a, b) for a, b in zip(bounds[:-1], bounds[1:])])
    return unit


def drain(events: Iterator[StageEvent | Result]) -> Result:
    """Run to the end and return the result (what `/v1/dedupe` does)."""
    item = None
    for item in events:
        pass
    assert isinstance(item, Result)
    return item


def _stage(name: str, body: Iterator[float], clock: Callable[[], float]):
    """Turn one stage body into events and stamp its `duration_ms`.

    A body yields progress fractions (0 first, when it runs) and returns
    (value, stats); stats None means the stage was skipped and sent nothing.
    Failures become `StageError` with a message fit for a client.
    """
    begun = clock()
    try:
        while True:
            yield StageEvent(name, next(body))
    except StopIteration as done:
        value, stats = done.value
    except StageError:
        raise
    except ModelUnavailable as exc:
        raise StageError(name, str(exc)) from exc
    except Exception as exc:
        raise StageError(name, f"{name} failed: {type(exc).__name__}") from exc
    if stats is not None:
        stats["duration_ms"] = int((clock() - begun) * 1000)
        yield StageEvent(name, 1.0, stats)
    return value


def _cluster(unit, texts, threshold, guards, coverage: Coverage | None, method, offload: Offload, clock):
    """Cluster in bounded steps (tiles, sentence batches, batches of components;
    `offload.width` of them at once)."""
    yield 0.0
    guard = offload(NumberGuard, texts) if "numbers" in guards else None
    job = Clustering(unit, threshold, method, guard, coverage)
    last_report = clock()
    while (done := job.step(offload)) < 1.0:
        if clock() - last_report >= PROGRESS_INTERVAL_S:
            last_report = clock()
            yield done
    stats = {
        "clusters_formed": int(job.labels.max()) + 1,
        "input_count": len(texts),
        "threshold": threshold,
        "guarded_pairs": job.guarded_pairs,
        "guarded_by": dict(job.guarded_by),
    }
    if coverage is not None:
        stats["sentences"] = coverage.compared
    guards_used = [g for g in (guard, coverage) if g is not None]
    return (job.labels, job.eligible, guards_used), stats


def _select(labels, strategy, unit, chunks, texts, eligible, offload: Offload):
    yield 0.0
    picked, scores, cluster_count = offload(_representatives, labels, strategy, unit, chunks, texts, eligible)
    return (picked, scores, cluster_count), {"selected": len(picked)}


def _representatives(labels, strategy, unit, chunks, texts, eligible) -> tuple[list[int], np.ndarray, int]:
    """The selection stage's work, in one call off the event loop (the clusters' member
    lists alone are ~10 ms at 10,000 chunks): each cluster's representative, every chunk's
    score (for MMR) and how many clusters there are."""
    scores = np.array([c.score for c in chunks], dtype=np.float64)
    if strategy == "score" and (eligible is None or eligible.all()):
        return best_scored(labels, scores), scores, int(labels.max()) + 1
    clusters = members(labels)
    return representatives(clusters, strategy, unit, scores, texts, eligible), scores, len(clusters)


def _relevance(picked: Sequence[int], scores, unit, query_vector) -> np.ndarray:
    """MMR relevance: min-max normalised scores, or cosine similarity to the query."""
    if query_vector is None:
        return min_max(scores[list(picked)])
    query = l2_normalise(np.asarray(query_vector)[None, :])[0].astype(np.float64)
    return unit[list(picked)].astype(np.float64) @ query


def _mmr(picked, scores, unit, query_vector, lambda_, target_k, offload: Offload):
    yield 0.0
    chosen = offload(_mmr_picks, picked, scores, unit, query_vector, lambda_, target_k)
    return chosen, {"output_count": len(chosen)}


def _mmr_picks(picked, scores, unit, query_vector, lambda_, target_k) -> list[int]:
    """The MMR stage's work, in one call off the event loop: relevance, the candidates in
    input order (ties go to the earliest input), the picks as input indices."""
    relevance = _relevance(picked, scores, unit, query_vector)
    by_input = np.argsort(picked, kind="stable")
    candidates = np.asarray(picked)[by_input]
    order = mmr_order(unit[candidates], relevance[by_input], lambda_, target_k)
    return [int(candidates[p]) for p in order]
