"""Cache-aware de-duplication (`options.preserve_cache_prefix`): validation, the runner and
the API through Flask's test client, with the real model.

The partition cases are Go Distill v0.9's own (its `pkg/cache` prefix tests): no marker,
one marker, several markers, a marker on the last chunk, a hash that is stable and that
changes with the text. End to end through gunicorn: tests/test_e2e_cache_prefix.py.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from app import create_app
from app.config import Config
from app.validate import ApiError, parse_request
from pipeline.embed import ModelUnavailable
from pipeline.runner import drain, run
from pipeline.types import Result, StageEvent

from .support import FaultInjectingModel, SSEParser, delta, scrape

DEDUPE = "/v1/dedupe"
STREAM = "/v1/dedupe/stream"
ON = {"preserve_cache_prefix": True}
EPHEMERAL = {"type": "ephemeral"}
PREFIX_STATS = [
    "cache_prefix_frozen",
    "cache_prefix_tokens",
    "cache_prefix_hash",
    "suffix_input_count",
    "suffix_output_count",
]
SYSTEM = (
    "You are a support assistant for Acme routers. Answer from the documentation below; "
    "when it does not say, say so. Quote model numbers exactly."
)
RESET = "Reset the router by holding the recessed button on the back for ten seconds."
FIRMWARE = "Firmware updates install overnight; the router restarts once when it finishes."
GUEST = "The guest network is isolated from the main network and has its own password."


def text_chunk(id: str, text: str, score: float = 0, marker=None) -> dict:
    out = {"id": id, "text": text, "score": score}
    return out if marker is None else {**out, "cache_control": marker}


def vector_chunk(id: str, axis: int, score: float = 0, marker=None, text: str = "") -> dict:
    """A Go-mode chunk: its own 8-d unit vector along `axis` (same axis = same content)."""
    vector = [0.0] * 8
    vector[axis] = 1.0
    out = {"id": id, "text": text, "embedding": vector, "score": score}
    return out if marker is None else {**out, "cache_control": marker}


def parsed(body: dict):
    return parse_request(json.loads(json.dumps(body)), Config())


def post(client, body: dict) -> dict:
    response = client.post(DEDUPE, json=body)
    assert response.status_code == 200, response.data
    return response.get_json()


def stream(client, body: dict) -> list:
    response = client.post(STREAM, json=body)
    assert response.status_code == 200, response.data
    return SSEParser().feed(response.data.decode())


def stages(events) -> list[str]:
    return list(dict.fromkeys(e.json["stage"] for e in events if e.type == "progress"))


def without_latency(answer: dict) -> dict:
    return {**answer, "stats": {**answer["stats"], "latency_ms": 0}}


def without_timings(raw: bytes) -> bytes:
    """A response's bytes with `latency_ms` and stage `duration_ms` set to 0."""
    return re.sub(rb'"(latency_ms|duration_ms)":\d+', rb'"\1":0', raw)


def expected_hash(texts: list[str]) -> str:
    return hashlib.sha256(b"".join(t.encode() + b"\0" for t in texts)).hexdigest()[:16]


# ------------------------------------------------- the partition: Go Distill's own cases


def test_no_marker_freezes_nothing_and_the_answer_is_todays(client):
    chunks = [text_chunk("1", "system prompt"), text_chunk("2", "user message"),
              text_chunk("3", "assistant reply")]
    assert parsed({"chunks": chunks, "options": ON}).frozen_count == 0
    with_option = post(client, {"chunks": chunks, "options": ON})
    assert without_latency(with_option) == without_latency(post(client, {"chunks": chunks}))
    assert not set(PREFIX_STATS) & set(with_option["stats"])


