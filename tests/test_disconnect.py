"""A client that leaves at any stage: the work stops there and nothing is left behind."""

from __future__ import annotations

import gc
import threading

import pytest
from greenlet import greenlet

from .support import delta, scrape, synthetic_texts

STREAM = "/v1/dedupe/stream"
STAGES = ["embedding", "clustering", "selection", "mmr"]
BODY = {"chunks": [{"text": t} for t in synthetic_texts(40, seed=9)], "target_k": 5}


def live_greenlets() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)


@pytest.mark.parametrize("stage", STAGES)
def test_leaving_at_a_stage_stops_the_work_and_leaks_nothing(client, stage):
    client.post("/v1/dedupe", json=BODY)  # warm: the model is loaded, the pool started
    greenlets, threads = live_greenlets(), threading.active_count()
    before = scrape(client)
    response = client.post(STREAM, json=BODY, buffered=False)
    marker = f'"stage":"{stage}","progress":0.0'.encode()
    for frame in response.response:
        if marker in frame:
            break
    else:
        pytest.fail(f"stage {stage} never started")
    response.close()  # what the server does when the client has gone
    after = scrape(client)
    assert delta(before, after, "distill_requests_total", endpoint=STREAM, status="499") == 1
    assert after[("distill_active_requests", ())] == before[("distill_active_requests", ())]
    later = STAGES[STAGES.index(stage):]
    for name in later:  # the stage it left in and every later one never finished
        assert delta(before, after, "distill_stage_duration_seconds_count", stage=name) == 0
    assert live_greenlets() <= greenlets
    assert threading.active_count() <= threads
    assert client.post("/v1/dedupe", json=BODY).status_code == 200
