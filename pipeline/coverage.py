"""The coverage guard: a chunk may replace another only if it says everything the other says.

Chunk vectors summarise: two 3,000-character chunks that share their first
half, or differ in one paragraph, can sit within any useful threshold. So two
chunks may merge only if one *covers* the other: every sentence of the covered
chunk lies within the coverage distance of some sentence of the covering one
(a sentence pair the number guard separates does not count; two chunks of one
sentence each are compared by their vectors alone, as before). And a cluster
keeps a chunk that covers every other member; a cluster that no member covers
is split until each part has one (`covering_split`).

Sentence vectors cost model time, so they are computed only for chunks whose
merge is in question (members of multi-member candidate components), through
the same embedder and cache as the chunks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .distance import MAX_DISTANCE, cross_distances
from .cache import Embedded, EmbeddingCache
from .embed import Embedder, length_sorted_batches
from .guards import NumberGuard
from .segment import units, windows

_BLOCK_ROWS = 2048  # sentence rows per block of distances (memory: block x sentences)


class Coverage:
    """Sentence-level coverage between the chunks `texts`, prepared chunk by chunk.

    `known` holds model vectors of texts already embedded (a one-sentence chunk is
    its own sentence). `plan(chunks)` splits those chunks into sentences and returns
    the batches of sentences the model must still embed; the caller runs `embed_batch` on each
    (on any thread) and hands the results to `absorb`. Then `covers(chunks)`
    answers for any of the prepared chunks.
    """

    name = "coverage"

    def __init__(
        self,
        texts: Sequence[str],
        embedder: Embedder,
        threshold: float,
        cache: EmbeddingCache | None = None,
        known: dict[str, np.ndarray] | None = None,
    ):
        self.texts, self.embedder, self.threshold, self.cache = texts, embedder, threshold, cache
        self.compared = 0  # distinct sentences of the prepared chunks, wherever their vectors come from
        self._sentences: dict[int, list[str]] = {}  # chunk -> its sentences' texts
        self._vectors: dict[str, np.ndarray] = dict(known or {})
        self._tokens: dict[str, int] = {}  # tokens of the sentences still to embed

    def plan(self, chunks: Sequence[int]) -> list[list[str]]:
        """Split `chunks` into sentences; the batches of sentences still to embed."""
        for chunk in chunks:
            if chunk not in self._sentences:
                self._sentences[chunk] = sentences(self.texts[chunk], self.embedder)
        distinct = list(dict.fromkeys(s for c in chunks for s in self._sentences[c]))
        self.compared = len(distinct)
        wanted = [s for s in distinct if s not in self._vectors]
        if self.cache is not None:
            self._vectors.update((s, entry.vector) for s, entry in self.cache.get_many(wanted).items())
        missing = [s for s in wanted if s not in self._vectors]
        self._tokens.update(zip(missing, self.embedder.count_tokens(missing)))
        batches = length_sorted_batches([self._tokens[s] for s in missing], self.embedder.batch_size)
        return [[missing[i] for i in batch] for batch in batches]

    def embed_batch(self, batch: list[str]) -> dict[str, Embedded]:
        """Vectors of one batch of sentences, with the tokens `plan` counted (for the cache)."""
        vectors = self.embedder.embed(batch)
        return {s: Embedded(v, 1, self._tokens[s]) for s, v in zip(batch, vectors)}

    def absorb(self, computed: dict[str, Embedded]) -> None:
        self._vectors.update((s, entry.vector) for s, entry in computed.items())
        if self.cache is not None:
            self.cache.put_many(computed)

    def separates(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(e,) bool: whether neither of chunks first[k], second[k] covers the other (what
        `explain` lists). Only prepared chunks are judged: no other pair was in question."""
        out = np.zeros(len(first), dtype=bool)
        for k, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
            if a in self._sentences and b in self._sentences:
                covers = self.covers([a, b])
                out[k] = not (covers[0, 1] or covers[1, 0])
        return out

    def sizes(self, chunks: Sequence[int]) -> np.ndarray:
        """(m,) int: how many sentences each of the prepared chunks has."""
        return np.array([len(self._sentences[c]) for c in chunks])

    def covers(self, chunks: Sequence[int]) -> np.ndarray:
        """(m, m) bool: [a, b] is whether chunk chunks[a] covers chunk chunks[b].

        A chunk without text is covered by every chunk and covers only those
        without text (it says nothing). A chunk covers itself. Two chunks of one
        sentence each cover each other: their own vectors already compared them
        (the threshold); coverage is about what a longer chunk says beyond another.
        """
        lists = [self._sentences[c] for c in chunks]
        sizes = np.array([len(s) for s in lists])
        covers = np.ones((len(chunks), len(chunks)), dtype=bool)
        said = np.flatnonzero(sizes > 0)
        if len(said):
            covered = self._covered([lists[i] for i in said])
            covers[np.ix_(said, said)] = covered.T
            covers[np.ix_(sizes == 0, sizes > 0)] = False
        covers[np.ix_(sizes == 1, sizes == 1)] = True
        np.fill_diagonal(covers, True)
        return covers

    def _covered(self, lists: list[list[str]]) -> np.ndarray:
        """(m, m) bool for chunks with sentences: [b, a] is whether every sentence of b
        is near some sentence of a."""
        flat = [s for sentences_ in lists for s in sentences_]
        vectors = np.vstack([self._vectors[s] for s in flat])
        starts = np.cumsum([0] + [len(s) for s in lists[:-1]])
        guard = NumberGuard(flat)
        near = np.empty((len(flat), len(lists)), dtype=bool)  # sentence s is near a sentence of chunk a
        columns = np.arange(len(flat))
        for r0 in range(0, len(flat), _BLOCK_ROWS):
            r1 = min(len(flat), r0 + _BLOCK_ROWS)
            distances = cross_distances(vectors[r0:r1], vectors)
            distances[guard.mask(columns[r0:r1], columns)] = MAX_DISTANCE
            near[r0:r1] = np.logical_or.reduceat(distances <= self.threshold, starts, axis=1)
        return np.logical_and.reduceat(near, starts, axis=0)


def sentences(text: str, embedder: Embedder) -> list[str]:
    """The text's sentences (and structured lines) as the model reads them: one too long
    for one model input is cut into windows."""
    limit = embedder.window_tokens()
    out = []
    for a, b in units(text):
        sentence = text[a:b]
        if len(sentence) <= limit:  # every token holds at least one character
            out.append(sentence)
        else:
            spans = windows(sentence, embedder.token_spans([sentence])[0], limit)
            out.extend(sentence[c:d] for (c, d), _ in spans)
    return out


def covering_split(covers: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split one cluster until some member of each part covers all the others.

    `covers`: (m, m) bool among the cluster's members (in input order). Returns
    each member's part (0, 1, ...) and whether it may represent its part (it covers
    every other member). Greedy and deterministic: the member covering the most
    of the rest (ties: the earliest) takes what it covers, and so on.
    """
    m = len(covers)
    parts = np.zeros(m, dtype=np.int64)
    eligible = np.zeros(m, dtype=bool)
    remaining = np.arange(m)
    part = 0
    while len(remaining):
        sub = covers[np.ix_(remaining, remaining)]
        best = int(np.argmax(sub.sum(axis=1)))
        taken = remaining[sub[best]] if not sub.all() else remaining
        parts[taken] = part
        covering = taken[covers[np.ix_(taken, taken)].all(axis=1)]
        eligible[covering[sizes[covering] == sizes[covering].max()]] = True
        remaining = np.setdiff1d(remaining, taken)
        part += 1
    return parts, eligible
