"""Sentence pairs that test "nothing lost below the sentence", one request each.

Kinds, each with the answer it must get:

* clause, name, figure: a sentence from the Python documentation (the corpus of
  `long_chunks`) and the same sentence with one piece removed: a comma-bounded
  clause or a parenthesis, a capitalised or code name, or a number with its
  unit. Either apart, or merged with the fuller one kept; the shorter is sent
  with the higher score, so a merge that keeps it has lost the piece.
* paraphrase: STS-B pairs people scored >= 4.0 (train for "tune", dev for
  "eval"): merged.
* neighbours: consecutive sentences of one document: apart.

"tune" takes the library reference and STS-B train, "eval" the rest of the
documentation and STS-B dev, as `long_chunks` splits the corpus.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.segment import units

from . import long_chunks

KINDS = ("clause", "name", "figure", "paraphrase", "neighbours")
DROPS = ("clause", "name", "figure")
_PARENTHESIS = re.compile(r"\s*\([^()]{3,}\)")
_COMMA_PART = re.compile(r",[^,;:.]{8,}(?=[,.;:])")
_FIGURE = re.compile(
    r"\s*\b(?:about |over |up to |at least |version )?\d+(?:[.,]\d+)*"
    r"(?:\s*(?:%|percent|bytes?|seconds?|times|characters|items|bits|digits|elements|arguments)\b)?"
)
_NAME = re.compile(r"(?<=\s)(?:[A-Z][a-z]+|[A-Za-z_]+\(\)|[a-z]+_[a-z_]+)(?=[\s,.])")
_PATTERNS = (("clause", _PARENTHESIS), ("clause", _COMMA_PART), ("figure", _FIGURE), ("name", _NAME))


@dataclass(frozen=True)
class Pair:
    kind: str
    fuller: str
    other: str


def pairs(split: str, per_kind: int, stsb: Path, seed: int = 0) -> list[Pair]:
    """`per_kind` pairs of each kind from one split (seeded)."""
    rng = random.Random(seed)
    documents = [[" ".join(doc[a:b].split()) for a, b in units(doc)] for doc in long_chunks.documents(split)]
    prose = [s for sentences in documents for s in sentences if _is_prose(s)]
    rng.shuffle(prose)
    made: dict[str, list[Pair]] = {kind: [] for kind in KINDS}
    for sentence in prose:
        options = _drops(sentence)
        rng.shuffle(options)
        for kind, shorter in options:
            if len(made[kind]) < per_kind:
                made[kind].append(Pair(kind, sentence, shorter))
                break
        if all(len(made[kind]) >= per_kind for kind in DROPS):
            break
    neighbours = [Pair("neighbours", a, b) for s in documents for a, b in zip(s, s[1:]) if _is_prose(a) and _is_prose(b)]
    made["neighbours"] = rng.sample(neighbours, min(per_kind, len(neighbours)))
    paraphrases = _paraphrases(stsb / f"sts-{'train' if split == 'tune' else 'dev'}.csv")
    made["paraphrase"] = rng.sample(paraphrases, min(per_kind, len(paraphrases)))
    return [p for kind in KINDS for p in made[kind]]


def _is_prose(sentence: str) -> bool:
    """A plain sentence of 8-45 words (no markup, code or table)."""
    words = sentence.split()
    return (8 <= len(words) <= 45 and sentence[0].isupper() and sentence.endswith(".")
            and not re.search(r"[`*=|>_]|::|\.\.", sentence))


def _drops(sentence: str) -> list[tuple[str, str]]:
    """(kind, the sentence less one piece) for each piece that may go."""
    found = []
    for kind, pattern in _PATTERNS:
        for match in pattern.finditer(sentence):
            piece = match.group()
            if match.start() == 0 or len(piece.split()) > 0.5 * len(sentence.split()):
                continue
            if kind == "name" and re.search(r"[.!?:]\s*$", sentence[: match.start()]):
                continue  # a capital after a sentence's end starts a sentence: not a name
            shorter = sentence[: match.start()] + sentence[match.end() :]
            shorter = re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", shorter)).strip()
            if _words(piece) <= _words(shorter):
                continue  # every word of the piece is said elsewhere: nothing was removed
            if len(shorter.split()) >= 6:
                found.append((kind, shorter))
    return found


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _paraphrases(path: Path) -> list[Pair]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [Pair("paraphrase", row[5], row[6]) for row in rows if float(row[4]) >= 4.0]


def outcomes(pair_list: list[Pair], model, defaults, **fields) -> dict[str, tuple[float, float, float]]:
    """Per kind: the shares merged, merged with the fuller sentence kept, and apart. The
    shorter (or, for the other kinds, the second) sentence is sent first, with the higher score."""
    from pipeline.runner import drain, run
    from pipeline.types import Chunk, DedupeRequest

    counts: dict[str, list[tuple[bool, bool]]] = {kind: [] for kind in KINDS}
    for pair in pair_list:
        chunks = (Chunk(id="other", text=pair.other, score=0.9), Chunk(id="fuller", text=pair.fuller, score=0.5))
        result = drain(run(DedupeRequest(chunks=chunks, **fields), model, defaults))
        merged = result.cluster_count == 1
        counts[pair.kind].append((merged, merged and result.chunks[0].id == "fuller"))
    return {
        kind: (sum(m for m, _ in v) / len(v), sum(f for _, f in v) / len(v), sum(not m for m, _ in v) / len(v))
        for kind, v in counts.items() if v
    }
