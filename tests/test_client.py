"""The Python client (`client/`, `distill_client`) against a real gunicorn."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest

from distill_client import (AsyncDistillClient, Chunk, CompleteEvent, DistillClient, DistillError, Explain,
                            ProgressEvent)
from distill_client._types import parse_result
from distill_client._wire import SSEDecoder, build_body, retry_wait

from .client_support import REACT, BusyFront
from .support import ROOT, Server, free_port

pytestmark = pytest.mark.e2e

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server():
    running = Server(WEB_CONCURRENCY="1", DISTILL_API_KEYS=KEY).start()
    yield running
    running.stop()


@pytest.fixture
def distill(server):
    with DistillClient(f"http://127.0.0.1:{server.port}", api_key=KEY) as client:
        yield client


def raw_answer(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.port}{path}", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def without_latency(raw) -> dict:
    return {**raw, "stats": {**raw["stats"], "latency_ms": 0}}


def test_dedupe_returns_the_service_answer_typed(server, distill):
    result = distill.dedupe(REACT, target_k=3)
    expected = raw_answer(server, "/v1/dedupe", {"chunks": REACT, "target_k": 3}).json()
    assert without_latency(result.raw) == without_latency(expected)
    assert [(c.id, c.text, c.score, c.cluster_id) for c in result.chunks] == [
        (c["id"], c["text"], c["score"], c["cluster_id"]) for c in expected["chunks"]]
    assert result.stats.input_count == 5 and result.stats.output_count == len(expected["chunks"]) == 3
    assert result.stats.cluster_count == expected["stats"]["cluster_count"]
    assert result.stats.reduction_pct == 40
    assert result.explain is None and result.stats.cache_prefix_frozen is None


def test_options_reach_the_service(distill):
    kept = distill.dedupe(REACT, threshold=2.0, guards=[], linkage="single")
    assert len(kept.chunks) == 1  # threshold 2 without guards merges everything
    relevant = distill.dedupe(REACT, target_k=1, lambda_=1.0, query="quarterly revenue growth")
    assert relevant.chunks[0].text.startswith("Revenue rose")  # relevance to the query, not the best score


def test_numpy_vectors_travel_as_base64_with_the_answer_of_lists(distill):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(6, 384)).astype(np.float32)
    vectors[3] = vectors[0] + 0.01 * rng.normal(size=384)  # a near-duplicate of chunk 0
    as_arrays = [Chunk(id=str(i), text=f"chunk {i}", embedding=v) for i, v in enumerate(vectors)]
    as_lists = [{"id": str(i), "text": f"chunk {i}", "embedding": v.tolist()} for i, v in enumerate(vectors)]
    assert isinstance(build_body(as_arrays)["chunks"][0]["embedding"], str)
    with_arrays, with_lists = distill.dedupe(as_arrays), distill.dedupe(as_lists)
    assert without_latency(with_arrays.raw) == without_latency(with_lists.raw)
    assert [c.id for c in with_arrays.chunks] == ["0", "1", "2", "4", "5"]
    query = distill.dedupe(as_arrays, target_k=1, lambda_=1.0, query_embedding=vectors[4])
    assert [c.id for c in query.chunks] == ["4"]


def test_on_progress_uses_the_stream_and_returns_the_same_answer(distill):
    seen: list[ProgressEvent] = []
    result = distill.dedupe(REACT, target_k=3, on_progress=seen.append)
    stages = list(dict.fromkeys(e.stage for e in seen))
    assert stages == ["embedding", "clustering", "selection", "mmr"]
    for stage in stages:
        own = [e for e in seen if e.stage == stage]
        assert own[0].progress == 0 and own[-1].progress == 1 and own[-1].stats is not None
    assert without_latency(result.raw) == without_latency(distill.dedupe(REACT, target_k=3).raw)


def test_stream_yields_typed_progress_then_one_completion(distill):
    events = list(distill.stream(REACT))
    assert all(isinstance(e, ProgressEvent) for e in events[:-1])
    assert isinstance(events[-1], CompleteEvent)
    clustering = [e for e in events if isinstance(e, ProgressEvent) and e.stage == "clustering"][-1]
    assert clustering.stats["clusters_formed"] == events[-1].result.stats.cluster_count
    assert [c.id for c in events[-1].result.chunks] == [c.id for c in distill.dedupe(REACT).chunks]


def test_async_client_mirrors_the_sync_one(server, distill):
    async def run():
        seen = []

        async def record(event):
            seen.append(event)

        async with AsyncDistillClient(f"http://127.0.0.1:{server.port}", api_key=KEY) as client:
            plain = await client.dedupe(REACT, target_k=3)
            streamed = await client.dedupe(REACT, target_k=3, on_progress=record)
            events = [e async for e in client.stream(REACT)]
            with pytest.raises(DistillError) as bad:
                await client.dedupe([])
        return plain, streamed, seen, events, bad.value

    plain, streamed, seen, events, error = asyncio.run(run())
    expected = without_latency(distill.dedupe(REACT, target_k=3).raw)
    assert without_latency(plain.raw) == without_latency(streamed.raw) == expected
    assert {e.stage for e in seen} == {"embedding", "clustering", "selection", "mmr"}
    assert isinstance(events[-1], CompleteEvent) and len(events[-1].result.chunks) == 4
    assert error.status == 400


def test_errors_carry_the_status_and_the_server_message(server, distill):
    with pytest.raises(DistillError) as empty:
        distill.dedupe([])
    assert empty.value.status == 400
    assert str(empty.value) == raw_answer(server, "/v1/dedupe", {"chunks": []}).json()["error"]
    with pytest.raises(DistillError) as in_stream:
        list(distill.stream([{"text": "a"}], threshold=5))
    assert in_stream.value.status == 400 and "threshold" in str(in_stream.value)
    for key, message in ((None, "Authorization header required"), ("wrong", "Invalid API key")):
        with DistillClient(f"http://127.0.0.1:{server.port}", api_key=key) as client:
            with pytest.raises(DistillError) as refused:
                client.dedupe(REACT)
        assert (refused.value.status, str(refused.value)) == (401, message)


def test_an_unreachable_server_is_status_0():
    port = free_port()  # nothing listens there
    with DistillClient(f"http://127.0.0.1:{port}", max_retries=0) as client:
        with pytest.raises(DistillError) as unreachable:
            client.dedupe(REACT)
    assert unreachable.value.status == 0 and f"127.0.0.1:{port}" in str(unreachable.value)


def test_503_with_retry_after_is_retried_until_answered(server):
    with BusyFront(server.port, busy=2) as front:
        with DistillClient(front.url, api_key=KEY, max_retries=2) as client:
            assert len(client.dedupe(REACT).chunks) == 4
            assert front.requests == 3
            front.requests = 0
            events = list(client.stream(REACT))
            assert isinstance(events[-1], CompleteEvent) and front.requests == 3

        async def run():
            front.requests = 0
            async with AsyncDistillClient(front.url, api_key=KEY, max_retries=2) as client:
                return await client.dedupe(REACT)

        assert len(asyncio.run(run()).chunks) == 4 and front.requests == 3


def test_503_past_max_retries_is_a_503_with_the_server_message(server):
    with BusyFront(server.port, busy=5) as front:
        with DistillClient(front.url, api_key=KEY, max_retries=1) as client:
            with pytest.raises(DistillError) as busy:
                client.dedupe(REACT)
    assert (busy.value.status, str(busy.value)) == (503, BusyFront.BUSY_MESSAGE)
    assert front.requests == 2


def test_503_without_retry_after_is_not_retried(server):
    with BusyFront(server.port, busy=1, retry_after=None) as front:
        with DistillClient(front.url, api_key=KEY, max_retries=3) as client:
            with pytest.raises(DistillError) as busy:
                client.dedupe(REACT)
    assert busy.value.status == 503 and front.requests == 1


def test_dropped_connections_are_retried(server):
    with BusyFront(server.port, busy=1, mode="drop") as front:
        with DistillClient(front.url, api_key=KEY, max_retries=1) as client:
            assert len(client.dedupe(REACT).chunks) == 4
    assert front.requests == 2
    with BusyFront(server.port, busy=3, mode="drop") as front:
        with DistillClient(front.url, api_key=KEY, max_retries=1) as client:
            with pytest.raises(DistillError) as dropped:
                client.dedupe(REACT)
    assert dropped.value.status == 0 and front.requests == 2


def test_a_stream_that_ends_without_complete_raises(server):
    with BusyFront(server.port, cut_stream=True) as front:
        with DistillClient(front.url, api_key=KEY) as client:
            events = []
            with pytest.raises(DistillError, match="ended before its complete event"):
                for event in client.stream(REACT):
                    events.append(event)
    assert events and all(isinstance(e, ProgressEvent) for e in events)


def test_an_error_event_raises_with_its_stage():
    decoder = SSEDecoder(200)
    assert decoder.feed(": keep-alive") is None
    assert decoder.feed("event: progress") is None
    assert decoder.feed('data: {"stage":"embedding","progress":0.0}') is None
    assert decoder.feed("") == ProgressEvent("embedding", 0.0)
    decoder.feed("event: error")
    decoder.feed('data: {"error":"embedding model unavailable","stage":"embedding"}')
    with pytest.raises(DistillError) as failed:
        decoder.feed("")
    assert (failed.value.status, failed.value.stage, str(failed.value)) == (200, "embedding",
                                                                            "embedding model unavailable")


def test_retry_after_rules():
    busy = httpx.Response(503, headers={"Retry-After": "2"})
    assert retry_wait(0, 2, response=busy) == 2.0
    assert retry_wait(2, 2, response=busy) is None  # attempts used up
    assert retry_wait(0, 2, response=httpx.Response(503, headers={"Retry-After": "3600"})) == 60.0
    dated = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_wait(0, 2, response=dated) == 0.0  # a date in the past: now
    assert retry_wait(0, 2, response=httpx.Response(500, headers={"Retry-After": "1"})) is None
    assert retry_wait(0, 2, error=httpx.ReadTimeout("slow")) is None  # the server may still be working


def test_explain_and_cache_prefix_are_sent_and_read():
    body = build_body([{"text": "a", "cache_control": {"type": "ephemeral"}}], explain=True,
                      preserve_cache_prefix=True)
    assert body["explain"] is True and body["options"] == {"preserve_cache_prefix": True}
    assert body["chunks"][0]["cache_control"] == {"type": "ephemeral"}
    assert "explain" not in build_body([{"text": "a"}]) and "options" not in build_body([{"text": "a"}])
    answer = {  # the shapes SPEC gives for "explain" and the cache-prefix stats
        "chunks": [{"id": "1", "text": "a", "score": 0, "cluster_id": -1}],
        "stats": {"input_count": 2, "output_count": 1, "cluster_count": 1, "reduction_pct": 50, "latency_ms": 1,
                  "cache_prefix_frozen": True, "cache_prefix_tokens": 1, "cache_prefix_hash": "0123456789abcdef",
                  "suffix_input_count": 1, "guarded_by": {"numbers": 0}},
        "explain": {"chunks": [{"index": 0, "id": "1", "cluster_id": -1, "state": "frozen",
                                "kept_index": None, "distance": None}],
                    "guarded_pairs": [{"a": 3, "b": 4, "guard": "numbers"}], "map": [[0.12, -0.5]]},
    }
    result = parse_result(answer)
    assert result.stats.cache_prefix_frozen is True and result.stats.cache_prefix_hash == "0123456789abcdef"
    assert result.stats.suffix_output_count is None and result.stats.guarded_by == {"numbers": 0}
    assert repr(result.stats).endswith("suffix_input_count=1, guarded_by={'numbers': 0})")  # only what was sent
    assert isinstance(result.explain, Explain) and result.explain.chunks[0].state == "frozen"
    assert result.explain.guarded_pairs[0].guard == "numbers" and result.explain.map == [(0.12, -0.5)]


def test_explain_and_cache_prefix_requests_are_accepted(distill):
    marked = [{**REACT[0], "cache_control": {"type": "ephemeral"}}, *REACT[1:]]
    result = distill.dedupe(marked, explain=True, preserve_cache_prefix=True)
    assert result.stats.input_count == 5
    if "explain" in result.raw:  # a service that knows "explain" answers with one row per input
        assert len(result.explain.chunks) == 5


def test_close_and_context_manager(server):
    client = DistillClient(f"http://127.0.0.1:{server.port}", api_key=KEY)
    with client as entered:
        assert entered is client and len(entered.dedupe(REACT).chunks) == 4
    with pytest.raises(RuntimeError, match="closed"):  # httpx refuses a closed client
        client.dedupe(REACT)


def test_the_wheel_holds_only_the_client(tmp_path):
    source = tmp_path / "client"  # a clean copy: no build/ left over from an earlier build
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("distill_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"distill_client", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "distill_client/py.typed" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra" not in line]
    assert sorted(re.match(r"Requires-Dist: ([\w-]+)", r)[1] for r in required) == ["httpx", "tqdm"]
    for extra in ("langchain", "llama-index", "haystack"):
        assert f"Provides-Extra: {extra}" in metadata
