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
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np

from .cluster import Clustering, members
from .embed import (
    BUNDLED_MODEL,
    Embedder,
    EmbeddingCache,
    ModelUnavailable,
    l2_normalise,
    length_sorted_batches,
)
from .guards import NumberGuard
from .mmr import mmr_order
from .offload import INLINE, Offload
from .profiles import GO_THRESHOLD, model_threshold
from .select import min_max, representatives
from .types import DedupeRequest, OutputChunk, Result, StageError, StageEvent

EMBEDDING, CLUSTERING, SELECTION, MMR = "embedding", "clustering", "selection", "mmr"
PROGRESS_INTERVAL_S = 0.1  # fractional progress at most ~10 times a second

@dataclass(frozen=True)
class Defaults:
    """Values a request leaves open. Go mode: every chunk brought a vector;
    model mode: the model embedded at least one, so its calibrated profile applies."""

    go_threshold: float = GO_THRESHOLD
    model_threshold: float = model_threshold(BUNDLED_MODEL)
    lambda_: float = 0.5
    model_guards: tuple[str, ...] = ("numbers",)


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

    `started` is when the request body was parsed (for `latency_ms`); `cache`
    holds vectors of texts seen before (the `embedded` stat counts only the rest).
    Any failure inside a stage is raised as `StageError(stage, message)`.
    """
    started = clock() if started is None else started
    chunks = request.chunks
    vectors, query_vector, model_mode = yield from _stage(
        EMBEDDING, _embed(request, embedder, offload, clock, cache), clock
    )
    unit = offload(l2_normalise, vectors)  # ~10 ms at 2,000 x 1,536: off the event loop
    threshold = request.threshold
    if threshold is None:
        threshold = defaults.model_threshold if model_mode else defaults.go_threshold
    guards = request.guards
    if guards is None:
        guards = defaults.model_guards if model_mode else ()
    texts = [c.text for c in chunks]
    labels = yield from _stage(
        CLUSTERING, _cluster(unit, texts, threshold, guards, request.linkage, offload, clock), clock
    )
    clusters = members(labels)
    scores = np.array([c.score for c in chunks], dtype=np.float64)
    picked = yield from _stage(
        SELECTION, _select(clusters, request.selection, unit, scores, texts, offload), clock
    )
    if 0 < request.target_k < len(picked):
        lambda_ = defaults.lambda_ if request.lambda_ is None else request.lambda_
        relevance = _relevance(picked, scores, unit, query_vector)
        picked = yield from _stage(
            MMR, _mmr(picked, unit, relevance, lambda_, request.target_k, offload), clock
        )
    yield Result(
        chunks=[
            OutputChunk(chunks[i].id, chunks[i].text, chunks[i].score, int(labels[i]))
            for i in picked
        ],
        input_count=len(chunks),
        cluster_count=len(clusters),
        latency_ms=int((clock() - started) * 1000),
    )


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


def _embed(
    request: DedupeRequest, embedder: Embedder, offload: Offload, clock, cache: EmbeddingCache | None
):
    """Embed the chunks without vectors (and the query text); identical texts once,
    texts in `cache` not at all."""
    chunks = request.chunks
    missing = request.texts_to_embed
    wanted = [chunks[i].text for i in missing]
    if request.query is not None and request.query_embedding is None:
        wanted.append(request.query)
    given = [c.embedding for c in chunks if c.embedding is not None]
    if not wanted:
        vectors = offload(partial(np.vstack, given, dtype=np.float32))
        return (vectors, request.query_embedding, False), None
    yield 0.0
    found = cache.get_many(dict.fromkeys(wanted)) if cache is not None else {}
    unique = [text for text in dict.fromkeys(wanted) if text not in found]
    last_report = clock()
    batches = [[unique[i] for i in batch] for batch in length_sorted_batches(unique, embedder.batch_size)]
    for start in range(0, len(batches), offload.width):  # a text's vector is the same in any batch
        group = batches[start : start + offload.width]
        computed = {}
        for texts, vectors in zip(group, offload.all([partial(embedder.embed, texts) for texts in group])):
            computed.update(zip(texts, vectors))
        found.update(computed)
        if cache is not None:
            cache.put_many(computed)
        done = start + len(group)
        if done < len(batches) and clock() - last_report >= PROGRESS_INTERVAL_S:
            last_report = clock()
            yield done / len(batches)
    dim = len(next(iter(found.values())))
    vectors = np.empty((len(chunks), dim), dtype=np.float32)
    for i, chunk in enumerate(chunks):
        vector = chunk.embedding if chunk.embedding is not None else found[chunk.text]
        if len(vector) != dim:
            raise StageError(EMBEDDING, f"embedding dimension {len(vector)} != model dimension {dim}")
        vectors[i] = vector
    query = request.query_embedding
    if query is None and request.query is not None:
        query = found[request.query]
    model_mode = bool(missing)
    return (vectors, query, model_mode), {"embedded": len(unique)}


def _cluster(unit, texts, threshold, guards, method, offload: Offload, clock):
    """Cluster in bounded steps (one, or per tile and per batch of components at large n,
    `offload.width` of them at once)."""
    yield 0.0
    guard = offload(NumberGuard, texts) if "numbers" in guards else None
    job = Clustering(unit, threshold, method, guard)
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
    }
    return job.labels, stats


def _select(clusters, strategy, unit, scores, texts, offload: Offload):
    yield 0.0
    picked = offload(representatives, clusters, strategy, unit, scores, texts)
    return picked, {"selected": len(picked)}


def _relevance(picked: Sequence[int], scores, unit, query_vector) -> np.ndarray:
    """MMR relevance: min-max normalised scores, or cosine similarity to the query."""
    if query_vector is None:
        return min_max(scores[list(picked)])
    query = l2_normalise(np.asarray(query_vector)[None, :])[0].astype(np.float64)
    return unit[list(picked)].astype(np.float64) @ query


def _mmr(picked, unit, relevance, lambda_, target_k, offload: Offload):
    yield 0.0
    by_input = np.argsort(picked, kind="stable")  # ties go to the earliest input
    candidates = np.asarray(picked)[by_input]
    order = offload(mmr_order, unit[candidates], relevance[by_input], lambda_, target_k)
    chosen = [int(candidates[p]) for p in order]
    return chosen, {"output_count": len(chosen)}
