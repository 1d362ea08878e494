"""Nothing lost below the sentence: token-level coverage with the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import EmbeddingCache
from pipeline.embed import STATE_SCALE, quantised_states
from pipeline.profiles import token_profile
from pipeline.runner import drain, run
from pipeline.tokens import TokenJudge
from pipeline.types import Chunk, DedupeRequest
from pipeline.types import SELECTIONS

from .test_api import STREAM, post
from .test_runner import CountingModel

ROOT = Path(__file__).resolve().parents[1]

# (fuller, the same less a clause, a name or a figure's context)
CLAUSE_DROPS = [
    ("WorldCom filed for bankruptcy in July 2002, citing massive accounting irregularities.",
     "WorldCom filed for bankruptcy in July, 2002."),
    ("The json module's dumps() function serialises a Python object to a JSON formatted string, "
     "using the default encoder.",
     "The json module's dumps() function serialises a Python object to a JSON formatted string."),
    ("The socket module provides access to the BSD socket interface on Unix and Windows.",
     "The socket module provides access to the socket interface on Unix and Windows."),
    # "weekday", in both, is as close to the dropped "Sunday" as a paraphrase would be: a
    # word both sentences have must not also stand for the one only the fuller has
    ("Use setfirstweekday to set the first day of the week to Sunday (6) or to any other weekday.",
     "Use setfirstweekday to set the first day of the week (6) or to any other weekday."),
    # the shorter's "A" has taken on enough of the plane to come near "air" (0.56): a light
    # word stands for nothing
    ("An air plane is taking off.", "A plane is taking off."),
]
PARAPHRASES = [
    ("Shares of Intel fell 3 percent on Tuesday.", "Intel stock dropped 3 percent on Tuesday."),
    # each leaves ~0.6 of a word of the other unsaid ("user"; pieces of "JS" and "UIs")
    ("React is a JavaScript library for building user interfaces.", "React.js is a JS library for building UIs."),
]
DIFFERENT_CLAUSES = (
    "The company said profits rose sharply in the third quarter, driven by strong sales of its new "
    "smartphone models in Asia and Latin America.",
    "The company said profits rose sharply in the third quarter, despite weak demand for its older "
    "laptop computers across Europe and North America.",
)

# A sentence, and the same with a statement of its own added: 0.03 apart, within any
# threshold, yet nobody calls them the same sentence. Keeping both loses nothing.
ADDS_A_STATEMENT = (
    "The Bank of England left interest rates unchanged on Thursday, as policymakers waited for clearer "
    "evidence that consumer spending and house prices were slowing.",
    "The Bank of England left interest rates unchanged on Thursday.",
)


def dedupe(embedder, texts, scores, **fields):
    chunks = tuple(Chunk(id=str(i), text=t, score=s) for i, (t, s) in enumerate(zip(texts, scores)))
    return drain(run(DedupeRequest(chunks=chunks, **fields), embedder))


@pytest.fixture(scope="module")
def judge(embedder):
    return TokenJudge(embedder, token_profile(embedder.name))


def sentences(judge, embedder, *texts):
    return judge.sentences(texts, embedder.encode(list(texts))[1])


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("fuller, shorter", CLAUSE_DROPS)
def test_a_clause_drop_keeps_the_fuller_text_whatever_the_scores(embedder, selection, fuller, shorter):
    for texts, scores in (([shorter, fuller], [0.9, 0.1]), ([fuller, shorter], [0.1, 0.9])):
        result = dedupe(embedder, texts, scores, selection=selection)
        assert result.cluster_count == 1  # still de-duplicated: the shorter says nothing more
        assert [c.text for c in result.chunks] == [fuller]


@pytest.mark.parametrize("first, second", PARAPHRASES)
def test_paraphrases_cover_each_other_and_the_score_decides(embedder, first, second):
    assert [c.text for c in dedupe(embedder, [first, second], [0.2, 0.8]).chunks] == [second]
    assert [c.text for c in dedupe(embedder, [first, second], [0.8, 0.2]).chunks] == [first]


def test_sentences_that_each_say_much_the_other_does_not_stay_apart(embedder):
    assert dedupe(embedder, DIFFERENT_CLAUSES, [1, 1], guards=("numbers",)).cluster_count == 1
    assert dedupe(embedder, DIFFERENT_CLAUSES, [1, 1]).cluster_count == 2


@pytest.mark.parametrize("selection", SELECTIONS)
def test_a_sentence_that_adds_a_statement_of_its_own_stays_beside_the_shorter(embedder, selection):
    texts = list(ADDS_A_STATEMENT)
    assert dedupe(embedder, texts, [1, 1], guards=("numbers",)).cluster_count == 1
    for scores in ([0.9, 0.1], [0.1, 0.9]):
        result = dedupe(embedder, texts, scores, selection=selection)
        assert sorted(c.text for c in result.chunks) == sorted(texts)


def test_explain_names_what_the_longer_sentence_adds(client):
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(ADDS_A_STATEMENT)], "explain": True}
    [pair] = post(client, body).get_json()["explain"]["guarded_pairs"]
    assert pair["guard"] == "coverage" and pair["unsaid"]["b"] == []
    assert {"policymakers", "consumer", "spending"} <= set(pair["unsaid"]["a"])


def test_explain_names_the_words_each_sentence_alone_says(client):
    body = {"chunks": [{"id": str(i), "text": t} for i, t in enumerate(DIFFERENT_CLAUSES)], "explain": True}
    answer = post(client, body).get_json()
    [pair] = answer["explain"]["guarded_pairs"]
    assert (pair["a"], pair["b"], pair["guard"]) == (0, 1, "coverage")
    assert {"smartphone", "models"} <= set(pair["unsaid"]["a"]) and {"laptop", "computers"} <= set(pair["unsaid"]["b"])
    assert "the" not in pair["unsaid"]["a"] + pair["unsaid"]["b"]  # light words are not listed
    assert answer["stats"]["output_count"] == 2


def test_a_sentence_covers_itself_and_whatever_it_contains(judge, embedder):
    fuller, shorter = sentences(judge, embedder, *CLAUSE_DROPS[0])
    assert judge.each_covers(fuller, fuller) == (True, True)
    assert judge.each_covers(fuller, shorter) == (True, False)


def test_a_number_the_other_lacks_is_never_covered(judge, embedder):
    with_both, with_one = sentences(
        judge, embedder, "Revenue rose 5% to 12 million dollars.", "Revenue rose 5% to 13 million dollars."
    )
    assert judge.each_covers(with_both, with_one) == (False, False)


def test_unsaid_words_are_whole_words(judge, embedder):
    text = "The root logger propagates messages upward."
    said, by = sentences(judge, embedder, text, "The handler writes records.")
    words = judge.unsaid_words(text, said, by)
    assert "logger" in words and "propagates" in words and all(w in text.split(" ") or w + "." in text for w in words)


def test_token_states_are_exact_integers_of_unit_rows():
    rng = np.random.default_rng(0)
    states = quantised_states(rng.normal(size=(7, 384)) * 50)
    assert states.dtype == np.int16
    norms = np.linalg.norm(states.astype(np.float64), axis=1) / STATE_SCALE
    assert np.allclose(norms, 1.0, atol=1e-3)
    similarities = states.astype(np.float64) @ states.T.astype(np.float64)
    assert np.array_equal(similarities, np.rint(similarities))  # integers: exact in any order


def test_one_sentence_chunks_bring_their_token_states_from_the_embedding_pass(embedder):
    """A candidate pair of one-sentence chunks costs no second forward pass; unrelated
    chunks cost nothing beyond their vectors; a repeat costs nothing at all."""
    model = CountingModel(embedder, batch_size=16)
    cache = EmbeddingCache(64 << 20)
    texts = list(CLAUSE_DROPS[0]) + ["A man is playing a flute on the beach at sunset."]
    chunks = tuple(Chunk(id=str(i), text=t) for i, t in enumerate(texts))
    result = drain(run(DedupeRequest(chunks=chunks), model, cache=cache))
    assert result.cluster_count == 2
    assert sorted(t for batch in model.batches for t in batch) == sorted(texts)  # each text read once
    model.batches.clear()
    assert drain(run(DedupeRequest(chunks=chunks), model, cache=cache)).labels == result.labels
    assert model.batches == []  # vectors and token states both from the cache


BAD_TEXTS = {
    "stop words": "the of and a to in is it that",
    "punctuation": "... ,,, !!! ??? ;;; --- ((( )))",
    "numbers": "1 2 3 4.5 6,000 7e3 0.25",
    "one token": "x",
    "one long word": "word " * 40_000,
}


@pytest.mark.parametrize("name", BAD_TEXTS)
def test_texts_with_little_to_compare_are_answered_on_both_endpoints(client, name):
    text = BAD_TEXTS[name]
    body = {"chunks": [{"id": "a", "text": text}, {"id": "b", "text": text + " "},
                       {"id": "c", "text": text.upper() + "."}], "explain": True}
    answer = post(client, body)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["stats"]["input_count"] == 3
    streamed = post(client, body, path=STREAM)
    assert streamed.status_code == 200
    frames = streamed.get_data(as_text=True)
    assert "event: complete" in frames and "event: error" not in frames


KERNEL_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from pipeline.embed import FastEmbedModel
from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest
pairs = json.loads(sys.argv[1])
model = FastEmbedModel()
out = []
for texts in pairs:
    chunks = tuple(Chunk(id=str(i), text=t, score=1 - i / 10) for i, t in enumerate(texts))
    result = drain(run(DedupeRequest(chunks=chunks, explain=True), model))
    out.append([result.labels, [c.id for c in result.chunks], result.explain["guarded_pairs"]])
print(json.dumps(out))
"""


def test_the_same_answers_under_other_blas_kernels():
    """Token coverage is integer arithmetic: OpenBLAS's Haswell and Sandybridge kernels,
    which round float32 and float64 sums differently, give the same answers."""
    pairs = [list(p) for p in CLAUSE_DROPS] + [list(p) for p in PARAPHRASES] + [list(DIFFERENT_CLAUSES)]
    answers = []
    for kernel in ("Haswell", "Sandybridge"):
        env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
        done = subprocess.run(
            [sys.executable, "-c", KERNEL_SCRIPT.format(root=str(ROOT)), json.dumps(pairs)],
            env=env, capture_output=True, text=True, check=True,
        )
        answers.append(done.stdout)
    assert answers[0] == answers[1]
    assert json.loads(answers[0])[-1][2][0]["guard"] == "coverage"
