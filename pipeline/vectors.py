"""The embedding stage's machinery: vectors for a request's texts.

Identical texts are embedded once, texts in the cache not at all, and a text
longer than one model input window by window (`pipeline.segment.windows`), its
vector the windows' token-weighted mean. Batches are grouped by token count and
run `offload.width` at a time. The forward pass also yields each input's token
states; those of texts that are one model input are kept for the request (up to
STATES_BUDGET bytes), so the coverage guard, if it compares such a text, needs
no second pass.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .cache import Embedded, EmbeddingCache
from .embed import Embedder, l2_normalise, length_sorted_batches
from .offload import Offload
from .segment import windows
from .types import DedupeRequest, StageError

PROGRESS_INTERVAL_S = 0.1  # fractional progress at most ~10 times a second
STATES_BUDGET = 64 << 20  # bytes of token states a request keeps from its forward passes


class Embedding(NamedTuple):
    """What the stage hands on: every chunk's vector (given or embedded), the query's,
    whether the model embedded any chunk (model mode), and what it knows of each
    embedded text (token states where kept)."""

    vectors: np.ndarray  # (n, d) float32, as given or embedded (not normalised)
    query: np.ndarray | None
    model_mode: bool
    texts: dict[str, Embedded]


def embed_request(
    request: DedupeRequest,
    embedder: Embedder,
    offload: Offload,
    clock: Callable[[], float],
    cache: EmbeddingCache | None,
) -> Iterator[float]:
    """The embedding stage's body: yields progress (tokens embedded) and returns
    (`Embedding`, stats), stats None when the model had nothing to embed."""
    chunks = request.chunks
    wanted = [chunks[i].text for i in request.texts_to_embed]
    if request.query is not None and request.query_embedding is None:
        wanted.append(request.query)
    if not wanted:  # Go mode: every chunk brought its vector
        vectors = request.vectors
        if vectors is None:
            vectors = offload(partial(np.vstack, [c.embedding for c in chunks], dtype=np.float32))
        return Embedding(vectors, request.query_embedding, False, {}), None
    yield 0.0
    unique = list(dict.fromkeys(wanted))
    found = cache.get_many(unique) if cache is not None else {}
    texts = [text for text in unique if text not in found]
    plans = offload(plan_windows, texts, embedder)
    found.update((yield from _embed_plans(texts, plans, embedder, offload, clock, cache)))
    vectors = _chunk_vectors(request, found)
    query = request.query_embedding
    if query is None and request.query is not None:
        query = found[request.query].vector
    stats = {
        "embedded": len(unique),
        "windows": sum(found[text].windows for text in unique),
        "tokens": sum(found[text].tokens for text in unique),
    }
    return Embedding(vectors, query, bool(request.texts_to_embed), found), stats


def _embed_plans(texts, plans, embedder: Embedder, offload: Offload, clock, cache: EmbeddingCache | None):
    """Embed the windows not cached, `offload.width` batches at a time, and combine each
    text's windows; returns text -> `Embedded` (with token states for one-window texts,
    within STATES_BUDGET)."""
    window_tokens = {window: tokens for plan in plans for window, tokens in plan}
    whole = {plan[0][0] for plan in plans if len(plan) == 1}  # texts that are one window
    parts = [window for window in window_tokens if window not in whole]  # (whole texts: just missed)
    known = cache.get_many(parts) if cache is not None else {}
    todo = [window for window in window_tokens if window not in known]
    total = sum(window_tokens[w] for w in todo) or 1
    done, kept_bytes, last_report = 0, 0, clock()
    batches = length_sorted_batches([window_tokens[w] for w in todo], embedder.batch_size)
    batches = [[todo[i] for i in batch] for batch in batches]
    for start in range(0, len(batches), offload.width):  # a text's vector is the same in any batch
        group = batches[start : start + offload.width]
        computed, states = {}, {}
        for batch, (vectors, batch_states) in zip(group, offload.all([partial(embedder.encode, b) for b in group])):
            for window, vector, window_states in zip(batch, vectors, batch_states):
                computed[window] = Embedded(vector, 1, window_tokens[window])
                if window in whole and kept_bytes + window_states.nbytes <= STATES_BUDGET:
                    states[window] = window_states
                    kept_bytes += window_states.nbytes
            done += sum(window_tokens[w] for w in batch)
        if cache is not None:
            cache.put_many(computed)
        known.update(computed)
        known.update((w, known[w]._replace(states=q)) for w, q in states.items())
        if start + len(group) < len(batches) and clock() - last_report >= PROGRESS_INTERVAL_S:
            last_report = clock()
            yield done / total
    combined = {text: combine_windows(plan, known) for text, plan in zip(texts, plans)}
    if cache is not None:  # a one-window text was cached as its window
        cache.put_many({text: entry for text, entry in combined.items() if text not in whole})
    return combined


def _chunk_vectors(request: DedupeRequest, found: dict[str, Embedded]) -> np.ndarray:
    """(n, d) float32: each chunk's given vector or its text's."""
    dim = len(next(iter(found.values())).vector)
    vectors = np.empty((len(request.chunks), dim), dtype=np.float32)
    for i, chunk in enumerate(request.chunks):
        vector = chunk.embedding if chunk.embedding is not None else found[chunk.text].vector
        if len(vector) != dim:
            raise StageError("embedding", f"embedding dimension {len(vector)} != model dimension {dim}")
        vectors[i] = vector
    return vectors


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
    one window keeps that window's vector exactly, and its token states)."""
    tokens = sum(count for _, count in plan)
    if len(plan) == 1:
        window = windows[plan[0][0]]
        return Embedded(window.vector, 1, tokens, window.states)
    total = np.zeros(len(windows[plan[0][0]].vector), dtype=np.float64)
    for window, count in plan:
        total += count * windows[window].vector.astype(np.float64)
    return Embedded(l2_normalise(total[None, :])[0], len(plan), tokens)
