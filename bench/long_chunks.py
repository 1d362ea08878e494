"""Long chunks as users' splitters make them, in pairs that must or must not merge.

The corpus is the Python 3.11 documentation's reStructuredText sources
(Debian's `python3.11-doc`, PSF licence), cut the way LangChain's
RecursiveCharacterTextSplitter cuts (paragraphs, then lines, then words;
200 characters of overlap) at 1,000, 2,000 and 4,000 characters, the sizes
LangChain's and LlamaIndex's splitters make by default. Each pair is one
request at default settings (model mode), and a kind of pair says what the
answer must be:

* tail: the same first half, a different second half -> apart
* middle: one inner paragraph (15-35 % in) replaced by another -> apart
* contained: B is A without one inner paragraph, B sent first, equal scores
  -> merged, A kept
* neighbours: consecutive chunks with 200 characters of overlap -> apart
* cosmetic: A re-wrapped at another width, with contractions -> merged

Thresholds are tuned on the library reference (`library/`) and judged on
the rest of the documentation (tutorial, reference, how-tos, C API, ...).
"""

from __future__ import annotations

import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
SIZES = (1000, 2000, 4000)
OVERLAP = 200
KINDS = ("tail", "middle", "contained", "neighbours", "cosmetic")
EXPECT_MERGED = {"tail": False, "middle": False, "contained": True, "neighbours": False, "cosmetic": True}
CONTRACTIONS = {
    "do not": "don't", "does not": "doesn't", "is not": "isn't", "are not": "aren't",
    "cannot": "can't", "it is": "it's", "you will": "you'll", "will not": "won't",
    "that is": "that's", "there is": "there's", "we will": "we'll", "you are": "you're",
}


@dataclass(frozen=True)
class Pair:
    kind: str
    first: str  # sent first
    second: str
    keep: str | None = None  # for "contained": the chunk that must survive


def documents(split: str) -> list[str]:
    """The corpus's documents of one split ("tune": library/, "eval": the rest), lightly cleaned."""
    if not DOCS.is_dir():
        raise SystemExit(f"{DOCS} is missing: apt-get install python3.11-doc")
    paths = sorted(DOCS.rglob("*.rst.txt"))
    chosen = [p for p in paths if (p.relative_to(DOCS).parts[0] == "library") == (split == "tune")]
    return [_clean(p.read_text(encoding="utf-8", errors="replace")) for p in chosen]


def _clean(text: str) -> str:
    """Roles (:func:`len`) become their text; labels and index directives go."""
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"^\.\. (?:_[^:]+:|index::.*|highlight::.*)$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_recursive(text: str, size: int, overlap: int = OVERLAP, separators=("\n\n", "\n", " ", "")) -> list[str]:
    """Chunks of at most `size` characters, cut at the first separator that makes pieces
    small enough, neighbours sharing up to `overlap` characters (as LangChain's splitter)."""
    separator = next((s for s in separators if s == "" or s in text), "")
    pieces = text.split(separator) if separator else list(text)
    chunks: list[str] = []
    window: list[str] = []
    for piece in pieces:
        if len(piece) > size:
            if window:
                chunks.append(separator.join(window))
                window = []
            chunks.extend(split_recursive(piece, size, overlap, separators[separators.index(separator) + 1 :]))
            continue
        if window and len(separator.join(window + [piece])) > size:
            chunks.append(separator.join(window))
            while window and (len(separator.join(window)) > overlap or len(separator.join(window + [piece])) > size):
                window.pop(0)  # what stays is the overlap with the next chunk
        window.append(piece)
    if window:
        chunks.append(separator.join(window))
    return [c.strip() for c in chunks if c.strip()]


def pairs(split: str, per_kind: int = 50, seed: int = 0) -> list[Pair]:
    """`per_kind` pairs of each kind from one split, chosen at random (seeded)."""
    rng = random.Random(seed)
    docs = documents(split)
    chunked = [(size, split_recursive(doc, size)) for doc in docs for size in SIZES]
    candidates = [(size, chunks, k) for size, chunks in chunked for k, c in enumerate(chunks) if len(c) >= 0.6 * size]
    rng.shuffle(candidates)
    others = [p for _, chunks in chunked for c in chunks for p in _paragraphs(c) if len(p) >= 150]
    made: dict[str, list[Pair]] = {kind: [] for kind in KINDS}
    for size, chunks, k in candidates:
        a = chunks[k]
        for kind in KINDS:
            if len(made[kind]) < per_kind and (pair := _make(kind, a, chunks, k, others, rng)):
                made[kind].append(pair)
        if all(len(v) == per_kind for v in made.values()):
            break
    return [p for kind in KINDS for p in made[kind]]


