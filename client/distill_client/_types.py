"""Typed requests and answers of the Distill API.

Answers are parsed leniently: a field the server adds later is kept (in
`Stats.extra`, `Result.raw`) rather than rejected, so an older client keeps
working against a newer service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union


@dataclass
class Chunk:
    """One chunk to send. `embedding` may be a list of floats or a numpy vector."""

    text: str = ""
    id: str = ""
    score: float = 0.0
    embedding: Any = None
    cache_control: Any = None


ChunkLike = Union[Chunk, Mapping[str, Any]]


@dataclass(frozen=True)
class ResultChunk:
    """A kept chunk, as the service returns it (`cluster_id` -1 = frozen cache prefix)."""

    id: str
    text: str
    score: float
    cluster_id: int


@dataclass(frozen=True, repr=False)
class Stats:
    """The `stats` object. The cache fields are None unless the cache prefix was frozen."""

    input_count: int
    output_count: int
    cluster_count: int
    reduction_pct: int
    latency_ms: int
    cache_prefix_frozen: bool | None = None
    cache_prefix_tokens: int | None = None
    cache_prefix_hash: str | None = None
    suffix_input_count: int | None = None
    suffix_output_count: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """The fields the server sent, in its order (no row of Nones for features not in use)."""
        known = {name: getattr(self, name) for name in _STATS_FIELDS}
        sent = {**{k: v for k, v in known.items() if v is not None}, **self.extra}
        return "Stats(" + ", ".join(f"{name}={value!r}" for name, value in sent.items()) + ")"

    def __getattr__(self, name: str) -> Any:
        """Fields this client does not know yet are attributes too."""
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)


@dataclass(frozen=True)
class ExplainChunk:
    """What happened to one input chunk (`state`: kept, duplicate, mmr or frozen)."""

    index: int
    id: str
    cluster_id: int
    state: str
    kept_index: int | None
    distance: float | None


@dataclass(frozen=True)
class GuardedPair:
    """Two inputs a guard held apart that the threshold alone would have merged."""

    a: int
    b: int
    guard: str
    unsaid: dict[str, list[str]] | None = None  # coverage: {"a": words of a that b does not say, "b": ...}


@dataclass(frozen=True)
class Explain:
    """The `explain` object: one row per input, guarded pairs, a 2-D map."""

    chunks: list[ExplainChunk]
    guarded_pairs: list[GuardedPair]
    map: list[tuple[float, float] | None]  # None: a frozen cache-prefix chunk (never embedded)


@dataclass(frozen=True)
class Result:
    """A de-duplication answer. `raw` is the JSON object as received."""

    chunks: list[ResultChunk]
    stats: Stats
    explain: Explain | None
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class ProgressEvent:
    """A stage's progress, `progress` in [0, 1]; `stats` on a stage's last event."""

    stage: str
    progress: float
    stats: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class CompleteEvent:
    """The last event of a stream: the same answer `dedupe` returns."""

    result: Result


StreamEvent = Union[ProgressEvent, CompleteEvent]

_STATS_FIELDS = (
    "input_count", "output_count", "cluster_count", "reduction_pct", "latency_ms",
    "cache_prefix_frozen", "cache_prefix_tokens", "cache_prefix_hash",
    "suffix_input_count", "suffix_output_count",
)


def parse_result(data: Mapping[str, Any]) -> Result:
    """The typed form of a `/v1/dedupe` answer or a stream's `complete` data."""
    stats = dict(data.get("stats") or {})
    known = {name: stats.pop(name, None) for name in _STATS_FIELDS}
    explain = data.get("explain")
    return Result(
        chunks=[ResultChunk(c.get("id", ""), c.get("text", ""), c.get("score", 0), c.get("cluster_id", 0))
                for c in data.get("chunks") or []],
        stats=Stats(**known, extra=stats),
        explain=_parse_explain(explain) if isinstance(explain, Mapping) else None,
        raw=data,
    )


def _parse_explain(data: Mapping[str, Any]) -> Explain:
    return Explain(
        chunks=[ExplainChunk(r.get("index", i), r.get("id", ""), r.get("cluster_id", 0), r.get("state", ""),
                             r.get("kept_index"), r.get("distance"))
                for i, r in enumerate(data.get("chunks") or [])],
        guarded_pairs=[GuardedPair(p.get("a", 0), p.get("b", 0), p.get("guard", ""), p.get("unsaid"))
                       for p in data.get("guarded_pairs") or []],
        map=[None if point is None else (float(point[0]), float(point[1])) for point in data.get("map") or []],
    )


def parse_progress(data: Mapping[str, Any]) -> ProgressEvent:
    return ProgressEvent(str(data.get("stage", "")), float(data.get("progress", 0)), data.get("stats"))

