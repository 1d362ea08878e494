"""Whole chunks: long texts read window by window, the coverage guard, the kept chunk
covering what it replaces. Chunks are real technical prose of 1,000-3,000 characters:
the docstrings of standard-library modules (shipped with every Python)."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shelve
import textwrap
import time

import numpy as np
import pytest

from pipeline.coverage import covering_split
from pipeline.cache import EmbeddingCache
from pipeline.embed import l2_normalise
from pipeline.runner import drain, run
from pipeline.vectors import combine_windows, plan_windows
from pipeline.segment import units, windows
from pipeline.types import Chunk, DedupeRequest, Result, StageEvent

from .test_api import post, stream
from .test_runner import CountingModel

ARGPARSE = argparse.__doc__.strip()
OTHER_PARAGRAPHS = [p for doc in (csv.__doc__, shelve.__doc__, json.__doc__) for p in doc.split("\n\n") if len(p) > 200]


def paragraphs(text: str) -> list[str]:
    return text.split("\n\n")


def without_paragraph(text: str, index: int) -> str:
    parts = paragraphs(text)
    return "\n\n".join(parts[:index] + parts[index + 1 :])


def with_paragraph(text: str, index: int, replacement: str) -> str:
    parts = paragraphs(text)
    return "\n\n".join(parts[:index] + [replacement] + parts[index + 1 :])


def cosmetic(text: str) -> str:
    """Prose re-wrapped at another width, with contractions; code and lists left alone."""
    out = []
    for part in paragraphs(text):
        lines = part.split("\n")
        out.append(part if any(re.match(r"\s|[-*>]", line) for line in lines) else textwrap.fill(" ".join(lines), 60))
    return re.sub(r"\bdo not\b", "don't", re.sub(r"\bit is\b", "it's", "\n\n".join(out)))


def dedupe(embedder, texts, scores=None, **fields) -> Result:
    scores = scores or [0] * len(texts)
    chunks = tuple(Chunk(id=str(i), text=t, score=s) for i, (t, s) in enumerate(zip(texts, scores)))
    return drain(run(DedupeRequest(chunks=chunks, **fields), embedder))


def test_the_chunks_are_as_long_as_users_send():
    assert 2500 < len(ARGPARSE) < 3500 and len(paragraphs(ARGPARSE)) >= 6
    assert len(OTHER_PARAGRAPHS) >= 5


# --------------------------------------------------------------------------- units and windows


def test_units_are_sentences_and_structured_lines_and_survive_rewrapping():
    text = "First sentence here, long enough. Second one, e.g. with an abbreviation inside.\n\n- item one is a list line\n- item two is another line\n\n    code = 1  # indented code line"
    spans = [text[a:b] for a, b in units(text)]
    assert spans == [
        "First sentence here, long enough.", "Second one, e.g. with an abbreviation inside.",
        "- item one is a list line", "- item two is another line", "code = 1  # indented code line",
    ]
    prose = paragraphs(ARGPARSE)[0]
    rewrapped = textwrap.fill(" ".join(prose.split()), 40)
    squash = lambda t, spans: [" ".join(t[a:b].split()) for a, b in spans]  # noqa: E731
    assert squash(prose, units(prose)) == squash(rewrapped, units(rewrapped))


def test_abbreviations_of_news_prose_end_no_sentence():
    """Titles, months, company suffixes, states and "p.m." cut a news sentence in two, and
    each half was then judged alone: a paraphrase saying "Feb. 1" as "on Feb. 1" no longer
    covered it."""
    first = "Shares of PepsiCo Inc. rose on Feb. 3 at 2 p.m. Friday, Brig. Gen. Smith said in Tulsa, Okla. on Monday."
    second = "Sen. Jones and Rep. Brown of Acme Corp. met on Sept. 9 with Gov. Davis and Dr. Lee of the U.S. Army."
    text = first + " " + second
    assert [text[a:b] for a, b in units(text)] == [first, second]


@pytest.mark.parametrize("text", ["x" * 200_000, "word " * 40_000, ". " * 100_000, "a\n" * 100_000])
def test_units_take_time_in_proportion_to_length(text):
    started = time.process_time()
    spans = units(text)
    assert time.process_time() - started < 2.0  # linear: a backtracking pattern would take minutes
    assert all(0 <= a < b <= len(text) for a, b in spans)


def test_windows_cover_every_token_in_order_within_the_limit(embedder):
    text = ARGPARSE + "\n\n" + "\n\n".join(OTHER_PARAGRAPHS) + "\n\n" + "y" * 3000
    tokens = embedder.token_spans([text])[0]
    limit = embedder.window_tokens()
    parts = windows(text, tokens, limit)
    assert len(parts) > 3 and sum(n for _, n in parts) == len(tokens)
    assert all(n <= limit for _, n in parts)
    starts = [a for (a, _), _ in parts]
    assert starts == sorted(starts) and parts[0][0][0] == tokens[0][0] and parts[-1][0][1] == tokens[-1][1]
    for (a, b), n in parts:
        assert embedder.count_tokens([text[a:b]])[0] <= limit
    short = paragraphs(ARGPARSE)[0]
    assert windows(short, embedder.token_spans([short])[0], limit) == [((0, len(short)), len(embedder.token_spans([short])[0]))]


def overlapping_pair() -> tuple[str, str, str]:
    """Two chunks as a splitter with a large overlap cuts them: B starts a third of the
    way into A; returns A, B and the text they share."""
    parts = paragraphs(ARGPARSE + "\n\n" + "\n\n".join(OTHER_PARAGRAPHS))
    third = len(parts) // 3
    return "\n\n".join(parts[: 2 * third]), "\n\n".join(parts[third:]), "\n\n".join(parts[third : 2 * third])


def test_chunks_that_overlap_cut_the_shared_text_into_the_same_windows(embedder):
    """Windows start at anchors chosen by a unit's own words, so past the first anchor
    B cuts the text it shares with A exactly as A does (packing each chunk greedily
    from its start shares almost nothing)."""
    first, second, shared = overlapping_pair()
    plans = dict(zip((first, second), plan_windows([first, second], embedder)))
    assert len(plans[first]) > 6 and len(plans[second]) > 6
    seen = {window for window, _ in plans[first]}
    reused = sum(tokens for window, tokens in plans[second] if window in seen)
    assert reused >= 0.6 * embedder.count_tokens([shared])[0]


def test_an_overlapping_chunk_pays_only_for_windows_not_seen_before(embedder):
    first, second, shared = overlapping_pair()
    cache = EmbeddingCache(64 << 20)
    drain(run(DedupeRequest(chunks=(Chunk(text=first),), guards=()), embedder, cache=cache))
    counting = CountingModel(embedder, 16)
    drain(run(DedupeRequest(chunks=(Chunk(text=second),), guards=()), counting, cache=cache))
    asked = [window for batch in counting.batches for window in batch]
    second_tokens, shared_tokens = embedder.count_tokens([second, shared])
    assert sum(embedder.count_tokens(asked)) <= second_tokens - 0.6 * shared_tokens
    alone = EmbeddingCache(64 << 20)
    drain(run(DedupeRequest(chunks=(Chunk(text=second),), guards=()), embedder, cache=alone))
    # what was cached changes the cost, not the vector
    assert np.array_equal(cache.get_many([second])[second].vector, alone.get_many([second])[second].vector)


def test_rewrapping_moves_no_window_boundary(embedder):
    text = ARGPARSE + "\n\n" + "\n\n".join(OTHER_PARAGRAPHS)
    rewrapped = "\n\n".join(
        textwrap.fill(" ".join(p.split()), 50) if not re.search(r"^\s|^[-*>]", p, re.M) else p
        for p in paragraphs(text)
    )
    assert rewrapped != text
    squash = lambda plan: [" ".join(window.split()) for window, _ in plan]  # noqa: E731
    original, changed = plan_windows([text, rewrapped], embedder)
    assert len(original) > 6 and squash(original) == squash(changed)


def test_a_text_of_one_window_keeps_its_vector_and_a_long_one_counts_every_token(embedder):
    short = paragraphs(ARGPARSE)[0]
    [[(window, _)]] = plan_windows([short], embedder)
    assert window == short
    cache = EmbeddingCache(1 << 20)
    items = list(run(DedupeRequest(chunks=(Chunk(text=short),), guards=()), embedder, cache=cache))
    assert items[1].stats["windows"] == 1  # the embedding stage's final event
    assert np.array_equal(cache.get_many([short])[short].vector, embedder.embed([short])[0])
    plan = plan_windows([ARGPARSE], embedder)[0]
    assert len(plan) >= 3
    vectors = {w: v for w, v in zip([w for w, _ in plan], embedder.embed([w for w, _ in plan]))}
    from pipeline.cache import Embedded

    combined = combine_windows(plan, {w: Embedded(v, 1, n) for (w, n), v in zip(plan, vectors.values())})
    expected = l2_normalise(sum(n * vectors[w].astype(np.float64) for w, n in plan)[None, :])[0]
    assert np.array_equal(combined.vector, expected) and combined.windows == len(plan)
    truncated = embedder.embed([ARGPARSE])[0]  # what the model alone reads: the first 256 tokens
    assert not np.array_equal(combined.vector, truncated)


# --------------------------------------------------------------------------- the coverage guard


def test_same_first_half_different_second_half_stays_apart(embedder):
    half = "\n\n".join(paragraphs(ARGPARSE)[:4])
    other = half + "\n\n" + "\n\n".join(OTHER_PARAGRAPHS[:2])
    assert dedupe(embedder, [ARGPARSE, other]).output_count == 2
    assert dedupe(embedder, [ARGPARSE, other], threshold=1.0).output_count == 2  # whatever the threshold
    assert dedupe(embedder, [ARGPARSE, other], threshold=1.0, guards=()).output_count == 1


@pytest.mark.parametrize("index", [1, 2])
def test_one_paragraph_replaced_stays_apart(embedder, index):
    changed = with_paragraph(ARGPARSE, index, OTHER_PARAGRAPHS[index])
    assert dedupe(embedder, [ARGPARSE, changed]).output_count == 2


@pytest.mark.parametrize("selection", ["score", "centroid", "length", "hybrid"])
@pytest.mark.parametrize("order", ["smaller first", "larger first"])
def test_the_containing_chunk_is_kept_whatever_the_order_scores_or_strategy(embedder, selection, order):
    smaller = without_paragraph(ARGPARSE, 2)
    texts, scores = ([smaller, ARGPARSE], [0.9, 0.1]) if order == "smaller first" else ([ARGPARSE, smaller], [0.1, 0.9])
    result = dedupe(embedder, texts, scores, selection=selection)
    assert [c.text for c in result.chunks] == [ARGPARSE]


def test_cosmetic_edits_still_merge(embedder):
    edited = cosmetic(ARGPARSE)
    assert edited != ARGPARSE
    assert dedupe(embedder, [ARGPARSE, edited]).output_count == 1


def test_guarded_by_says_which_guard_held_pairs_apart(embedder):
    changed = with_paragraph(ARGPARSE, 1, OTHER_PARAGRAPHS[1])
    texts = [ARGPARSE, changed, "Revenue rose 3% in the second quarter.", "Revenue rose 5% in the second quarter."]
    items = list(run(DedupeRequest(chunks=tuple(Chunk(id=str(i), text=t) for i, t in enumerate(texts))), embedder))
    stats = [e.stats for e in items if isinstance(e, StageEvent) and e.stage == "clustering" and e.stats][0]
    assert stats["guarded_by"] == {"numbers": 1, "coverage": 1} and stats["guarded_pairs"] == 2
    assert stats["sentences"] > 10
    assert items[-1].output_count == 4


def test_explain_lists_the_coverage_pair(client):
    changed = with_paragraph(ARGPARSE, 1, OTHER_PARAGRAPHS[1])
    body = {"chunks": [{"id": "a", "text": ARGPARSE}, {"id": "b", "text": changed}], "explain": True}
    explained = post(client, body).get_json()["explain"]
    [pair] = explained["guarded_pairs"]
    assert (pair["a"], pair["b"], pair["guard"]) == (0, 1, "coverage")
    assert "optparse" in pair["unsaid"]["a"] and "dialect" in pair["unsaid"]["b"]  # each one's own paragraph
    assert not {"is", "a", "of"} & set(pair["unsaid"]["a"] + pair["unsaid"]["b"])


def test_coverage_in_go_mode_embeds_the_sentences_it_needs(embedder):
    counting = CountingModel(embedder, batch_size=16)
    vector = np.ones(8, dtype=np.float32)  # the caller's vectors say: identical
    changed = with_paragraph(ARGPARSE, 1, OTHER_PARAGRAPHS[1])
    chunks = (Chunk(id="a", text=ARGPARSE, embedding=vector), Chunk(id="b", text=changed, embedding=vector))
    plain = drain(run(DedupeRequest(chunks=chunks), counting))
    assert plain.output_count == 1 and counting.batches == []  # Go mode: no model
    guarded = drain(run(DedupeRequest(chunks=chunks, guards=("coverage",)), counting))
    assert guarded.output_count == 2 and counting.batches


def test_a_cluster_no_member_covers_is_split():
    covers = np.array([
        [1, 1, 0, 0],  # 0 covers 1
        [0, 1, 0, 0],
        [0, 0, 1, 1],  # 2 covers 3
        [0, 0, 1, 1],  # 3 covers 2: either may stand for both; 3 says more
    ], dtype=bool)
    parts, eligible = covering_split(covers, np.array([5, 3, 4, 6]))
    assert parts.tolist() == [0, 0, 1, 1]
    assert eligible.tolist() == [True, False, False, True]
    everything, _ = covering_split(np.ones((3, 3), dtype=bool), np.array([1, 1, 1]))
    assert everything.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- cost, cache, limits, bad input


def test_a_resent_request_costs_no_model_time_and_gives_the_same_stream(embedder):
    cache = EmbeddingCache(64 << 20)
    changed = with_paragraph(ARGPARSE, 1, OTHER_PARAGRAPHS[1])
    request = DedupeRequest(chunks=(Chunk(id="a", text=ARGPARSE), Chunk(id="b", text=changed)))
    first_model, second_model = CountingModel(embedder, 16), CountingModel(embedder, 16)
    first = list(run(request, first_model, cache=cache, clock=lambda: 0.0))
    second = list(run(request, second_model, cache=cache, clock=lambda: 0.0))
    assert first_model.batches and second_model.batches == []
    assert first == second


def test_only_new_sentences_are_embedded_when_chunks_share_them(embedder):
    cache = EmbeddingCache(64 << 20)
    changed = with_paragraph(ARGPARSE, 1, OTHER_PARAGRAPHS[1])
    drain(run(DedupeRequest(chunks=(Chunk(text=ARGPARSE), Chunk(text=changed))), embedder, cache=cache))
    counting = CountingModel(embedder, 16)
    changed_again = with_paragraph(ARGPARSE, 2, OTHER_PARAGRAPHS[2])
    drain(run(DedupeRequest(chunks=(Chunk(text=ARGPARSE), Chunk(text=changed_again))), counting, cache=cache))
    new_windows = {w for w, _ in plan_windows([changed_again], embedder)[0]}
    asked = [t for batch in counting.batches for t in batch]
    assert asked and all(t in new_windows or t in OTHER_PARAGRAPHS[2] for t in asked)


@pytest.mark.parametrize("path", ["/v1/dedupe", "/v1/dedupe/stream"])
def test_too_many_tokens_is_a_413_before_any_work(make_app, path):
    client = make_app(max_tokens=500).test_client()
    response = post(client, {"chunks": [{"text": ARGPARSE}]}, path=path)
    assert response.status_code == 413
    assert response.get_json()["error"].startswith("too many tokens to embed: ")
    assert "DISTILL_MAX_TOKENS (500)" in response.get_json()["error"]
    assert post(client, {"chunks": [{"text": paragraphs(ARGPARSE)[0]}]}, path=path).status_code == 200


@pytest.mark.parametrize(
    "texts",
    [
        ["   ", "\n\n\t"],
        ["...", "!!! ???", "."],
        ["x" * 200_000, "y" * 200_000],
        ["def f(x):\n    return x + 1\n" * 200, "def f(x):\n    return x + 2\n" * 200],
        ["| a | b |\n|---|---|\n| 1 | 2 |\n" * 100, ARGPARSE],
    ],
    ids=["whitespace", "punctuation", "200k characters", "code", "table"],
)
def test_odd_texts_get_an_answer(client, texts):
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}
    response = post(client, body)
    assert response.status_code == 200, response.data
    assert response.get_json()["stats"]["input_count"] == len(texts)
    _, events = stream(client, body)
    assert events[-1][0] == "complete"
