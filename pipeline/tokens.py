"""Token-level coverage: does one sentence say everything another says?

Sentence vectors summarise, so "filed for bankruptcy in July 2002, citing massive
accounting irregularities" sits within any useful threshold of "filed for
bankruptcy in July, 2002." The model's own token states (what its forward pass
computes before pooling them into the sentence vector) tell the two apart: every
token of the shorter sentence has a close counterpart in the longer one, but
"citing massive accounting irregularities" has none in the shorter.

A token of sentence B is *said* by sentence A when A has the same token, or a
token whose state is within `match` cosine similarity of it among the tokens of A
that B does not have itself and that are not light ("a", "the", "of"). A word
both have is accounted for by its twin; letting it also stand for a neighbour
whose meaning its context has absorbed is how "set the first day of the week to
Sunday (6) or to any other weekday" passed for the same sentence less "to
Sunday": "weekday", in both, matched the dropped "Sunday" (0.84). The tokens A
leaves unsaid weigh by their idf (`bench/token_weights.py`: "the" and "." nearly
nothing, names and rare words most; punctuation nothing). A *covers* B when

* every number in B is in A (as the number guard reads numbers),
* what A leaves unsaid of B weighs at most `budget` content words,
* and no more than what B leaves unsaid of A, plus `margin`: of two sentences
  that each miss a word of the other (a paraphrase), each covers the other; of a
  sentence and the same sentence less a name or a clause, only the fuller one;
* and what A says beyond B weighs at most `extra` content words. A sentence
  that adds a whole clause of its own ("..., as policymakers waited for clearer
  evidence that spending was slowing") makes a statement of its own: people do
  not call the pair the same sentence, and keeping both loses nothing.

Every similarity is exact integer arithmetic (`pipeline.embed.quantised_states`),
so the answer is the same on every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .embed import STATE_SCALE, Embedder
from .guards import numbers_in
from .profiles import TokenProfile

DATA = Path(__file__).with_name("data")
WEIGHT_UNIT = 1000  # a content word weighs this much (integers: sums are exact)
CONTENT_WEIGHT = WEIGHT_UNIT // 4  # lighter tokens ("is", "a", "of") are not listed as unsaid nor say another
_WORD = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Sentence:
    """What token coverage needs of one sentence: its tokens' ids, quantised states and
    weights, and its numbers."""

    ids: np.ndarray  # (t,) int64
    states: np.ndarray  # (t, d) int16, rows unit length x STATE_SCALE
    weights: np.ndarray  # (t,) int64, WEIGHT_UNIT for a full content word
    numbers: frozenset[str]


class TokenJudge:
    """Token coverage for one model: its vocabulary's weights and the calibrated profile."""

    def __init__(self, embedder: Embedder, profile: TokenProfile):
        self.embedder, self.profile = embedder, profile
        self._match = profile.match * float(STATE_SCALE) ** 2  # on the integer similarity scale
        self._budget = round(profile.budget * WEIGHT_UNIT)
        self._margin = round(profile.margin * WEIGHT_UNIT)
        self._extra = round(profile.extra * WEIGHT_UNIT)

    def sentences(self, texts: Sequence[str], states: Sequence[np.ndarray]) -> list[Sentence]:
        """Each text (with its token states from `Embedder.encode`) ready to compare."""
        out = []
        for text, ids, text_states in zip(texts, self.embedder.token_ids(texts), states):
            ids = np.asarray(ids[: len(text_states)], dtype=np.int64)
            weights = token_weights(self.embedder, self.profile.idf_scale)[ids]  # (loads the model: in a stage)
            out.append(Sentence(ids, text_states, weights, numbers_in(text)))
        return out

    def unsaid(self, said: Sentence, by: Sentence) -> np.ndarray:
        """(t,) bool over `said`'s tokens: which ones `by` has no counterpart for."""
        if not len(said.ids):
            return np.zeros(0, dtype=bool)
        missing = ~np.isin(said.ids, by.ids)
        # `by`'s tokens that `said` has no twin of, light ones aside: "a" or "the" takes on its
        # neighbours' meaning ("an air plane" / "a plane": "a" is 0.56 similar to "air") but says nothing
        unshared = ~np.isin(by.ids, said.ids) & (by.weights >= CONTENT_WEIGHT)
        if missing.any() and unshared.any():
            similarities = said.states[missing].astype(np.float64) @ by.states[unshared].T.astype(np.float64)
            missing[missing] = similarities.max(axis=1) < self._match
        return missing

    def each_covers(self, a: Sentence, b: Sentence) -> tuple[bool, bool]:
        """(whether `a` covers `b`, whether `b` covers `a`): each says everything the other
        says, and little besides (see the module docstring). Both verdicts rest on the same
        two comparisons, so a pair is compared once each way, whichever is asked."""
        numbers_of_b_in_a, numbers_of_a_in_b = b.numbers <= a.numbers, a.numbers <= b.numbers
        if not (numbers_of_b_in_a or numbers_of_a_in_b):
            return False, False
        unsaid_of_a = int(a.weights[self.unsaid(a, b)].sum())  # what `a` says that `b` does not
        unsaid_of_b = int(b.weights[self.unsaid(b, a)].sum())
        return (
            numbers_of_b_in_a and self._restates(unsaid_of_a, unsaid_of_b),
            numbers_of_a_in_b and self._restates(unsaid_of_b, unsaid_of_a),
        )

    def _restates(self, adds: int, leaves: int) -> bool:
        """Whether a sentence that says `adds` beyond another and leaves `leaves` of it unsaid
        covers it: little added, little left, and no more left than added plus the margin."""
        return adds <= self._extra and leaves <= min(self._budget, adds + self._margin)

    def unsaid_words(self, text: str, said: Sentence, by: Sentence, limit: int = 20) -> list[str]:
        """The words of `text` (the sentence `said`) that `by` leaves unsaid, content words
        only (weighing at least CONTENT_WEIGHT), in order, at most `limit` (what explain shows)."""
        spans = self.embedder.token_spans([text])[0][: len(said.ids)]
        missing = self.unsaid(said, by) & (said.weights >= CONTENT_WEIGHT)
        words: list[tuple[int, int]] = []
        for (start, end), gone in zip(spans, missing):
            if gone:
                word = _whole_word(text, start, end)  # a word piece shows as its word
                if not words or word != words[-1]:
                    words.append(word)
        return [text[start:end] for start, end in words[:limit]]


