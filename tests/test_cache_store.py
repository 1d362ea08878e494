"""The shared embedding cache's parts: the value codec, keys, the disk store (SQLite),
the Redis store (a real redis-server) and the layer that turns their faults into misses."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from app.config import Config, ConfigError, load_config
from pipeline import codec
from pipeline.cache import DISK, MEMORY, REDIS, Embedded, EmbeddingCache, SharedLayer, StoreRebuilt
from pipeline.store import DiskStore, RedisStore, open_store

from .support import ROOT, FaultInjectingModel, RedisServer, free_port

KEY = codec.key(b"i" * 32, "some text")
RNG = np.random.default_rng(7)


def entry(dim: int = 384, tokens: int = 12, states: bool = True) -> Embedded:
    vector = RNG.standard_normal(dim).astype(np.float32)
    grid = RNG.integers(-32768, 32767, size=(tokens, dim), dtype=np.int16) if states else None
    return Embedded(vector, 3, tokens, grid)


def same(a: Embedded, b: Embedded) -> bool:
    """Field by field, arrays by dtype, shape and bytes."""
    arrays_match = all(
        (x is None and y is None)
        or (x is not None and y is not None and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes())
        for x, y in ((a.vector, b.vector), (a.states, b.states))
    )
    return arrays_match and (a.windows, a.tokens) == (b.windows, b.tokens)


class Events:
    """Records what the cache reports."""

    def __init__(self):
        self.hits, self.misses, self.errors = {}, {}, {}

    def lookups(self, layer, hits, misses):
        self.hits[layer] = self.hits.get(layer, 0) + hits
        self.misses[layer] = self.misses.get(layer, 0) + misses

    def faults(self, layer, count):
        self.errors[layer] = self.errors.get(layer, 0) + count


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("states", [True, False])
def test_a_value_round_trips_every_field_exactly(states):
    original = entry(states=states)
    decoded = codec.decode(KEY, codec.encode(KEY, original))
    assert decoded is not None and same(Embedded(*decoded), original)
    assert decoded.vector.flags.writeable and decoded.vector.flags.aligned
    assert (decoded.states is None) is (not states)


def test_special_floats_and_empty_states_round_trip():
    vector = np.array([np.nan, -0.0, np.inf, 1e-45, -np.inf], dtype=np.float32)
    original = Embedded(vector, 1, 0, np.zeros((0, 5), dtype=np.int16))
    decoded = Embedded(*codec.decode(KEY, codec.encode(KEY, original)))
    assert same(decoded, original)


def test_anything_else_does_not_decode():
    value = codec.encode(KEY, entry())
    flipped = bytearray(value)
    flipped[len(value) // 2] ^= 1
    other_key = codec.key(b"i" * 32, "another text")
    for bad in (b"", b"DXE1", value[:-1], value + b"\0", bytes(flipped), b"\0" * len(value)):
        assert codec.decode(KEY, bad) is None
    assert codec.decode(other_key, value) is None  # filed under the wrong key


@pytest.mark.parametrize(
    "bad",
    [
        Embedded(np.zeros(4, dtype=np.float64), 1, 1),
        Embedded(np.zeros((2, 4), dtype=np.float32), 1, 1),
        Embedded(np.zeros(4, dtype=np.float32), 1, 1, np.zeros((2, 4), dtype=np.int32)),
        Embedded(np.zeros(4, dtype=np.float32), 1, 1, np.zeros(8, dtype=np.int16)),
    ],
)
def test_arrays_of_another_kind_are_refused_not_converted(bad):
    with pytest.raises(ValueError):
        codec.encode(KEY, bad)


def test_keys_hold_neither_the_text_nor_another_models_entries():
    text = "a secret sentence"
    key = codec.key(b"a" * 32, text)
    assert len(key) == 32 and text.encode() not in key
    assert key != codec.key(b"b" * 32, text) and key != codec.key(b"a" * 32, text + " ")
    assert codec.key(b"a" * 32, "\ud800") != codec.key(b"a" * 32, "\udc00")  # lone surrogates too


def test_the_model_identity_hashes_the_model_files(embedder):
    files = codec.model_files(embedder)
    assert [f.suffix for f in files] == [".onnx", ".json"] and all(f.is_file() for f in files)
    identity = codec.model_identity(embedder)
    assert len(identity) == 32 and identity == codec.model_identity(embedder)
    assert codec.model_identity(FaultInjectingModel(embedder)) is None  # files unknown: nothing shared


# --------------------------------------------------------------------------- memory layer


def test_the_memory_bound_counts_the_states():
    cache = EmbeddingCache(10**6)
    cache.put_many({"s": entry(tokens=100)})
    assert cache.bytes >= 100 * 384 * 2 + 384 * 4


# --------------------------------------------------------------------------- disk store


def test_processes_sharing_a_directory_see_each_others_entries(tmp_path):
    writer, reader = DiskStore(tmp_path, 1 << 20), DiskStore(tmp_path, 1 << 20)
    writer.put_many({b"k1": b"v1", b"k2": b"v2"})
    assert reader.get_many([b"k1", b"k2", b"k3"]) == {b"k1": b"v1", b"k2": b"v2"}


def test_disk_use_stays_under_the_bound_least_recently_used_out(tmp_path):
    now = [1_000_000.0]
    store = DiskStore(tmp_path, 2 << 20, clock=lambda: now[0])
    value = os.urandom(2000)
    store.put_many({b"first": value})
    for batch in range(40):
        now[0] += 120  # past the minute a read needs to count as a use
        store.get_many([b"first"])
        store.put_many({f"{batch}-{i}".encode(): value for i in range(50)})
        size = sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file())
        assert size <= 2 << 20, f"{size} bytes after {batch + 1} batches"
    assert store.get_many([b"first"]) == {b"first": value}  # read all along: kept
    assert store.get_many([b"0-0"]) == {}  # written once, long ago: evicted
    assert len(store.get_many([f"39-{i}".encode() for i in range(50)])) == 50


def test_a_file_that_is_not_a_database_is_set_aside_and_rebuilt(tmp_path):
    (tmp_path / DiskStore.FILE).write_bytes(b"not a database, " * 1000)
    store = DiskStore(tmp_path, 1 << 20)
    with pytest.raises(StoreRebuilt):
        store.get_many([b"k"])
    store.put_many({b"k": b"v"})
    assert store.get_many([b"k"]) == {b"k": b"v"}
    assert (tmp_path / "damaged" / DiskStore.FILE).read_bytes().startswith(b"not a database")


def test_a_store_damaged_in_the_middle_answers_right_or_misses(tmp_path, embedder):
    """Every file overwritten in its middle: each lookup gives the stored entry or
    nothing (never other bytes, never an exception), and the store works afterwards."""
    texts = [f"sentence number {i} about harbours" for i in range(300)]
    entries = {t: entry(tokens=8) for t in texts}
    layer = SharedLayer(DiskStore(tmp_path, 64 << 20), lambda: b"m" * 32)
    layer.put_many(entries)
    files = [f for f in tmp_path.iterdir() if f.is_file() and f.stat().st_size > 0]
    assert files
    for f in files:
        with f.open("r+b") as handle:
            handle.seek(f.stat().st_size // 2)
            handle.write(os.urandom(8192))
    events = Events()
    damaged = SharedLayer(DiskStore(tmp_path, 64 << 20), lambda: b"m" * 32, events)
    found = damaged.get_many(texts)
    assert all(same(found[t], entries[t]) for t in found)
    assert len(found) < len(texts) and events.errors.get(DISK, 0) >= 1
    damaged.put_many(entries)
    assert all(same(e, entries[t]) for t, e in damaged.get_many(texts).items())


WRITER = """
import os, sys
from pipeline.store import DiskStore
store = DiskStore(sys.argv[1], 256 << 20)
for n in range(10**6):
    store.put_many({f"{n}-{i}".encode(): os.urandom(3000) + str(n).encode() for i in range(40)})
    print(n, flush=True)
