"""The pipeline's vocabulary: a validated request in, stage events and a result out.

Nothing here knows about HTTP. The request is already validated: the runner
trusts every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LINKAGES = ("average", "single", "complete")
SELECTIONS = ("score", "centroid", "length", "hybrid")
GUARDS = ("numbers", "coverage")


@dataclass(frozen=True)
class Chunk:
    """One input chunk. `score` keeps the caller's number (int or float) so it echoes exactly."""

    id: str = ""
    text: str = ""
    score: int | float = 0
    embedding: np.ndarray | None = None  # (d,) float32, as sent (not normalised)


def checked_chunk(id: str, text: str, score: int | float, embedding: np.ndarray | None) -> Chunk:
    """A `Chunk` of fields already checked, made as unpickling makes one, its fields set at
    once: the frozen dataclass's __init__ costs ~1 µs a chunk, ~10 ms at 10,000 chunks on
    the event loop."""
    chunk = object.__new__(Chunk)
    chunk.__dict__.update(id=id, text=text, score=score, embedding=embedding)
    return chunk


@dataclass(frozen=True)
class DedupeRequest:
    """A validated request. `None` means "use the default" (resolved by the runner)."""

    chunks: tuple[Chunk, ...]
    threshold: float | None = None
    lambda_: float | None = None
    target_k: int = 0
    guards: tuple[str, ...] | None = None
    linkage: str = "average"
    selection: str = "score"
    query: str | None = None
    query_embedding: np.ndarray | None = None
    frozen_count: int = 0  # leading chunks frozen as a cache prefix: returned as sent, never embedded
    explain: bool = False
    # Every chunk's vector as one (n, d) float32 matrix, row i == chunks[i].embedding, when
    # every chunk brought one of one dimension (validation builds it): the embedding stage
    # takes it as it is instead of gathering the rows again. None: gather them.
    vectors: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def texts_to_embed(self) -> list[int]:
        """Indices of the chunks the model must embed (unfrozen ones without a vector)."""
        return [
            i for i, c in enumerate(self.chunks)
            if i >= self.frozen_count and c.embedding is None
        ]

    @property
    def unique_texts_to_embed(self) -> list[str]:
        """The distinct texts the model embeds: chunks without a vector, and the query."""
        texts = [self.chunks[i].text for i in self.texts_to_embed]
        if self._embeds_query:
            texts.append(self.query)
        return list(dict.fromkeys(texts))

    @property
    def model_embeds(self) -> bool:
        """Whether the model embeds any chunk or the query (its vectors then meet given ones)."""
        return bool(self.texts_to_embed) or self._embeds_query

    @property
    def needs_model(self) -> bool:
        """Whether the model runs at all: to embed, or for the sentences the coverage guard
        compares (asked for in Go mode; the default in model mode)."""
        return self.model_embeds or (
            "coverage" in (self.guards or ()) and self.frozen_count < len(self.chunks)
        )

    @property
    def _embeds_query(self) -> bool:
        """A query text without a vector is embedded, unless no stage runs (all frozen)."""
        return (
            self.query is not None
            and self.query_embedding is None
            and self.frozen_count < len(self.chunks)
        )


@dataclass(frozen=True)
class StageEvent:
    """Progress of one stage: 0 when it starts, 1 when it ends (with stats), fractions between."""

    stage: str
    progress: float
    stats: dict[str, Any] | None = None


@dataclass(frozen=True)
class OutputChunk:
    id: str
    text: str
    score: int | float
    cluster_id: int


@dataclass(frozen=True)
class CachePrefix:
    """Stats of a request whose prefix was frozen (`preserve_cache_prefix` and a marker)."""

    tokens: int
    hash: str
    suffix_input_count: int
    suffix_output_count: int

    def wire(self) -> dict[str, Any]:
        """The extra stats in Go's order; zero values left out, as Go's `omitempty` does."""
        fields = {
            "cache_prefix_frozen": True,
            "cache_prefix_tokens": self.tokens,
            "cache_prefix_hash": self.hash,
            "suffix_input_count": self.suffix_input_count,
            "suffix_output_count": self.suffix_output_count,
        }
        return {name: value for name, value in fields.items() if value}


@dataclass
class Result:
    chunks: list[OutputChunk]
    input_count: int
    cluster_count: int
    latency_ms: int = 0
    cache_prefix: CachePrefix | None = None  # set when a cache prefix was frozen
    labels: tuple[int, ...] = ()  # every input chunk's cluster id, in input order (not on the wire)
    explain: dict[str, Any] | None = None  # pipeline/explain.py's object, when asked for

    @property
    def output_count(self) -> int:
        return len(self.chunks)

    @property
    def reduction_pct(self) -> int:
        """As the Go service: truncation of the float percentage (5 -> 4 gives 19)."""
        return int((1 - self.output_count / self.input_count) * 100)

    def to_wire(self) -> dict[str, Any]:
        """The response object, keys in the Go service's struct order."""
        wire = {
            "chunks": [
                {"id": c.id, "text": c.text, "score": c.score, "cluster_id": c.cluster_id}
                for c in self.chunks
            ],
            "stats": {
                "input_count": self.input_count,
                "output_count": self.output_count,
                "cluster_count": self.cluster_count,
                "reduction_pct": self.reduction_pct,
                "latency_ms": self.latency_ms,
            },
        }
        if self.cache_prefix is not None:
            wire["stats"].update(self.cache_prefix.wire())  # after latency_ms, as Go
        if self.explain is not None:
            wire["explain"] = self.explain
        return wire


class StageError(Exception):
    """A failure inside a stage, with a message fit for a client."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.message = message