def test_one_anthropic_marker_freezes_the_first_chunk(client):
    chunks = [
        text_chunk("1", "You are a helpful assistant.", marker=EPHEMERAL),
        text_chunk("2", "What is the capital of France?"),
        text_chunk("3", "Paris is the capital."),
    ]
    answer = post(client, {"chunks": chunks, "options": ON})
    assert answer["chunks"][0] == {"id": "1", "text": "You are a helpful assistant.",
                                   "score": 0, "cluster_id": -1}
    stats = answer["stats"]
    assert stats["cache_prefix_frozen"] is True
    assert stats["cache_prefix_tokens"] == (28 + 3) // 4
    assert stats["cache_prefix_hash"] == expected_hash(["You are a helpful assistant."])
    assert stats["suffix_input_count"] == 2  # (the model may merge the two: both about Paris)
    assert stats["suffix_output_count"] == len(answer["chunks"]) - 1
    assert all(c["id"] in ("2", "3") and c["cluster_id"] >= 0 for c in answer["chunks"][1:])


def test_several_markers_freeze_up_to_the_last_one():
    chunks = [
        text_chunk("1", "System prompt text here.", marker=EPHEMERAL),
        text_chunk("2", "Tool definitions JSON schema.", marker=EPHEMERAL),
        text_chunk("3", "Dynamic user message."),
        text_chunk("4", "Another dynamic message."),
    ]
    assert parsed({"chunks": chunks, "options": ON}).frozen_count == 2


def test_a_marker_on_the_last_chunk_freezes_every_chunk_before_it(client):
    chunks = [text_chunk("1", "chunk one"), text_chunk("2", "chunk two"),
              text_chunk("3", "chunk three", marker="ephemeral")]
    answer = post(client, {"chunks": chunks, "options": ON})
    assert [(c["id"], c["cluster_id"]) for c in answer["chunks"]] == [("1", -1), ("2", -1), ("3", -1)]


def test_the_hash_is_stable_and_follows_the_text(client):
    def prefix_hash(system: str) -> str:
        body = {"chunks": [text_chunk("1", system, marker=EPHEMERAL),
                           text_chunk("2", "dynamic content")], "options": ON}
        return post(client, body)["stats"]["cache_prefix_hash"]

    assert prefix_hash("stable system prompt") == prefix_hash("stable system prompt")
    assert prefix_hash("system prompt v1") != prefix_hash("system prompt v2")


def test_the_hash_separates_texts_with_a_nul_byte(client):
    def prefix_hash(texts: list[str]) -> str:
        chunks = [text_chunk(str(i), t, marker=True) for i, t in enumerate(texts)]
        return post(client, {"chunks": chunks, "options": ON})["stats"]["cache_prefix_hash"]

    assert prefix_hash(["ab", "c"]) == expected_hash(["ab", "c"])
    assert prefix_hash(["ab", "c"]) != prefix_hash(["a", "bc"])


# ------------------------------------------------------------------------- markers


@pytest.mark.parametrize("marker", ["ephemeral", EPHEMERAL, {"ttl": "1h"}, True])
def test_markers(marker):
    chunks = [text_chunk("1", "a", marker=marker), text_chunk("2", "b")]
    assert parsed({"chunks": chunks, "options": ON}).frozen_count == 1


@pytest.mark.parametrize("marker", ["", {}, False, None])
def test_not_markers(marker):
    chunks = [text_chunk("1", "a", marker=marker), text_chunk("2", "b")]
    assert parsed({"chunks": chunks, "options": ON}).frozen_count == 0


@pytest.mark.parametrize("marker", [0, 1, 1.5, [], ["ephemeral"]])
def test_a_marker_of_another_type_is_a_400_on_both_endpoints(client, marker):
    body = {"chunks": [text_chunk("1", "a"), text_chunk("2", "b", marker=marker)], "options": ON}
    for path in (DEDUPE, STREAM):
        response = client.post(path, json=body)
        assert response.status_code == 400 and response.mimetype == "application/json"
        assert response.get_json() == {
            "error": "chunks[1].cache_control must be a string, an object or a boolean"
        }


