"""The embedding cache: text -> vector and what it took to make.

Agents and RAG loops resend the same chunks turn after turn, so a text embedded
once should not be embedded again: not by this worker (the memory layer), nor
by another worker, another replica or after a restart (the shared layer behind
it, `pipeline.store`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from . import codec

if TYPE_CHECKING:
    from .embed import Embedder

log = logging.getLogger(__name__)

MEMORY, DISK, REDIS = "memory", "disk", "redis"  # the layers, as metrics name them
FAULT_LOG_INTERVAL_S = 60.0  # a failing store logs once a minute, not once a request
REST_AFTER_FAULT_S = 5.0  # a store that failed (down, slow, unwritable) is left alone this long


class Embedded(NamedTuple):
    """A text's vector and what it took: its model inputs (windows) and tokens; for a
    sentence, optionally its per-token states ((tokens, d) int16)."""

    vector: np.ndarray
    windows: int
    tokens: int
    states: np.ndarray | None = None


class CacheEvents(Protocol):
    """Where the cache reports what it did (the service counts these as metrics)."""

    def lookups(self, layer: str, hits: int, misses: int) -> None: ...

    def faults(self, layer: str, count: int) -> None: ...


class NoEvents:
    def lookups(self, layer: str, hits: int, misses: int) -> None:
        pass

    def faults(self, layer: str, count: int) -> None:
        pass


class StoreRebuilt(Exception):
    """A store found its files damaged, set them aside and started afresh: a fault
    (counted, logged), but nothing to wait for."""


class SharedStore(Protocol):
    """A store of value bytes by key bytes that other processes read too (`pipeline.store`).
    Any exception it raises is a fault: the cache answers as if it had missed."""

    layer: str

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]: ...

    def put_many(self, values: dict[bytes, bytes]) -> None: ...


class EmbeddingCache:
    """A bounded LRU of text -> `Embedded` in this process, in front of an optional
    shared store.

    It holds whole texts, the windows of long ones and the sentences the coverage
    guard compares, so a chunk seen before costs nothing and one that shares
    sentences with it pays only for the rest. Safe for determinism because the
    model gives bit-identical vectors for a text whatever batch it is in (a test
    checks this), values round-trip the store bit for bit, and nothing a response
    says depends on what was cached. The memory layer is bounded by bytes: each
    entry counts its text, its arrays and the bookkeeping around them.
    Thread-safe: embedding batches run on a thread pool.
    """

    ENTRY_OVERHEAD = 300  # bytes per entry beyond text and arrays: dict slot, tuple, array header

    def __init__(self, max_bytes: int, shared: SharedLayer | None = None, events: CacheEvents | None = None):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.shared = shared
        self.events = events or NoEvents()
        self._entries: OrderedDict[str, Embedded] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, texts: Sequence[str]) -> dict[str, Embedded]:
        found = {}
        with self._lock:
            for text in texts:
                entry = self._entries.get(text)
                if entry is not None:
                    self._entries.move_to_end(text)
                    found[text] = entry
        self.events.lookups(MEMORY, len(found), len(texts) - len(found))
        if self.shared is not None and len(found) < len(texts):
            from_store = self.shared.get_many([t for t in dict.fromkeys(texts) if t not in found])
            self._remember(from_store)
            found.update(from_store)
        return found

    def put_many(self, entries: dict[str, Embedded]) -> None:
        """Keep the entries here and in the shared store. What this process holds already is
        in the store (it answered it, or it was written when first put), unless the entry
        now brings token states the one held lacked."""
        with self._lock:
            new = {text: entry for text, entry in entries.items() if _adds_to(self._entries.get(text), entry)}
        self._remember(entries)
        if self.shared is not None and new:
            self.shared.put_many(new)

    def _remember(self, entries: dict[str, Embedded]) -> None:
        with self._lock:
            for text, entry in entries.items():
                size = self._size(text, entry)
                if size > self.max_bytes:
                    continue
                if text in self._entries:
                    self.bytes -= self._size(text, self._entries[text])
                self._entries[text] = entry
                self._entries.move_to_end(text)
                self.bytes += size
            while self.bytes > self.max_bytes:
                text, entry = self._entries.popitem(last=False)
                self.bytes -= self._size(text, entry)

    def _size(self, text: str, entry: Embedded) -> int:
        states = 0 if entry.states is None else entry.states.nbytes
        return sys.getsizeof(text) + entry.vector.nbytes + states + self.ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)


def _adds_to(held: Embedded | None, entry: Embedded) -> bool:
    return held is None or (held.states is None and entry.states is not None)


class SharedLayer:
    """A shared store seen as text -> `Embedded`: keys are digests of the model's identity
    and the text, values `codec` bytes. Every fault (the store down, slow, damaged, a value
    that does not decode) is a miss: counted, logged at most once a minute, and answered
    by the model. After a fault the store rests a few seconds, so a hung server costs one
    timeout, not one per lookup. Without a model identity (an embedder whose files cannot
    be hashed) the layer stays unused: old vectors must never answer for another model.
    """

    def __init__(self, store: SharedStore, identity: Callable[[], bytes | None], events: CacheEvents | None = None):
        self.store, self.layer = store, store.layer
        self.events = events or NoEvents()
        self._identity_of = identity
        self._identity: bytes | None = None
        self._identity_known = False
        self._resting_until = 0.0
        self._last_logged = -FAULT_LOG_INTERVAL_S

    def get_many(self, texts: Sequence[str]) -> dict[str, Embedded]:
        keys = self._keys(texts)
        if keys is None:
            return {}
        try:
            values = self.store.get_many(list(keys))
        except Exception as exc:
            self._fault(exc)
            return {}
        found = {}
        for key, value in values.items():
            entry = codec.decode(key, value)
            if entry is not None:
                found[keys[key]] = Embedded(*entry)
        if len(found) < len(values):
            self._fault(codec.Undecodable(f"{len(values) - len(found)} stored value(s) did not decode"),
                        count=len(values) - len(found), rest=False)
        self.events.lookups(self.layer, len(found), len(texts) - len(found))
        return found

    def put_many(self, entries: dict[str, Embedded]) -> None:
        keys = self._keys(list(entries))
        if keys is None:
            return
        try:
            self.store.put_many({key: codec.encode(key, entries[text]) for key, text in keys.items()})
        except Exception as exc:
            self._fault(exc)

    def _keys(self, texts: Sequence[str]) -> dict[bytes, str] | None:
        """Each text's key (None: the store is resting, or has no model identity to key by)."""
        if time.monotonic() < self._resting_until:
            return None
        identity = self._model_identity()
        if identity is None:
            return None
        return {codec.key(identity, text): text for text in texts}

    def _model_identity(self) -> bytes | None:
        """Computed on first use (it loads and hashes the model); two threads that ask at
        once both compute the same digest, which is cheaper than a lock across the event
        loop's thread and the CPU pool's."""
        if not self._identity_known:
            try:
                identity = self._identity_of()
            except Exception as exc:
                self._fault(exc)
                return None
            self._identity, self._identity_known = identity, True
            if identity is None:
                log.info("embedding cache: the model's files are not known; the %s store is not used", self.layer)
        return self._identity

    def _fault(self, exc: Exception, count: int = 1, rest: bool = True) -> None:
        self.events.faults(self.layer, count)
        now = time.monotonic()
        if rest and not isinstance(exc, StoreRebuilt):
            self._resting_until = now + REST_AFTER_FAULT_S
        if now - self._last_logged >= FAULT_LOG_INTERVAL_S:
            self._last_logged = now
            log.warning(
                "embedding cache: %s store fault (%s: %s); answered from the model "
                "(faults of the next minute counted, not logged)", self.layer, type(exc).__name__, exc,
            )


def tokens_to_embed(texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache | None) -> int:
    """How many tokens the texts hold: from the cache where it knows, else counted.
    (The same number either way: what a request may ask does not depend on the cache.)"""
    found = cache.get_many(texts) if cache is not None else {}
    rest = [text for text in texts if text not in found]
    return sum(entry.tokens for entry in found.values()) + sum(embedder.count_tokens(rest))
