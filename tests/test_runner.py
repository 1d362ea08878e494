"""The stage runner: event order, defaults by mode, stopping, errors, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache import EmbeddingCache
from pipeline.embed import l2_normalise
from pipeline.offload import INLINE, Threads
from pipeline.runner import Defaults, drain, run
from pipeline.types import Chunk, DedupeRequest, Result, StageError, StageEvent

TEXTS = [
    "A plane is taking off.",
    "An air plane is taking off.",
    "A man is playing a flute.",
    "Revenue rose 3% in the second quarter.",
    "Revenue rose 5% in the second quarter.",
    "A cat sleeps on the sofa.",
]


class CountingModel:
    """The real model, counting the batches and texts it is asked for."""

    def __init__(self, model, batch_size=2):
        self.model, self.batch_size, self.name = model, batch_size, model.name
        self.batches: list[list[str]] = []

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans
        return getattr(self.model, name)

    def encode(self, texts):
        self.batches.append(list(texts))
        return self.model.encode(texts)


def text_request(**fields) -> DedupeRequest:
    chunks = tuple(Chunk(id=str(i), text=t, score=1 - i / 10) for i, t in enumerate(TEXTS))
    return DedupeRequest(chunks=chunks, **fields)


def vector_request(vectors: np.ndarray, **fields) -> DedupeRequest:
    chunks = tuple(Chunk(id=str(i), score=float(i), embedding=v) for i, v in enumerate(vectors))
    return DedupeRequest(chunks=chunks, **fields)


def stages_of(items) -> list[tuple[str, float]]:
    return [(e.stage, e.progress) for e in items if isinstance(e, StageEvent)]


def test_every_stage_reports_zero_first_and_one_last_with_stats(embedder):
    items = list(run(text_request(target_k=2), CountingModel(embedder)))
    assert isinstance(items[-1], Result)
    events = [e for e in items if isinstance(e, StageEvent)]
    order = [e.stage for e in events]
    assert order == sorted(order, key=["embedding", "clustering", "selection", "mmr"].index)
    for stage in ("embedding", "clustering", "selection", "mmr"):
        own = [e for e in events if e.stage == stage]
        assert own[0].progress == 0.0 and own[-1].progress == 1.0
        assert all(0 < e.progress < 1 for e in own[1:-1])
        assert "duration_ms" in own[-1].stats
    final = {e.stage: e.stats for e in events if e.progress == 1.0}
    assert final["embedding"]["embedded"] == 6
    assert set(final["clustering"]) == {
        "clusters_formed", "input_count", "threshold", "guarded_pairs", "guarded_by", "sentences", "duration_ms"
    }
    assert final["embedding"]["windows"] == 6 and final["embedding"]["tokens"] > 6
    assert final["selection"]["selected"] == final["clustering"]["clusters_formed"]
    assert final["mmr"]["output_count"] == 2 == items[-1].output_count


def test_model_mode_uses_calibrated_threshold_and_number_guard(embedder):
    result_events = list(run(text_request(), embedder, Defaults(model_threshold=0.3)))
    final = {e.stage: e.stats for e in result_events if isinstance(e, StageEvent) and e.progress == 1.0}
    assert final["clustering"]["threshold"] == 0.3
    assert final["clustering"]["guarded_pairs"] == 1  # 3% vs 5%
    result = result_events[-1]
    kept = {c.text for c in result.chunks}
    assert TEXTS[3] in kept and TEXTS[4] in kept
    # The pair merged; "An air plane ..." says all the other says and more ("air"), so it is
    # kept though its score is lower.
    assert TEXTS[0] not in kept and TEXTS[1] in kept


def test_go_mode_uses_go_threshold_and_no_guard(embedder):
    vectors = embedder.embed(TEXTS)
    items = list(run(vector_request(vectors), embedder, Defaults(go_threshold=0.2)))
    assert "embedding" not in {s for s, _ in stages_of(items)}
    final = {e.stage: e.stats for e in items if isinstance(e, StageEvent) and e.progress == 1.0}
    assert final["clustering"]["threshold"] == 0.2 and final["clustering"]["guarded_pairs"] == 0


def test_explicit_threshold_and_guards_win_over_mode_defaults(embedder):
    items = list(run(text_request(threshold=0.5, guards=()), embedder))
    final = {e.stage: e.stats for e in items if isinstance(e, StageEvent) and e.progress == 1.0}
    assert final["clustering"]["threshold"] == 0.5 and final["clustering"]["guarded_pairs"] == 0


def test_only_missing_vectors_are_embedded_and_identical_texts_once(embedder):
    counting = CountingModel(embedder, batch_size=16)
    given = embedder.embed(["A plane is taking off."])[0]
    chunks = (
        Chunk(id="v", text="ignored because a vector is given", embedding=given),
        Chunk(id="a", text="A plane is taking off."),
        Chunk(id="b", text="A plane is taking off."),
        Chunk(id="c", text="A man is playing a flute."),
    )
    result = drain(run(DedupeRequest(chunks=chunks, guards=("numbers",)), counting))
    assert counting.batches == [["A man is playing a flute.", "A plane is taking off."]]
    assert [c.id for c in result.chunks] == ["v", "c"]


def test_batches_embedded_two_at_a_time_give_the_same_events_and_result(embedder):
    """A server's offload runs `width` batches at once: every event and the result
    (latency aside) are those of one batch at a time."""
    def events(offload):
        counting = CountingModel(embedder, batch_size=2)
        items = list(run(text_request(target_k=3), counting, offload=offload, clock=lambda: 0.0))
        return items, sorted(map(tuple, counting.batches))

    wide = Threads(2)
    try:
        assert events(wide) == events(INLINE)
    finally:
        wide.close()
    assert len(events(INLINE)[1]) == 3


def test_closing_the_generator_stops_all_further_work(embedder):
    counting = CountingModel(embedder, batch_size=1)
    events = run(text_request(), counting)
    assert next(events) == StageEvent("embedding", 0.0)
    events.close()
    assert counting.batches == []
    with pytest.raises(StopIteration):
        next(events)


def test_a_failing_stage_names_itself(embedder):
    chunks = (Chunk(id="a", embedding=np.ones(3, dtype=np.float32)), Chunk(id="b", text="needs the model"))
    with pytest.raises(StageError) as failure:
        drain(run(DedupeRequest(chunks=chunks), embedder))
    assert failure.value.stage == "embedding"
    assert "dimension" in failure.value.message


def test_query_relevance_prefers_chunks_near_the_query(embedder):
    result = drain(run(text_request(target_k=1, query="aircraft departure"), embedder))
    assert result.chunks[0].text == TEXTS[1]  # the plane cluster's fuller member


def test_same_input_same_output_twenty_times(embedder):
    rng = np.random.default_rng(3)
    vectors = l2_normalise(rng.normal(size=(200, 64)).astype(np.float32))
    vectors = np.vstack([vectors, vectors[:80] + 0.05 * rng.normal(size=(80, 64)).astype(np.float32)])
    request = vector_request(vectors, threshold=0.3, target_k=50)
    outputs = set()
    for _ in range(20):
        wire = drain(run(request, embedder)).to_wire()
        wire["stats"]["latency_ms"] = 0
        outputs.add(repr(wire))
    assert len(outputs) == 1
    text_outputs = {repr(drain(run(text_request(target_k=3), embedder)).chunks) for _ in range(20)}
    assert len(text_outputs) == 1


def test_single_chunk_is_returned_as_is(embedder):
    result = drain(run(DedupeRequest(chunks=(Chunk(id="only", text="hello", score=0.7),)), embedder))
    assert [(c.id, c.text, c.score, c.cluster_id) for c in result.chunks] == [("only", "hello", 0.7, 0)]
    assert (result.input_count, result.cluster_count, result.reduction_pct) == (1, 1, 0)


def test_cached_texts_skip_the_model_and_give_the_same_events_and_result(embedder):
    cache = EmbeddingCache(1 << 20)
    first_model, second_model = CountingModel(embedder), CountingModel(embedder)
    first = list(run(text_request(target_k=3), first_model, cache=cache, clock=lambda: 0.0))
    second = list(run(text_request(target_k=3), second_model, cache=cache, clock=lambda: 0.0))
    assert len(cache) == len(TEXTS) and second_model.batches == []
    assert [e for e in first if isinstance(e, StageEvent)] == [e for e in second if isinstance(e, StageEvent)]
    assert first[-1].chunks == second[-1].chunks
