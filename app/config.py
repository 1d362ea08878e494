"""Configuration, read once from the environment and validated at start-up.

`gunicorn.conf.py` calls `load_config()` in the master before any worker
forks, so a bad value stops the server at once with one line naming the
variable, instead of workers crashing in a restart loop.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping
from urllib.parse import urlsplit

from pipeline.cache import CacheEvents, EmbeddingCache, SharedLayer
from pipeline.codec import model_identity
from pipeline.embed import BUNDLED_MODEL, Embedder
from pipeline.profiles import coverage_threshold, model_threshold
from pipeline.runner import Defaults
from pipeline.store import open_store

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A bad environment value; the message names the variable."""


@dataclass(frozen=True)
class Config:
    api_keys: tuple[str, ...] = ()
    threshold: float = 0.15
    lambda_: float = 0.5
    model_threshold: float | None = None  # None: the model's calibrated value
    embedding_model: str = BUNDLED_MODEL
    embed_cache_mb: int = 64  # per worker: ~40,000 sentences or short chunks (0: off)
    max_chunks: int = 10_000
    max_tokens: int = 1_000_000  # tokens to embed per request: ~4 MB of text, ~1 min of model time
    max_body_bytes: int = 64 * MIB
    max_inflight_bytes: int = 512 * MIB  # per worker: bodies taken in and not yet answered
    sse_heartbeat_s: float = 10.0
    cache_url: str = ""  # the shared embedding store: "" the disk store, "none" no store, or redis[s]://
    cache_dir: str = ""  # the disk store's directory ("": the user's cache directory, in distill/)
    cache_disk_mb: int = 1024  # the disk store's files: ~600,000 windows or short texts
    cache_ttl_s: int = 86_400  # Redis: an entry expires a day after it was last used


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build a `Config` from environment variables (unset or empty: the default)."""
    env = os.environ if env is None else env
    defaults = Config()

    def read(name: str, parse: Callable[[str], object], default):
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r}: {exc}") from None

    return Config(
        api_keys=read("DISTILL_API_KEYS", _keys, ()),
        threshold=read("DISTILL_THRESHOLD", _bounded(0, 2, open_low=True), defaults.threshold),
        lambda_=read("DISTILL_LAMBDA", _bounded(0, 1, open_low=True), defaults.lambda_),
        model_threshold=read("DISTILL_MODEL_THRESHOLD", _bounded(0, 2, open_low=True), None),
        embedding_model=read("DISTILL_EMBEDDING_MODEL", str, defaults.embedding_model),
        embed_cache_mb=read("DISTILL_EMBED_CACHE_MB", _count, defaults.embed_cache_mb),
        max_chunks=read("DISTILL_MAX_CHUNKS", _positive_int, defaults.max_chunks),
        max_tokens=read("DISTILL_MAX_TOKENS", _positive_int, defaults.max_tokens),
        max_body_bytes=read("DISTILL_MAX_BODY_BYTES", _positive_int, defaults.max_body_bytes),
        max_inflight_bytes=read(
            "DISTILL_MAX_INFLIGHT_BYTES", _positive_int, defaults.max_inflight_bytes
        ),
        sse_heartbeat_s=read(
            "DISTILL_SSE_HEARTBEAT_S", _bounded(0, 3600, open_low=True), defaults.sse_heartbeat_s
        ),
        cache_url=_cache_url(env.get("DISTILL_CACHE_URL", "").strip()),
        cache_dir=read("DISTILL_CACHE_DIR", str, defaults.cache_dir),
        cache_disk_mb=read("DISTILL_CACHE_DISK_MB", _positive_int, defaults.cache_disk_mb),
        cache_ttl_s=read("DISTILL_CACHE_TTL_S", _positive_int, defaults.cache_ttl_s),
    )


def request_defaults(config: Config) -> Defaults:
    """What a request leaves open, as every front end (HTTP, MCP) resolves it."""
    return Defaults(
        go_threshold=config.threshold,
        model_threshold=config.model_threshold or model_threshold(config.embedding_model),
        lambda_=config.lambda_,
        coverage_threshold=coverage_threshold(config.embedding_model),
    )


def embedding_cache(config: Config, embedder: Embedder, events: CacheEvents | None = None) -> EmbeddingCache:
    """The embedding cache every front end (HTTP, MCP) builds: this process's memory in
    front of the store `DISTILL_CACHE_URL` names."""
    store = open_store(config.cache_url, config.cache_dir, config.cache_disk_mb * MIB, config.cache_ttl_s)
    shared = SharedLayer(store, partial(model_identity, embedder), events) if store is not None else None
    return EmbeddingCache(config.embed_cache_mb * MIB, shared, events)


def _cache_url(raw: str) -> str:
    """"" (the disk store), "none", or redis[s]://[[user]:password@]host[:port][/db]; the
    error names the variable and hides a password the URL holds. (Checked here rather
    than by redis-py, whose import in gunicorn's master would precede gevent's patching.)"""
    if raw.lower() in ("", "none"):
        return raw.lower()
    try:
        parts = urlsplit(raw)
        shown = raw.replace(parts.password, "***") if parts.password else raw
    except ValueError:
        raise ConfigError(f"DISTILL_CACHE_URL: {_URL_FORM}") from None
    try:
        parts.port  # noqa: B018 (raises ValueError if not a number)
    except ValueError:
        raise ConfigError(f"DISTILL_CACHE_URL={shown!r}: the port must be a number") from None
    database = parts.path.removeprefix("/")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"DISTILL_CACHE_URL={shown!r}: {_URL_FORM}")
    if database and not database.isdigit():
        raise ConfigError(f"DISTILL_CACHE_URL={shown!r}: the database must be a number, not {database!r}")
    return raw


_URL_FORM = "must be unset, 'none', or redis[s]://[[user]:password@]host[:port][/db]"


def _keys(raw: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ValueError("no key in the list")
    return keys


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _bounded(low: float, high: float, open_low: bool) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or value > high:
            bracket = "(" if open_low else "["
            raise ValueError(f"must be a number in {bracket}{low}, {high}]")
        return value

    return parse