@pytest.mark.parametrize(
    "options, message",
    [
        ("yes", "options must be an object"),
        ([True], "options must be an object"),
        ({"preserve_cache_prefix": "true"}, "options.preserve_cache_prefix must be a boolean"),
        ({"preserve_cache_prefix": 1}, "options.preserve_cache_prefix must be a boolean"),
    ],
)
def test_bad_options_are_a_400(options, message):
    with pytest.raises(ApiError) as refused:
        parsed({"chunks": [text_chunk("1", "a", marker=True)], "options": options})
    assert (refused.value.status, refused.value.message) == (400, message)


@pytest.mark.parametrize("options", [None, {}, {"preserve_cache_prefix": None},
                                     {"preserve_cache_prefix": False}, {"other": 1}])
def test_without_the_option_markers_are_ignored(client, options):
    chunks = [vector_chunk("a", 0, 0.2, marker=EPHEMERAL), vector_chunk("b", 0, 0.9),
              vector_chunk("c", 1, 0.5, marker="ephemeral")]
    plain = [{k: v for k, v in c.items() if k != "cache_control"} for c in chunks]
    body = {"chunks": chunks} if options is None else {"chunks": chunks, "options": options}
    for path in (DEDUPE, STREAM):
        got = client.post(path, json=body).data
        today = client.post(path, json={"chunks": plain}).data
        assert without_timings(got) == without_timings(today)
    assert parsed(body).frozen_count == 0


# ------------------------------------------------------------ what the pipeline does


def test_the_prefix_comes_back_as_sent_however_redundant(client):
    """The system prompt sent twice inside the prefix: both copies stay, in input order,
    with their scores as sent, ahead of better-scored suffix chunks."""
    chunks = [
        text_chunk("sys", SYSTEM, 0.1, marker=EPHEMERAL),
        text_chunk("sys", SYSTEM, 1.5e-7),
        text_chunk("tools", "Tools: lookup_model(number), open_ticket(summary).", -2, marker=True),
        text_chunk("doc-1", RESET, 0.9),
        text_chunk("doc-2", RESET, 0.8),
        text_chunk("doc-3", FIRMWARE, 0.7),
    ]
    answer = post(client, {"chunks": chunks, "options": ON})
    frozen = [{**c, "cluster_id": -1} for c in chunks[:3]]
    for c in frozen:
        c.pop("cache_control", None)
    assert answer["chunks"][:3] == frozen
    assert [c["id"] for c in answer["chunks"][3:]] == ["doc-1", "doc-3"]
    assert [c["cluster_id"] for c in answer["chunks"][3:]] == [0, 1]
    stats = answer["stats"]
    assert list(stats) == ["input_count", "output_count", "cluster_count", "reduction_pct",
                           "latency_ms", *PREFIX_STATS]
    assert (stats["input_count"], stats["output_count"], stats["cluster_count"]) == (6, 5, 2)
    assert stats["reduction_pct"] == 16  # int((1 - 5/6) * 100), counting the prefix
    assert (stats["suffix_input_count"], stats["suffix_output_count"]) == (3, 2)


def test_the_suffix_is_not_compared_with_the_prefix(client):
    chunks = [text_chunk("sys", RESET, marker=True), text_chunk("a", RESET), text_chunk("b", RESET)]
    answer = post(client, {"chunks": chunks, "options": ON})
    assert [(c["id"], c["cluster_id"]) for c in answer["chunks"]] == [("sys", -1), ("a", 0)]


def test_target_k_counts_suffix_chunks(client):
    chunks = [vector_chunk(f"p{i}", i, marker=True, text=f"prefix {i}") for i in range(3)]
    chunks += [vector_chunk(f"s{i}", i, score=i) for i in range(4)]
    events = stream(client, {"chunks": chunks, "options": ON, "target_k": 2})
    answer = events[-1].json
    assert "mmr" in stages(events)
    assert [c["id"] for c in answer["chunks"][:3]] == ["p0", "p1", "p2"]
    assert len(answer["chunks"]) == 3 + 2
    assert answer["stats"]["suffix_output_count"] == 2