"""


def test_sigkill_mid_write_leaves_a_usable_store(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    committed = [writer.stdout.readline() for _ in range(30)]  # it keeps writing: the kill lands mid-write
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert committed[-1].strip() == "29"
    store = DiskStore(tmp_path, 256 << 20)
    keys = [f"{n}-{i}".encode() for n in range(30) for i in range(40)]
    found = store.get_many(keys)
    assert set(found) == set(keys) and all(v.endswith(k.split(b"-")[0]) for k, v in found.items())
    store.put_many({b"after": b"kill"})
    assert store.get_many([b"after"]) == {b"after": b"kill"}
    check = sqlite3.connect(tmp_path / DiskStore.FILE).execute("PRAGMA integrity_check").fetchone()
    assert check == ("ok",)


def test_an_unwritable_directory_is_a_counted_miss(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    events = Events()
    cache = EmbeddingCache(1 << 20, SharedLayer(DiskStore(blocker / "cache", 1 << 20), lambda: b"m" * 32, events), events)
    cache.put_many({"a": entry()})
    assert set(cache.get_many(["a"])) == {"a"}  # memory still answers
    assert events.errors == {DISK: 1}  # then the store rests instead of failing on every call
    assert cache.get_many(["b"]) == {} and events.errors == {DISK: 1}


# --------------------------------------------------------------------------- layers


def test_layers_answer_in_order_and_fill_the_ones_in_front(tmp_path):
    events = Events()
    identity = lambda: b"m" * 32  # noqa: E731
    first = EmbeddingCache(1 << 20, SharedLayer(DiskStore(tmp_path, 1 << 20), identity, events), events)
    second = EmbeddingCache(1 << 20, SharedLayer(DiskStore(tmp_path, 1 << 20), identity, events), events)
    stored = {"a": entry(), "b": entry(states=False)}
    first.put_many(stored)
    found = second.get_many(["a", "b", "c"])
    assert set(found) == {"a", "b"} and all(same(found[t], stored[t]) for t in found)
    assert (events.hits, events.misses) == ({MEMORY: 0, DISK: 2}, {MEMORY: 3, DISK: 1})
    second.get_many(["a"])
    assert events.hits[MEMORY] == 1 and events.hits[DISK] == 2  # now in memory


def test_an_entry_that_brings_token_states_is_written_again(tmp_path):
    identity = lambda: b"m" * 32  # noqa: E731
    writer = EmbeddingCache(1 << 20, SharedLayer(DiskStore(tmp_path, 1 << 20), identity))
    plain = entry(states=False)
    with_states = Embedded(plain.vector, 1, 12, entry().states)
    writer.put_many({"s": plain})
    writer.put_many({"s": with_states})  # the sentence, now with its states
    writer.put_many({"s": plain})  # held with states: nothing to add
    reader = EmbeddingCache(1 << 20, SharedLayer(DiskStore(tmp_path, 1 << 20), identity))
    assert same(reader.get_many(["s"])["s"], with_states)


def test_an_undecodable_value_is_a_counted_miss(tmp_path):
    store, events = DiskStore(tmp_path, 1 << 20), Events()
    layer = SharedLayer(store, lambda: b"m" * 32, events)
    layer.put_many({"a": entry(), "b": entry()})
    with sqlite3.connect(tmp_path / DiskStore.FILE) as db:  # the same key, other bytes
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (b"garbage", codec.key(b"m" * 32, "a")))
    assert set(layer.get_many(["a", "b"])) == {"b"}
    assert events.errors == {DISK: 1}


def test_without_a_model_identity_nothing_is_stored(tmp_path):
    cache = EmbeddingCache(1 << 20, SharedLayer(DiskStore(tmp_path, 1 << 20), lambda: None))
    cache.put_many({"a": entry()})
    assert not (tmp_path / DiskStore.FILE).exists()


# --------------------------------------------------------------------------- redis store


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def test_redis_entries_round_trip_and_expire_after_their_last_use(redis_server):
    store = RedisStore(redis_server.url, ttl_s=600)
    store.put_many({b"\x01" * 32: b"value"})
    client = redis_server.client()
    (name,) = client.keys("distill:embedding:*")
    assert name == b"distill:embedding:" + (b"01" * 32)
    client.expire(name, 5)
    assert store.get_many([b"\x01" * 32, b"\x02" * 32]) == {b"\x01" * 32: b"value"}
    assert 590 < client.ttl(name) <= 600  # the read renewed it


def test_redis_reads_are_one_round_trip_per_call(redis_server):
    store = RedisStore(redis_server.url, ttl_s=600)
    keys = [bytes([i]) * 32 for i in range(200)]
    store.put_many({k: b"v" for k in keys})
    client = redis_server.client()
    before = client.info("clients")["connected_clients"], client.info("stats")["total_commands_processed"]
    assert len(store.get_many(keys)) == 200
    after = client.info("stats")["total_commands_processed"]
    assert after - before[1] == 200 + 1  # 200 GETEX (+ this INFO), sent as one pipeline


def test_a_full_redis_is_a_counted_miss(redis_server):
    client = redis_server.client()
    client.config_set("maxmemory", "1mb")
    client.config_set("maxmemory-policy", "noeviction")
    events = Events()
    layer = SharedLayer(RedisStore(redis_server.url, ttl_s=600), lambda: b"m" * 32, events)
    layer.put_many({f"t{i}": entry(tokens=200) for i in range(20)})  # ~3 MB
    assert events.errors == {REDIS: 1}


def test_redis_down_is_a_counted_miss_and_rests(redis_server):
    events = Events()
    cache = EmbeddingCache(0, SharedLayer(RedisStore(redis_server.url, ttl_s=600), lambda: b"m" * 32, events), events)
    cache.put_many({"a": entry()})
    assert set(cache.get_many(["a"])) == {"a"}
    redis_server.kill()
    assert cache.get_many(["a"]) == {} and events.errors == {REDIS: 1}
    assert cache.get_many(["a"]) == {} and events.errors == {REDIS: 1}  # resting: not asked again


def test_a_redis_that_does_not_answer_costs_one_bounded_wait():
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never replies
    try:
        events = Events()
        layer = SharedLayer(RedisStore(f"redis://127.0.0.1:{silent.getsockname()[1]}", ttl_s=60), lambda: b"m" * 32, events)
        assert layer.get_many(["a"]) == {}
        assert events.errors == {REDIS: 1}
    finally:
        silent.close()


# --------------------------------------------------------------------------- configuration


def test_the_cache_variables_and_their_defaults():
    assert load_config({}) == Config()
    assert (Config().cache_url, Config().cache_dir, Config().cache_disk_mb, Config().cache_ttl_s) == (
        "", "", 1024, 86_400,
    )
    config = load_config({
        "DISTILL_CACHE_URL": "rediss://:pw@cache.internal:6380/2", "DISTILL_CACHE_DIR": "/var/cache/distill",
        "DISTILL_CACHE_DISK_MB": "64", "DISTILL_CACHE_TTL_S": "3600",
    })
    assert (config.cache_url, config.cache_dir, config.cache_disk_mb, config.cache_ttl_s) == (
        "rediss://:pw@cache.internal:6380/2", "/var/cache/distill", 64, 3600,
    )
    assert load_config({"DISTILL_CACHE_URL": "None"}).cache_url == "none"


@pytest.mark.parametrize(
    "name, value",
    [
        ("DISTILL_CACHE_URL", "memcached://localhost"),
        ("DISTILL_CACHE_URL", "localhost:6379"),
        ("DISTILL_CACHE_URL", "redis://"),
        ("DISTILL_CACHE_URL", "redis://localhost:port"),
        ("DISTILL_CACHE_URL", "redis://localhost/zero"),
        ("DISTILL_CACHE_DISK_MB", "0"),
        ("DISTILL_CACHE_DISK_MB", "1GB"),
        ("DISTILL_CACHE_TTL_S", "-1"),
    ],
)
def test_a_bad_cache_variable_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=f"^{name}="):
        load_config({name: value})


def test_a_refused_url_does_not_show_its_password():
    with pytest.raises(ConfigError) as refused:
        load_config({"DISTILL_CACHE_URL": "redis://:hunter2@localhost/zero"})
    assert "hunter2" not in str(refused.value)


def test_the_disk_store_defaults_to_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert open_store("", "", 1 << 20, 60).directory == tmp_path / "distill"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_store("", "", 1 << 20, 60).directory == tmp_path / ".cache" / "distill"


def test_the_url_chooses_the_store(tmp_path):
    assert open_store("none", str(tmp_path), 1 << 20, 60) is None
    assert isinstance(open_store("", str(tmp_path), 1 << 20, 60), DiskStore)
    assert isinstance(open_store(f"redis://127.0.0.1:{free_port()}", str(tmp_path), 1 << 20, 60), RedisStore)
    assert not any(tmp_path.iterdir())  # opened lazily: nothing written yet


def test_the_mcp_server_and_the_http_app_build_the_same_cache(embedder, tmp_path):
    from app import create_app
    from app.mcp_server import DistillTools

    config = Config(cache_dir=str(tmp_path), cache_disk_mb=64)
    caches = [DistillTools(config, embedder=embedder).cache, create_app(config, embedder=embedder).extensions["distill"].cache]
    for cache in caches:
        assert isinstance(cache.shared.store, DiskStore) and cache.shared.store.directory == tmp_path
        assert cache.max_bytes == config.embed_cache_mb << 20
    redis_config = Config(cache_url=f"redis://127.0.0.1:{free_port()}/0", cache_ttl_s=120)
    assert DistillTools(redis_config, embedder=embedder).cache.shared.store.ttl_s == 120
    assert DistillTools(Config(cache_url="none"), embedder=embedder).cache.shared is None
