"""Prometheus through a real 2-worker gunicorn: a scrape is the sum over workers,
and every query of the Go service's Grafana dashboard finds its series."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .support import Server

pytestmark = pytest.mark.e2e

BODY = {
    "chunks": [
        {"id": "a", "text": "A plane is taking off.", "score": 0.9},
        {"id": "b", "text": "An air plane is taking off.", "score": 0.8},
        {"id": "c", "text": "A man is playing a flute.", "score": 0.5},
    ]
}
ROUND = 8


def serving_pids(server: Server) -> set[str]:
    """Pids of the workers whose access-log lines show a POST."""
    return {
        line.split("[")[2].split("]")[0]
        for line in server.output().splitlines()
        if "POST /v1/dedupe" in line
    }


@pytest.fixture(scope="module")
def traffic():
    """Known traffic that reached both workers, then one scrape.

    Which worker accepts a connection is the kernel's choice, so requests go
    in concurrent rounds until both have answered (bounded); the counts
    asserted are the ones sent.
    """
    server = Server(WEB_CONCURRENCY="2").start()
    sent = 0
    try:
        with ThreadPoolExecutor(ROUND) as pool:
            while len(serving_pids(server)) < 2 and sent < 50 * ROUND:
                statuses = list(pool.map(lambda _: server.post("/v1/dedupe", BODY)[0], range(ROUND)))
                assert statuses == [200] * ROUND
                sent += ROUND
        conn, response = server.open_stream(BODY)
        response.read()
        conn.close()
        assert server.post("/v1/dedupe", {"chunks": []})[0] == 400
        for _ in range(600):  # a stream is counted once its worker has closed it, just after its last byte
            samples = server.metrics()
            if samples.get(("distill_active_requests", ()), 0) == 0:
                break
        pids = serving_pids(server)
    finally:
        server.stop()
    return samples, pids, sent


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **match) -> float:
    """Sum over every series of `name` whose labels include `match` (PromQL's sum)."""
    return sum(
        v for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def test_requests_from_both_workers_are_summed(traffic):
    samples, pids, sent = traffic
    assert len(pids) == 2, "the traffic should have reached both workers"
    assert value(samples, "distill_requests_total", endpoint="/v1/dedupe", status="200") == sent
    assert value(samples, "distill_requests_total", endpoint="/v1/dedupe", status="400") == 1
    assert value(samples, "distill_requests_total", endpoint="/v1/dedupe/stream", status="200") == 1
    assert value(samples, "distill_chunks_processed_total", direction="input") == 3 * (sent + 1)
    assert value(samples, "distill_chunks_processed_total", direction="output") == 2 * (sent + 1)
    assert value(samples, "distill_clusters_formed_total", endpoint="/v1/dedupe") == 2 * sent
    assert value(samples, "distill_embedded_texts_total") == 3 * (sent + 1)
    assert value(samples, "distill_active_requests") == 0


def test_every_dashboard_query_finds_non_zero_series(traffic):
    samples, _, sent = traffic
    # distill_active_requests: the series exists (it is 0 when idle).
    assert ("distill_active_requests", ()) in samples
    # histogram_quantile(..., sum(rate(distill_reduction_ratio_bucket[5m])) by (le))
    assert total(samples, "distill_reduction_ratio_count") == sent + 1
    assert total(samples, "distill_reduction_ratio_bucket", le="+Inf") == sent + 1
    # histogram_quantile(..., sum(rate(distill_request_duration_seconds_bucket[5m])) by (le, endpoint))
    for endpoint in ("/v1/dedupe", "/v1/dedupe/stream"):
        assert total(samples, "distill_request_duration_seconds_bucket", endpoint=endpoint, le="+Inf") > 0
    # sum(rate(distill_chunks_processed_total[5m])) by (direction)
    assert total(samples, "distill_chunks_processed_total", direction="input") > 0
    assert total(samples, "distill_chunks_processed_total", direction="output") > 0
    # sum(rate(distill_clusters_formed_total[5m])) by (endpoint)
    assert total(samples, "distill_clusters_formed_total") > 0
    # sum(rate(distill_requests_total[5m])) by (endpoint) / by (status) / total
    assert total(samples, "distill_requests_total") >= sent + 2
    assert {dict(l)["status"] for (n, l) in samples if n == "distill_requests_total"} >= {"200", "400"}
    # sum(rate(distill_requests_total{status=~"5.."}[5m])): the label exists to match on
    assert all("status" in dict(l) for (n, l) in samples if n == "distill_requests_total")
    # beyond: per-stage durations
    for stage in ("embedding", "clustering", "selection"):
        assert total(samples, "distill_stage_duration_seconds_count", stage=stage) == sent + 1
