"""Client of the Distill service: remove redundant chunks from LLM context.

`DistillClient` / `AsyncDistillClient` call the service; the framework
adapters live in `distill_client.langchain`, `distill_client.llama_index` and
`distill_client.haystack` (each imported only when asked for).
"""

from ._client import AsyncDistillClient, DedupeOptions, DistillClient
from ._errors import DistillError
from ._types import (Chunk, CompleteEvent, Explain, ExplainChunk, GuardedPair, ProgressEvent, Result,
                     ResultChunk, Stats, StreamEvent)

__all__ = [
    "AsyncDistillClient", "Chunk", "CompleteEvent", "DedupeOptions", "DistillClient", "DistillError",
    "Explain", "ExplainChunk", "GuardedPair", "ProgressEvent", "Result", "ResultChunk", "Stats",
    "StreamEvent",
]