def test_target_k_larger_than_the_suffix_runs_no_mmr(client):
    """Five chunks, target_k 4: today MMR would cut one; with three frozen, the suffix's two stay."""
    chunks = [vector_chunk(f"p{i}", i, marker=True, text=f"prefix {i}") for i in range(3)]
    chunks += [vector_chunk("s3", 3), vector_chunk("s4", 4)]
    events = stream(client, {"chunks": chunks, "options": ON, "target_k": 4})
    assert stages(events) == ["clustering", "selection"]
    assert [c["id"] for c in events[-1].json["chunks"]] == ["p0", "p1", "p2", "s3", "s4"]
    today = stream(client, {"chunks": chunks, "target_k": 4})
    assert "mmr" in stages(today) and len(today[-1].json["chunks"]) == 4


def test_every_chunk_frozen_runs_no_stage(client):
    chunks = [text_chunk("1", SYSTEM, 0.5, marker=EPHEMERAL), text_chunk("2", SYSTEM, marker=True)]
    body = {"chunks": chunks, "options": ON, "target_k": 1}
    events = stream(client, body)
    assert [e.type for e in events] == ["complete"]
    answer = post(client, body)
    assert without_latency(events[0].json) == without_latency(answer)
    stats = answer["stats"]
    assert list(stats) == ["input_count", "output_count", "cluster_count", "reduction_pct",
                           "latency_ms", "cache_prefix_frozen", "cache_prefix_tokens",
                           "cache_prefix_hash"]
    assert (stats["input_count"], stats["output_count"], stats["cluster_count"]) == (2, 2, 0)
    assert stats["reduction_pct"] == 0


def test_token_estimate_counts_utf8_bytes_per_chunk(client):
    texts = ["Grüße aus Köln", "日本語のテキスト", "🙂", "a"]  # 17, 24, 4 and 1 bytes
    chunks = [text_chunk(str(i), t, marker=True) for i, t in enumerate(texts)]
    chunks.append(text_chunk("q", "What does the prefix say?"))
    stats = post(client, {"chunks": chunks, "options": ON})["stats"]
    assert stats["cache_prefix_tokens"] == 5 + 6 + 1 + 1  # characters would give 4 + 2 + 1 + 1
    assert stats["cache_prefix_hash"] == expected_hash(texts)


def test_a_prefix_without_text_has_no_token_estimate(client):
    chunks = [vector_chunk("p", 0, marker=True), vector_chunk("s", 1)]
    stats = post(client, {"chunks": chunks, "options": ON})["stats"]
    assert "cache_prefix_tokens" not in stats
    assert stats["cache_prefix_hash"] == expected_hash([""])


# ------------------------------------------------------------ frozen texts are never embedded


class UnavailableModel:
    """Fault injection: a model that cannot be loaded (the service answers 503 when it
    needs one)."""

    name, batch_size = "unavailable", 8

    def dim(self) -> int:
        raise ModelUnavailable("injected: no model")

    def encode(self, texts):
        raise ModelUnavailable("injected: no model")


class RecordingModel:
    """The real model, recording every text it is asked to embed."""

    def __init__(self, model):
        self.model, self.name, self.batch_size = model, model.name, model.batch_size
        self.texts: list[str] = []

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans
        return getattr(self.model, name)

    def encode(self, texts):
        self.texts += texts
        return self.model.encode(texts)


def test_the_model_sees_only_suffix_texts(embedder):
    model = RecordingModel(embedder)
    body = {"chunks": [text_chunk("sys", SYSTEM, marker=EPHEMERAL), text_chunk("a", RESET),
                       text_chunk("b", GUEST)], "options": ON}
    items = list(run(parsed(body), model))
    assert sorted(model.texts) == sorted([RESET, GUEST])
    embedding = [e for e in items if isinstance(e, StageEvent) and e.stage == "embedding"]
    assert embedding[-1].stats["embedded"] == 2
    assert isinstance(items[-1], Result) and items[-1].output_count == 3