def _make(kind: str, a: str, chunks: list[str], k: int, others: list[str], rng: random.Random) -> Pair | None:
    paragraphs = _paragraphs(a)
    if kind == "neighbours":
        return Pair(kind, a, chunks[k + 1]) if k + 1 < len(chunks) else None
    if kind == "cosmetic":
        b = _contract(_rewrap(a, rng.choice((60, 100))))
        return Pair(kind, a, b) if b != a else None
    if kind == "tail":
        half = _boundary_near(a, 0.5)
        other = rng.choice(others)
        return Pair(kind, a, a[:half] + "\n\n" + other) if half else None
    inner = _inner_paragraph(a, paragraphs)
    if inner is None:
        return None
    start, end = inner
    if kind == "middle":
        return Pair(kind, a, a[:start] + rng.choice(others) + "\n\n" + a[end:])
    b = (a[:start] + a[end:]).replace("\n\n\n\n", "\n\n")
    return Pair(kind, b, a, keep=a)  # contained: the smaller one first


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _inner_paragraph(text: str, paragraphs: list[str]) -> tuple[int, int] | None:
    """(start, end) of a paragraph of 100+ characters starting 15-35 % into the text that
    no other part of the text restates (else removing it would lose nothing)."""
    position = 0
    for p in paragraphs:
        start = text.index(p, position)
        position = start + len(p)
        inner = 0.15 <= start / len(text) <= 0.35 and len(p) >= 100 and start > 0 and position < len(text)
        if inner and not _restated(p, text[:start] + text[position:]):
            return start, position + 2
    return None


def _restated(paragraph: str, rest: str) -> bool:
    """Whether a sentence of `paragraph` shares half its words with one of `rest`."""
    def sentences(text: str) -> list[set[str]]:
        return [set(re.findall(r"\w+", s.lower())) for s in re.split(r"(?<=[.!?:])\s+|\n\n", text)]

    others = [s for s in sentences(rest) if s]
    return any(
        len(mine & other) >= 0.5 * len(mine | other) for mine in sentences(paragraph) if mine for other in others
    )


def _boundary_near(text: str, fraction: float) -> int | None:
    cuts = [m.start() for m in re.finditer(r"\n\n", text)]
    if not cuts:
        return None
    best = min(cuts, key=lambda c: abs(c - fraction * len(text)))
    return best if 0.3 <= best / len(text) <= 0.7 else None


def _rewrap(text: str, width: int) -> str:
    """Prose paragraphs re-flowed to `width`; code, lists and directives left alone."""
    out = []
    for p in text.split("\n\n"):
        lines = p.split("\n")
        structured = any(re.match(r"\s|[-*|.=#>^~\"'`+]|\d+\.", line) for line in lines)
        out.append(p if structured else textwrap.fill(" ".join(lines), width))
    return "\n\n".join(out)


def _contract(text: str) -> str:
    for long, short in CONTRACTIONS.items():
        text = re.sub(rf"\b{long}\b", short, text)
    return text


def outcomes(pair_list: list[Pair], model, defaults, offload, cache, **fields) -> dict[str, float]:
    """Per kind, the share of pairs with the right answer (for "contained": merged and the
    containing chunk kept)."""
    from pipeline.runner import drain, run
    from pipeline.types import Chunk, DedupeRequest

    right: dict[str, list[bool]] = {kind: [] for kind in KINDS}
    for pair in pair_list:
        request = DedupeRequest(chunks=(Chunk(id="1", text=pair.first), Chunk(id="2", text=pair.second)), **fields)
        result = drain(run(request, model, defaults, offload, cache=cache))
        merged = result.cluster_count == 1
        ok = merged == EXPECT_MERGED[pair.kind]
        if pair.keep is not None:
            ok = ok and result.chunks[0].text == pair.keep
        right[pair.kind].append(ok)
    return {kind: sum(v) / len(v) for kind, v in right.items() if v}
