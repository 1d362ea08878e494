"""Cutting chunks into sentences, and long texts into model windows.

Real chunks are 1,000-4,000 characters; the model reads 256 tokens. Two
things need a chunk's parts: embedding (every token must count, so a long
text is embedded window by window) and the coverage guard (a chunk may only
replace another that says nothing more, sentence by sentence).

A *unit* is a sentence of prose, or one line of structured text (a list
item, a heading, a table row, a line of code). Prose lines are joined before
sentences are found, so re-wrapping a paragraph changes no unit. Units are
spans of the original text, so a window is a substring of its chunk.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

Span = tuple[int, int]

# A sentence ends at . ! or ? (closing quotes/brackets allowed) before white space and
# a capital, digit, quote or bracket: "e.g. the" and "3.5 m" do not end one.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|cf|al|approx|Fig|Figs|No|Nos|Vol|Sec|pp"  # references
    r"|Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|Mt|Ft|Gen|Lt|Col|Maj|Capt|Sgt|Adm|Brig|Gov|Sen|Rep|Rev|Hon|Pres"  # titles
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"  # months
    r"|Inc|Corp|Co|Ltd|Bros|Dept|Univ|Ave|Blvd"  # names of companies and places
    r"|Ala|Ariz|Ark|Calif|Colo|Conn|Fla|Ga|Ill|Kan|Ky|Md|Mass|Mich|Minn|Mo|Neb|Nev|Okla|Ore|Pa|Tenn|Tex|Va|Vt|Wis)"
    r"|\b[A-Z]|\b[a-z]\.[a-z])\.$"  # initials: "J. Smith", "U.S.", "3 p.m."
)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_STRUCTURED_LINE = re.compile(  # (matched at a line's start)
    r"(?:\s*(?:[-*+\u2022]|\d{1,3}[.)])\s|\s*#{1,6}\s|\s*\||\s*[=\-~^\"'`#*+]{3,}\s*$|\t| {4}|\s*```)"
)
MIN_UNIT_CHARS = 24  # shorter pieces ("Note:", "Example") join their neighbour in the paragraph
# Anchors: one unit in ANCHOR_EVERY (by its words) may start a block of windows, once
# the block before holds MIN_BLOCK_FRACTION of a window. Small blocks share more of
# an overlap; on the Python docs cut at 4,000 characters with 50 % overlap, 39 % of a
# chunk's tokens are in windows of its neighbour (46 % is all they share), and the
# model reads short inputs as fast per token once batches are grouped by tokens.
ANCHOR_EVERY = 2
MIN_BLOCK_FRACTION = 0.1


def units(text: str) -> list[Span]:
    """The text's sentences and structured lines, as (start, end) spans in order.

    Linear in the text's length, whatever it holds (code, tables, one
    200,000-character line): the patterns cannot backtrack far.
    """
    pieces: list[Span] = []
    for start, end in _paragraphs(text):
        lines = _line_spans(text, start, end)
        if any(_STRUCTURED_LINE.match(text, a, b) for a, b in lines):
            found = [_strip(text, a, b) for a, b in lines]
        else:
            found = _sentences(text, start, end)
        pieces.extend(_join_short([(a, b) for a, b in found if b > a]))
    return pieces


def windows(text: str, tokens: Sequence[Span], limit: int) -> list[tuple[Span, int]]:
    """Consecutive spans of text with at most `limit` tokens each, cut at unit ends where
    possible, and their token counts. `tokens`: the text's tokens as character spans
    (as the model's tokenizer finds them, without its special tokens). A text of at
    most `limit` tokens is one window: the whole text, exactly.

    Windows are packed block by block, and a block starts at an *anchor*: a unit
    chosen by its own words (`_is_anchor`), not by its place in the text. So two
    chunks that share a run of text (neighbours cut with overlap, a passage quoted
    in both) cut it into the same windows past its first anchor, and a window seen
    before is not embedded again.
    """
    if len(tokens) <= limit:
        return [((0, len(text)), len(tokens))]
    spans = units(text)
    starts = np.fromiter((a for a, _ in tokens), dtype=np.int64, count=len(tokens))
    ends = np.searchsorted(starts, [a for a, _ in spans[1:]] + [len(text)]).tolist()
    ranges: list[tuple[int, int]] = []  # token ranges of the windows
    block: list[int] = []  # unit ends (token indices) of the block being gathered
    first = 0  # the block's first token
    for end, (a, b) in zip(ends[:-1], spans[1:]):  # end: where the unit a..b starts
        block.append(end)
        if end - first >= MIN_BLOCK_FRACTION * limit and _is_anchor(text[a:b]):
            ranges.extend(_pack(tokens, first, block, limit))
            first, block = end, []
    ranges.extend(_pack(tokens, first, block + ends[-1:], limit))
    return [((tokens[a][0], tokens[b - 1][1]), b - a) for a, b in ranges]


def _is_anchor(unit: str) -> bool:
    """Whether a block starts at this unit: a hash of its words (white space ignored,
    so re-wrapping moves no anchor), the same on every machine."""
    return zlib.crc32(" ".join(unit.split()).encode()) % ANCHOR_EVERY == 0


def _pack(tokens: Sequence[Span], first: int, unit_ends: list[int], limit: int) -> list[tuple[int, int]]:
    """Token ranges of at most `limit` from token `first`, filled greedily with whole units
    (a unit too long for one window is cut at word starts)."""
    ranges: list[tuple[int, int]] = []
    last = first  # the window being filled: tokens first..last
    for end in unit_ends:
        if end - last > limit:
            if last > first:
                ranges.append((first, last))
            ranges.extend(_cut(tokens, last, end, limit))
            first = last = end
        elif end - first > limit:
            ranges.append((first, last))
            first, last = last, end
        else:
            last = end
    if last > first:
        ranges.append((first, last))
    return ranges


def _cut(tokens: Sequence[Span], first: int, end: int, limit: int) -> list[tuple[int, int]]:
    """Token ranges of at most `limit` covering first..end, each ending before a word
    start (a token after white space) in its second half where there is one."""
    ranges = []
    while end - first > limit:
        cut = first + limit
        while cut > first + limit // 2 and tokens[cut][0] == tokens[cut - 1][1]:
            cut -= 1
        if cut == first + limit // 2:
            cut = first + limit
        ranges.append((first, cut))
        first = cut
    ranges.append((first, end))
    return ranges


def _paragraphs(text: str) -> list[Span]:
    spans, start = [], 0
    for gap in _PARAGRAPH.finditer(text):
        spans.append((start, gap.start()))
        start = gap.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _line_spans(text: str, start: int, end: int) -> list[Span]:
    """The lines of text[start:end], unstripped (indentation marks code)."""
    spans, line_start = [], start
    while line_start < end:
        line_end = text.find("\n", line_start, end)
        line_end = end if line_end < 0 else line_end
        spans.append((line_start, line_end))
        line_start = line_end + 1
    return spans


def _sentences(text: str, start: int, end: int) -> list[Span]:
    spans, sentence_start = [], start
    for boundary in _SENTENCE_END.finditer(text, start, end):
        stop = boundary.start() + 1
        while stop < boundary.end() and not text[stop].isspace():
            stop += 1  # keep closing quotes and brackets
        if _ABBREVIATION.search(text, max(sentence_start, stop - 8), stop):
            continue
        spans.append((sentence_start, stop))
        sentence_start = boundary.end()
    spans.append((sentence_start, end))
    return [(a, b) for a, b in (_strip(text, a, b) for a, b in spans) if b > a]


def _join_short(pieces: list[Span]) -> list[Span]:
    """Merge pieces under MIN_UNIT_CHARS into the next one (the last into the previous),
    within one paragraph: a unit never spans two, so removing a paragraph leaves the
    others' units as they were."""
    out: list[Span] = []
    pending: int | None = None  # start of short pieces waiting for the next one
    for a, b in pieces:
        if pending is not None:
            a, pending = pending, None
        if b - a < MIN_UNIT_CHARS:
            pending = a
            continue
        out.append((a, b))
    if pending is not None:
        last_end = pieces[-1][1]
        if out:
            out[-1] = (out[-1][0], last_end)
        else:
            out.append((pending, last_end))
    return out


def _strip(text: str, a: int, b: int) -> Span:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b