def test_a_suffix_with_vectors_runs_in_go_mode_without_the_model():
    """The prefix holds texts only; the suffix brings vectors: no embedding stage, Go's
    threshold, and no model needed."""
    app = create_app(Config(), embedder=UnavailableModel())
    chunks = [text_chunk("sys", SYSTEM, marker=EPHEMERAL), vector_chunk("a", 0, 0.9),
              vector_chunk("b", 0, 0.1), vector_chunk("c", 1)]
    events = stream(app.test_client(), {"chunks": chunks, "options": ON})
    assert stages(events) == ["clustering", "selection"]
    clustering = [e.json for e in events if e.type == "progress" and e.json["progress"] == 1]
    assert clustering[0]["stage"] == "clustering"
    assert clustering[0]["stats"]["threshold"] == 0.15
    assert clustering[0]["stats"]["input_count"] == 3
    assert [c["id"] for c in events[-1].json["chunks"]] == ["sys", "a", "c"]


def test_frozen_vectors_take_no_part_in_the_dimension_rules(client):
    """A frozen chunk's vector is never used: another dimension than the suffix's, or than
    the model's, is no error."""
    frozen = {"id": "p", "text": "prefix", "embedding": [1.0, 0.0, 0.0], "cache_control": True}
    go_mode = [frozen, vector_chunk("a", 0), vector_chunk("b", 1)]
    assert post(client, {"chunks": go_mode, "options": ON})["stats"]["suffix_input_count"] == 2
    model_mode = [frozen, text_chunk("a", RESET)]
    assert post(client, {"chunks": model_mode, "options": ON})["stats"]["output_count"] == 2


def test_every_chunk_frozen_needs_no_model_even_with_a_query():
    client = create_app(Config(), embedder=UnavailableModel()).test_client()
    body = {"chunks": [text_chunk("1", SYSTEM, marker=True)], "options": ON,
            "query": "how do I reset it?", "target_k": 1}
    assert post(client, body)["chunks"][0]["cluster_id"] == -1
    body["chunks"].append(text_chunk("2", RESET))
    assert client.post(DEDUPE, json=body).status_code == 503  # the suffix needs the model


def test_a_failing_suffix_stage_ends_the_stream_with_one_error(embedder):
    app = create_app(Config(), embedder=FaultInjectingModel(embedder))
    body = {"chunks": [text_chunk("sys", SYSTEM, marker=True), text_chunk("a", RESET)],
            "options": ON}
    events = stream(app.test_client(), body)
    assert [e.type for e in events if e.type != "progress"] == ["error"]
    assert events[-1].json["stage"] == "embedding"


def test_the_runner_alone_without_a_prefix_is_unchanged(embedder):
    body = {"chunks": [text_chunk("a", RESET), text_chunk("b", RESET)], "options": ON}
    result = drain(run(parsed(body), embedder))
    assert result.cache_prefix is None and "cache_prefix_frozen" not in result.to_wire()["stats"]


# ------------------------------------------------------------------------- metrics


def test_chunk_metrics_count_the_prefix_and_clusters_count_the_suffix(client):
    chunks = [text_chunk("sys", SYSTEM, marker=EPHEMERAL), text_chunk("sys2", SYSTEM, marker=True),
              text_chunk("a", RESET), text_chunk("b", RESET), text_chunk("c", GUEST)]
    before = scrape(client)
    post(client, {"chunks": chunks, "options": ON})
    after = scrape(client)
    assert delta(before, after, "distill_chunks_processed_total", direction="input") == 5
    assert delta(before, after, "distill_chunks_processed_total", direction="output") == 4
    assert delta(before, after, "distill_clusters_formed_total", endpoint=DEDUPE) == 2
    assert delta(before, after, "distill_reduction_ratio_sum", endpoint=DEDUPE) == pytest.approx(0.2)
