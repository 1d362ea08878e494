"""The coverage guard: a chunk may replace another only if it says everything the other says.

Chunk vectors summarise: two 3,000-character chunks that share their first
half, or differ in one paragraph, can sit within any useful threshold, and so
can a sentence and the same sentence less a clause. So two chunks may merge
only if one *covers* the other: every sentence of the covered chunk is covered
(`pipeline.tokens`: token by token, numbers included) by a sentence of the
covering one within the coverage distance; two chunks of one sentence each are
compared token by token alone (their own distance is the clustering's). And a
cluster keeps a chunk that covers every other member; a cluster that no member
covers is split until each part has one (`covering_split`).

Sentence vectors and token states cost model time, so they are computed only for
chunks whose merge is in question (members of multi-member candidate
components), through the same embedder and cache as the chunks; a one-sentence
chunk brings its token states from the embedding stage's own forward pass.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .cache import Embedded, EmbeddingCache
from .distance import cross_distances
from .embed import Embedder, length_sorted_batches
from .profiles import token_profile
from .segment import units, windows
from .tokens import Sentence, TokenJudge

_BLOCK_ROWS = 2048  # sentence rows per block of distances (memory: block x sentences)
EXPLAIN_WORDS = 20  # unsaid words explain lists per pair


class Coverage:
    """Coverage between the chunks `texts`, prepared chunk by chunk.

    `known` holds what the embedding stage already has of texts (a one-sentence chunk
    is its own sentence): vectors, and token states where it kept them. `plan(chunks)`
    splits those chunks into sentences and returns the batches of sentences the
    model must still encode; the caller runs `embed_batch` on each (on any thread)
    and hands the results to `absorb`. Then `covers(chunks)` answers for any of the
    prepared chunks.
    """

    name = "coverage"

    def __init__(
        self,
        texts: Sequence[str],
        embedder: Embedder,
        threshold: float,
        cache: EmbeddingCache | None = None,
        known: dict[str, Embedded] | None = None,
    ):
        self.texts, self.embedder, self.threshold, self.cache = texts, embedder, threshold, cache
        self.judge = TokenJudge(embedder, token_profile(embedder.name))
        self.compared = 0  # distinct sentences of the prepared chunks, wherever their vectors come from
        self._sentences: dict[int, list[str]] = {}  # chunk -> its sentences' texts
        self._known: dict[str, Embedded] = {t: e for t, e in (known or {}).items() if e.states is not None}
        self._encoded: dict[str, Embedded] = {}  # sentence -> vector, tokens and states
        self._parsed: dict[str, Sentence] = {}
        self._verdicts: dict[tuple[str, str], bool] = {}  # (covering, covered) sentences
        self._tokens: dict[str, int] = {}  # tokens of the sentences still to encode

    def plan(self, chunks: Sequence[int]) -> list[list[str]]:
        """Split `chunks` into sentences; the batches of sentences still to encode."""
        for chunk in chunks:
            if chunk not in self._sentences:
                self._sentences[chunk] = sentences(self.texts[chunk], self.embedder)
        distinct = list(dict.fromkeys(s for c in chunks for s in self._sentences[c]))
        self.compared = len(distinct)
        wanted = [s for s in distinct if s not in self._encoded]
        if self.cache is not None:
            found = self.cache.get_many(wanted)
            self._encoded.update((s, e) for s, e in found.items() if e.states is not None)
        from_stage = {s: self._known[s] for s in wanted if s in self._known and s not in self._encoded}
        self.absorb(from_stage)  # kept by the embedding stage: now cached with their states
        missing = [s for s in wanted if s not in self._encoded]
        self._tokens.update(zip(missing, self.embedder.count_tokens(missing)))
        batches = length_sorted_batches([self._tokens[s] for s in missing], self.embedder.batch_size)
        return [[missing[i] for i in batch] for batch in batches]

    def embed_batch(self, batch: list[str]) -> dict[str, Embedded]:
        """Vectors and token states of one batch of sentences, with the tokens `plan`
        counted (for the cache)."""
        vectors, states = self.embedder.encode(batch)
        return {s: Embedded(v, 1, self._tokens[s], q) for s, v, q in zip(batch, vectors, states)}

    def absorb(self, computed: dict[str, Embedded]) -> None:
        self._encoded.update(computed)
        if self.cache is not None and computed:
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

    def unsaid_words(self, covering: int, covered: int) -> list[str]:
        """Words of chunk `covered` that chunk `covering` does not say (at most
        EXPLAIN_WORDS): for each of its sentences that no sentence of `covering`
        covers, the words its nearest sentence there leaves unsaid."""
        ours, theirs = self._sentences[covered], self._sentences[covering]
        if not ours or not theirs:
            return []
        distances = cross_distances(self._vectors(ours), self._vectors(theirs))
        one_each = len(ours) == len(theirs) == 1
        words: list[str] = []
        for row, sentence in enumerate(ours):
            if any(self._said(t, sentence, d, one_each) for t, d in zip(theirs, distances[row])):
                continue
            nearest = theirs[int(np.argmin(distances[row]))]
            words += self.judge.unsaid_words(sentence, self._sentence(sentence), self._sentence(nearest))
        return words[:EXPLAIN_WORDS]

    def sizes(self, chunks: Sequence[int]) -> np.ndarray:
        """(m,) int: how many sentences each of the prepared chunks has."""
        return np.array([len(self._sentences[c]) for c in chunks])

    def covers(self, chunks: Sequence[int]) -> np.ndarray:
        """(m, m) bool: [a, b] is whether chunk chunks[a] covers chunk chunks[b].

        A chunk without text is covered by every chunk and covers only those
        without text (it says nothing). A chunk covers itself.
        """
        lists = [self._sentences[c] for c in chunks]
        sizes = np.array([len(s) for s in lists])
        covers = np.ones((len(chunks), len(chunks)), dtype=bool)
        said = np.flatnonzero(sizes > 0)
        if len(said):
            covered = self._covered([lists[i] for i in said])
            covers[np.ix_(said, said)] = covered.T
            covers[np.ix_(sizes == 0, sizes > 0)] = False
        np.fill_diagonal(covers, True)
        return covers

    def _covered(self, lists: list[list[str]]) -> np.ndarray:
        """(m, m) bool for chunks with sentences: [b, a] is whether every sentence of b is
        covered by some sentence of a."""
        flat = [s for sentences_ in lists for s in sentences_]
        owner = np.repeat(np.arange(len(lists)), [len(s) for s in lists])
        single = np.array([len(s) == 1 for s in lists])[owner]
        vectors = self._vectors(flat)
        said_by = np.zeros((len(flat), len(lists)), dtype=bool)  # sentence s is covered by chunk a
        said_by[np.arange(len(flat)), owner] = True
        for r0 in range(0, len(flat), _BLOCK_ROWS):
            r1 = min(len(flat), r0 + _BLOCK_ROWS)
            near = cross_distances(vectors[r0:r1], vectors) <= self.threshold
            near |= single[r0:r1, None] & single[None, :]  # one-sentence chunks: tokens alone
            for row, column in zip(*np.nonzero(near)):
                s, chunk = r0 + row, owner[column]
                if not said_by[s, chunk]:
                    said_by[s, chunk] = self._covers_sentence(flat[column], flat[s])
        starts = np.cumsum([0] + [len(s) for s in lists[:-1]])
        return np.logical_and.reduceat(said_by, starts, axis=0)

    def _said(self, covering: str, covered: str, distance: float, one_each: bool) -> bool:
        return (one_each or distance <= self.threshold) and self._covers_sentence(covering, covered)

    def _covers_sentence(self, covering: str, covered: str) -> bool:
        if covering == covered:
            return True
        key = (covering, covered)
        if key not in self._verdicts:
            verdicts = self.judge.each_covers(self._sentence(covering), self._sentence(covered))
            self._verdicts[key], self._verdicts[(covered, covering)] = verdicts
        return self._verdicts[key]

    def _sentence(self, text: str) -> Sentence:
        if text not in self._parsed:
            (self._parsed[text],) = self.judge.sentences([text], [self._encoded[text].states])
        return self._parsed[text]

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        return np.vstack([self._encoded[t].vector for t in texts])


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
