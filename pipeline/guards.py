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

from .cluster import MAX_DISTANCE

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
    (a merge the guard prevented). Vectorised in row blocks so memory stays
    O(block · n) beyond the distance matrix itself.
    """
    sets = [numbers_in(t) for t in texts]
    numbered = np.flatnonzero([bool(s) for s in sets])
    if len(numbered) < 2:
        return 0
    incidence = _incidence([sets[i] for i in numbered])
    counts = np.asarray(incidence.sum(axis=1)).ravel()
    separated = 0
    for start in range(0, len(numbered), _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        shared = (incidence[rows] @ incidence.T).toarray()
        guarded = (counts[rows, None] > shared) & (counts[None, :] > shared)
        block = np.ix_(numbered[rows], numbered)
        current = distances[block]
        separated += int(np.count_nonzero(guarded & (current <= threshold)))
        distances[block] = np.where(guarded, MAX_DISTANCE, current)
    return separated // 2  # each pair was seen from both sides


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
