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
from .cache import Embedded, EmbeddingCache
from .embed import (
    BUNDLED_MODEL,
    Embedder,
    ModelUnavailable,
    l2_normalise,
    length_sorted_batches,
)
from .explain import explain, with_frozen_prefix
from .guards import NumberGuard
from .segment import windows
from .mmr import mmr_order
from .offload import INLINE, Offload
from .prefix import CachePrefix, estimated_tokens, prefix_hash
from .profiles import GO_THRESHOLD, coverage_threshold, model_threshold
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
    suffix = replace(request, chunks=request.chunks[request.frozen_count :], frozen_count=0)
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
    coverage = None
    if "coverage" in guards:
        embedded = {chunks[i].text: vectors[i] for i in request.texts_to_embed}  # (one-sentence chunks)
        coverage = Coverage(texts, embedder, defaults.coverage_threshold, cache, embedded)
    labels, eligible, guard_objects = yield from _stage(
        CLUSTERING, _cluster(unit, texts, threshold, guards, coverage, request.linkage, offload, clock), clock
    )
    clusters = members(labels)
    scores = np.array([c.score for c in chunks], dtype=np.float64)
    picked = yield from _stage(
        SELECTION, _select(clusters, request.selection, unit, scores, texts, eligible, offload), clock
    )
    per_cluster = picked
    if 0 < request.target_k < len(picked):
        lambda_ = defaults.lambda_ if request.lambda_ is None else request.lambda_
        relevance = _relevance(picked, scores, unit, query_vector)
        picked = yield from _stage(
            MMR, _mmr(picked, unit, relevance, lambda_, request.target_k, offload), clock
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
        cluster_count=len(clusters),
        latency_ms=int((clock() - started) * 1000),
        labels=tuple(labels.tolist()),
        explain=explained,
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
    """Embed the chunks without vectors (and the query text): identical texts once, texts
    in `cache` not at all, a long text window by window (its vector: the windows' token-
    weighted mean). Progress counts the tokens embedded."""
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
    unique = list(dict.fromkeys(wanted))
    found = cache.get_many(unique) if cache is not None else {}
    texts = [text for text in unique if text not in found]
    plans = offload(plan_windows, texts, embedder)
    window_tokens = {window: tokens for plan in plans for window, tokens in plan}
    known = cache.get_many(list(window_tokens)) if cache is not None else {}
    todo = [window for window in window_tokens if window not in known]
    total = sum(window_tokens[w] for w in todo) or 1
    done = 0
    last_report = clock()
    batches = length_sorted_batches([window_tokens[w] for w in todo], embedder.batch_size)
    batches = [[todo[i] for i in batch] for batch in batches]
    for start in range(0, len(batches), offload.width):  # a text's vector is the same in any batch
        group = batches[start : start + offload.width]
        computed = {}
        for batch, vectors in zip(group, offload.all([partial(embedder.embed, batch) for batch in group])):
            computed.update((w, Embedded(v, 1, window_tokens[w])) for w, v in zip(batch, vectors))
            done += sum(window_tokens[w] for w in batch)
        known.update(computed)
        if cache is not None:
            cache.put_many(computed)
        if start + len(group) < len(batches) and clock() - last_report >= PROGRESS_INTERVAL_S:
            last_report = clock()
            yield done / total
    combined = {text: combine_windows(plan, known) for text, plan in zip(texts, plans)}
    if cache is not None:
        cache.put_many(combined)
    found.update(combined)
    dim = len(next(iter(found.values())).vector)
    vectors = np.empty((len(chunks), dim), dtype=np.float32)
    for i, chunk in enumerate(chunks):
        vector = chunk.embedding if chunk.embedding is not None else found[chunk.text].vector
        if len(vector) != dim:
            raise StageError(EMBEDDING, f"embedding dimension {len(vector)} != model dimension {dim}")
        vectors[i] = vector
    query = request.query_embedding
    if query is None and request.query is not None:
        query = found[request.query].vector
    model_mode = bool(missing)
    stats = {
        "embedded": len(unique),
        "windows": sum(found[text].windows for text in unique),
        "tokens": sum(found[text].tokens for text in unique),
    }
    return (vectors, query, model_mode), stats


def plan_windows(texts: Sequence[str], embedder: Embedder) -> list[list[tuple[str, int]]]:
    """Each text's model inputs and their token counts: the text itself when it fits one
    input, else its windows (`pipeline.segment.windows`)."""
    limit = embedder.window_tokens()
    plans = []
    for text, tokens in zip(texts, embedder.token_spans(texts)):
        if len(tokens) <= limit:
            plans.append([(text, len(tokens))])
        else:
            plans.append([(text[a:b], count) for (a, b), count in windows(text, tokens, limit)])
    return plans


def combine_windows(plan: list[tuple[str, int]], windows: dict[str, Embedded]) -> Embedded:
    """A text's vector from its windows': the token-weighted mean, L2-normalised (a text of
    one window keeps that window's vector exactly)."""
    tokens = sum(count for _, count in plan)
    if len(plan) == 1:
        return Embedded(windows[plan[0][0]].vector, 1, tokens)
    total = np.zeros(len(windows[plan[0][0]].vector), dtype=np.float64)
    for window, count in plan:
        total += count * windows[window].vector.astype(np.float64)
    return Embedded(l2_normalise(total[None, :])[0], len(plan), tokens)


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


def _select(clusters, strategy, unit, scores, texts, eligible, offload: Offload):
    yield 0.0
    picked = offload(representatives, clusters, strategy, unit, scores, texts, eligible)
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
