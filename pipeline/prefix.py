"""The frozen cache prefix: the numbers the answer gives about it (Go Distill v0.9's;
`types.CachePrefix` carries them).

An agent using prompt caching marks its stable prefix (system prompt, tool
docs); the runner hands those chunks back untouched. Here is only how the
prefix is described in the stats, so a caller can tell whether it is the same
prefix as last time and roughly how many tokens it holds.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from .types import Chunk


def estimated_tokens(frozen: Sequence[Chunk]) -> int:
    """About four bytes per token, per chunk rounded up: UTF-8 bytes, as Go's `len(text)`."""
    return sum((len(c.text.encode("utf-8")) + 3) // 4 for c in frozen)


def prefix_hash(frozen: Sequence[Chunk]) -> str:
    """First 16 hex digits of SHA-256 over each text followed by a NUL byte: the same
    prefix gives the same hash on every request, and texts cannot shift across chunks."""
    digest = hashlib.sha256()
    for chunk in frozen:
        digest.update(chunk.text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
