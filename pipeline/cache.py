"""The per-process embedding cache: text -> vector and what it took to make.

Agents and RAG loops resend the same chunks turn after turn, so a text embedded
once should not be embedded again.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from .embed import Embedder


class Embedded(NamedTuple):
    """A text's vector and what it took: its model inputs (windows) and tokens."""

    vector: np.ndarray
    windows: int
    tokens: int


class EmbeddingCache:
    """A bounded LRU of text -> `Embedded`, shared by the requests of one process.

    Agents and RAG loops resend the same chunks turn after turn; a hit skips
    the model (milliseconds per text) and the tokenizer. It holds whole texts,
    the windows of long ones and the sentences the coverage guard compares, so
    a chunk seen before costs nothing and one that shares sentences with it pays
    only for the rest. Safe for determinism because the model gives bit-identical
    vectors for a text whatever batch it is in (a test checks this), and nothing
    a response says depends on what was cached. Bounded by bytes: each entry
    counts its text, its vector and the bookkeeping around them.
    Thread-safe: embedding batches run on a thread pool.
    """

    ENTRY_OVERHEAD = 300  # bytes per entry beyond text and vector: dict slot, tuple, array header

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
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
        return found

    def put_many(self, entries: dict[str, Embedded]) -> None:
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
        return sys.getsizeof(text) + entry.vector.nbytes + self.ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)


def tokens_to_embed(texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache | None) -> int:
    """How many tokens the texts hold: from the cache where it knows, else counted.
    (The same number either way: what a request may ask does not depend on the cache.)"""
    found = cache.get_many(texts) if cache is not None else {}
    rest = [text for text in texts if text not in found]
    return sum(entry.tokens for entry in found.values()) + sum(embedder.count_tokens(rest))
