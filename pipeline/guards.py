"""The number guard: texts that disagree on a number are not duplicates.

"Revenue rose 3%" and "Revenue rose 5%" embed almost identically, so no
cosine threshold separates them. When each of two texts contains a number the
other lacks, the pair is set to distance 2 before linkage, whatever the
vectors say. A text with no numbers, or whose numbers the other text also has,
is unaffected, so "3" vs "three" or an added date do not split true
duplicates.

Numbers are written with digits: number words ("three") and units are left
alone, because words like "one" are often pronouns and a unit change ("5 km" /
"5 miles") is rare next to paraphrase noise.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Sequence

import numpy as np
from scipy import sparse

from .distance import MAX_DISTANCE, float32_cutoff

# A sign counts only where it is not a hyphen inside a word or a range ("2-3");
# digits glued to a word ("covid19", "v1.2") are names, not quantities.
_NUMBER = re.compile(
    r"(?<![\w.,])([-+\u2212]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?!\d)"
)
_BLOCK_ROWS = 1024


def numbers_in(text: str) -> frozenset[str]:
    """Canonical forms of the numbers in `text`: "3", "3.0" -> "3"; "3,000" -> "3000"; "-5" -> "-5"."""
    found = set()
    for sign, literal in _NUMBER.findall(text):
        value = Decimal(literal.replace(",", "")).normalize()
        if value != 0 and sign in ("-", "\u2212"):
            value = -value
        found.add(format(value, "f"))
    return frozenset(found)


def apply_number_guard(distances: np.ndarray, texts: Sequence[str], threshold: float) -> int:
    """Set every guarded pair's distance to 2, in place; return how many it separated.

    A pair counts as separated when its distance was within `threshold`
    (a merge the guard prevented).
    """
    return NumberGuard(texts).apply(distances, threshold)


class NumberGuard:
    """The guard over one list of texts, parsed once: for dense distance
    matrices (`apply`, `mask`) and for lists of pairs (`separates`)."""

    name = "numbers"

    name = "numbers"

    def __init__(self, texts: Sequence[str]):
        sets = [numbers_in(t) for t in texts]
        numbered = [i for i, s in enumerate(sets) if s]
        self._row = np.full(len(texts), -1, dtype=np.int64)  # text -> incidence row; -1: no numbers
        self._row[numbered] = np.arange(len(numbered))
        self._incidence = _incidence([sets[i] for i in numbered])
        self._counts = np.asarray(self._incidence.sum(axis=1)).ravel()

    def separates(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(e,) bool: whether the guard separates texts first[k] and second[k]."""
        a, b = self._row[first], self._row[second]
        both = (a >= 0) & (b >= 0)
        a, b = a[both], b[both]
        shared = np.asarray(self._incidence[a].multiply(self._incidence[b]).sum(axis=1)).ravel()
        both[both] = (self._counts[a] > shared) & (self._counts[b] > shared)
        return both

    def apply(self, distances: np.ndarray, threshold: float, index: np.ndarray | None = None) -> int:
        """Set guarded pairs of `distances` to 2, in place; return how many were within threshold.

        `distances`: (m, m) over the texts `index` (default: all, in order).
        """
        index = np.arange(len(distances)) if index is None else np.asarray(index)
        cutoff = float32_cutoff(threshold)
        separated = 0
        for rows, cols, guarded in self._blocks(index):
            cells = np.ix_(rows, cols)
            current = distances[cells]
            separated += int(np.count_nonzero(guarded & (current <= cutoff)))
            distances[cells] = np.where(guarded, MAX_DISTANCE, current)
        return separated // 2  # each pair was seen from both sides

    def mask(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(len(rows), len(cols)) bool: whether the guard separates texts rows[i] and cols[j]."""
        out = np.zeros((len(rows), len(cols)), dtype=bool)
        a, b = self._row[rows], self._row[cols]
        local_rows, local_cols = np.flatnonzero(a >= 0), np.flatnonzero(b >= 0)
        if len(local_rows) and len(local_cols):
            left, right = self._incidence[a[local_rows]], self._incidence[b[local_cols]]
            shared = (left @ right.T).toarray()
            counts_left, counts_right = self._counts[a[local_rows]], self._counts[b[local_cols]]
            guarded = (counts_left[:, None] > shared) & (counts_right[None, :] > shared)
            out[np.ix_(local_rows, local_cols)] = guarded
        return out

    def count_separated(self) -> int:
        """How many pairs of all the texts the guard separates (threshold 2: every pair is within it)."""
        blocks = self._blocks(np.arange(len(self._row)))
        return sum(int(np.count_nonzero(guarded)) for _, _, guarded in blocks) // 2

    def _blocks(self, index: np.ndarray):
        """Yield (rows, cols, guarded): positions into `index` of texts with numbers, in row
        blocks, and their (rows, cols) guarded mask; memory O(block · m)."""
        local = np.flatnonzero(self._row[index] >= 0)
        if len(local) < 2:
            return
        incidence = self._incidence[self._row[index[local]]]
        counts = self._counts[self._row[index[local]]]
        for start in range(0, len(local), _BLOCK_ROWS):
            block = slice(start, start + _BLOCK_ROWS)
            shared = (incidence[block] @ incidence.T).toarray()
            guarded = (counts[block, None] > shared) & (counts[None, :] > shared)
            yield local[block], local, guarded


def _incidence(sets: list[frozenset[str]]) -> sparse.csr_matrix:
    """(texts, distinct numbers) 0/1 matrix."""
    vocabulary: dict[str, int] = {}
    rows, cols = [], []
    for row, numbers in enumerate(sets):
        for number in sorted(numbers):
            rows.append(row)
            cols.append(vocabulary.setdefault(number, len(vocabulary)))
    data = np.ones(len(rows), dtype=np.int32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(sets), len(vocabulary)))