def _whole_word(text: str, start: int, end: int) -> tuple[int, int]:
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return start, end


_WEIGHTS: dict[tuple[str, float], np.ndarray] = {}  # per model and scale: built once per process


def token_weights(embedder: Embedder, idf_scale: float) -> np.ndarray:
    """(vocabulary,) int64: each token's weight, WEIGHT_UNIT at most. From the model's idf
    table (`bench/token_weights.py`) where there is one, else every word token weighs
    WEIGHT_UNIT; a token with no letter or digit (punctuation) weighs nothing."""
    key = (embedder.name, idf_scale)
    if key not in _WEIGHTS:
        vocabulary = embedder.vocabulary()
        table = DATA / f"idf-{embedder.name.split('/')[-1]}.npy"
        if table.is_file():
            idf = np.load(table).astype(np.float64) / 1000
            weights = np.minimum(WEIGHT_UNIT, np.floor(idf / idf_scale * WEIGHT_UNIT)).astype(np.int64)
        else:
            weights = np.full(len(vocabulary), WEIGHT_UNIT, dtype=np.int64)
        is_word = np.fromiter((bool(_WORD.search(t)) for t in vocabulary), dtype=bool, count=len(vocabulary))
        _WEIGHTS[key] = np.where(is_word, weights, 0)
    return _WEIGHTS[key]
