"""The shared embedding cache through real gunicorn servers (2 workers): the disk store
across workers, restarts and damage; Redis across servers and its death; `none`.

"Answered from the cache" is shown by the lookup metrics: a request whose every
text, window and sentence was found in a shared store had nothing to embed.
Which worker accepts a connection is the kernel's choice, so repeats go in
concurrent rounds until both workers have answered (bounded).
"""

from __future__ import annotations

import json
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .support import WORDS, RedisServer, Server

pytestmark = pytest.mark.e2e

ROUND = 6


def chunks(seed: int, n: int = 8) -> list[dict]:
    """n chunks of 12-40 sentences (the longer ones need several model windows),
    every other one a near copy of the one before."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            text = out[-1]["text"].replace(".", "!", 1)
        else:
            sentences = [" ".join(rng.choices(WORDS, k=rng.randint(8, 16))).capitalize() + "." for _ in range(rng.randint(12, 40))]
            text = " ".join(sentences)
        out.append({"id": f"{seed}-{i}", "text": text})
    return out


BODY = {"chunks": chunks(1)}


def answer(server: Server, body: dict = BODY) -> dict:
    status, raw = server.post("/v1/dedupe", body)
    assert status == 200, raw
    result = json.loads(raw)
    result["stats"].pop("latency_ms")
    return result


def lookups(server: Server, layer: str, result: str) -> float:
    return server.metrics().get(
        ("distill_embedding_cache_lookups_total", (("layer", layer), ("result", result))), 0.0
    )


def errors(server: Server, layer: str) -> float:
    return server.metrics().get(("distill_embedding_cache_errors_total", (("layer", layer),)), 0.0)


def serving_pids(server: Server) -> set[str]:
    """Pids of the workers whose access-log lines show a POST."""
    return {line.split("[")[2].split("]")[0] for line in server.output().splitlines() if "POST /v1/dedupe" in line}


@pytest.fixture(scope="module")
def cache_dir():
    with tempfile.TemporaryDirectory(prefix="distill-e2e-cache-") as directory:
        yield directory


@pytest.fixture(scope="module")
def cold(cache_dir):
    """The answer of a server with no cache at all (the reference bytes)."""
    server = Server(WEB_CONCURRENCY="1", DISTILL_CACHE_URL="none", DISTILL_EMBED_CACHE_MB="0").start()
    try:
        return answer(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def first_run(cache_dir, cold):
    """Two workers on the disk store: the body once, then repeats until both workers answered."""
    server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=cache_dir).start()
    try:
        answers = [answer(server)]
        with ThreadPoolExecutor(ROUND) as pool:
            while len(serving_pids(server)) < 2 and len(answers) < 40 * ROUND:
                answers += pool.map(lambda _: answer(server), range(ROUND))
        return answers, len(serving_pids(server)), {
            (layer, result): lookups(server, layer, result) for layer in ("memory", "disk") for result in ("hit", "miss")
        }
    finally:
        server.stop()


def test_the_other_worker_answers_from_the_disk_store(first_run, cold):
    answers, workers, counts = first_run
    assert workers == 2
    assert all(a == cold for a in answers)
    # The first request missed everywhere; the other worker's first found every text in
    # the store (no new misses), and everything after came from memory.
    assert counts["disk", "hit"] > 0
    assert counts["memory", "hit"] > 0


def test_a_restarted_server_finds_everything_on_disk(first_run, cache_dir, cold):
    server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=cache_dir).start()
    try:
        assert answer(server) == cold
        assert lookups(server, "disk", "hit") > 0
        assert lookups(server, "disk", "miss") == 0  # nothing left to embed
        assert errors(server, "disk") == 0
    finally:
        server.stop()


def test_store_files_overwritten_in_the_middle_still_give_the_same_bytes(first_run, cache_dir, cold):
    files = [f for f in Path(cache_dir).iterdir() if f.is_file() and f.stat().st_size > 0]
    assert any(f.name.endswith(".sqlite3") for f in files)
    for f in files:
        with f.open("r+b") as handle:
            handle.seek(f.stat().st_size // 2)
            handle.write(b"\xa5" * 16384)
    server = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_DIR=cache_dir).start()
    try:
        assert answer(server) == cold
        assert server.get("/ready")[0] == 200 and server.get("/health")[0] == 200
        other = {"chunks": chunks(2)}
        expected = answer(server, other)
        with ThreadPoolExecutor(ROUND) as pool:  # the store works again: the other worker finds `other`
            while len(serving_pids(server)) < 2:
                assert all(a == expected for a in pool.map(lambda _: answer(server, other), range(ROUND)))
        assert lookups(server, "disk", "hit") > 0
    finally:
        server.stop()


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def test_a_second_server_answers_from_redis_and_a_dead_redis_is_a_miss(redis_server, cold):
    first = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_URL=redis_server.url).start()
    second = Server(WEB_CONCURRENCY="2", DISTILL_CACHE_URL=redis_server.url).start()
    try:
        assert answer(first) == cold
        assert redis_server.client().keys("distill:embedding:*")
        assert answer(second) == cold
        assert lookups(second, "redis", "hit") > 0 and lookups(second, "redis", "miss") == 0

        redis_server.kill()
        other = {"chunks": chunks(3)}
        assert answer(second, other) == answer(first, other)  # both from the model
        assert answer(second) == cold  # from memory
        assert errors(second, "redis") >= 1 and errors(first, "redis") >= 1
        for server in (first, second):
            assert server.get("/ready")[0] == 200 and server.get("/health")[0] == 200
    finally:
        first.stop()
        second.stop()


def test_cache_url_none_writes_nothing(cold, tmp_path):
    server = Server(WEB_CONCURRENCY="1", DISTILL_CACHE_URL="none", DISTILL_CACHE_DIR=str(tmp_path / "cache"),
                    XDG_CACHE_HOME=str(tmp_path / "xdg")).start()
    try:
        assert answer(server) == cold
        assert answer(server) == cold
        assert lookups(server, "memory", "hit") > 0
        assert lookups(server, "disk", "miss") == 0 and lookups(server, "disk", "hit") == 0
    finally:
        server.stop()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg" / "distill").exists()


@pytest.mark.parametrize("url", ["memcached://localhost:11211", "redis://localhost:port", "/var/cache/distill"])
def test_a_bad_cache_url_stops_gunicorn_at_once(url):
    finished = Server(DISTILL_CACHE_URL=url).run_until_exit()
    assert finished.returncode == 2
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DISTILL_CACHE_URL" in lines[0] and "Traceback" not in finished.stderr
