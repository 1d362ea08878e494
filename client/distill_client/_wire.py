"""What the sync and async clients share: request bodies, answers, retries, SSE frames.

Nothing here does I/O, so both clients stay thin loops over the same rules.
"""

from __future__ import annotations

import base64
import email.utils
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._errors import DistillError
from ._types import Chunk, ChunkLike, CompleteEvent, ProgressEvent, Result, parse_progress, parse_result

DEDUPE_PATH = "/v1/dedupe"
STREAM_PATH = "/v1/dedupe/stream"
MAX_RETRY_WAIT_S = 60.0  # a longer Retry-After is cut to this
RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                       httpx.ReadError, httpx.WriteError)


def build_body(
    chunks: Iterable[ChunkLike],
    *,
    threshold: float | None = None,
    lambda_: float | None = None,
    target_k: int | None = None,
    guards: Sequence[str] | None = None,
    linkage: str | None = None,
    selection: str | None = None,
    query: str | None = None,
    query_embedding: Any = None,
    explain: bool = False,
    preserve_cache_prefix: bool = False,
) -> dict[str, Any]:
    """The JSON request body; options left at None are not sent (the server's defaults apply)."""
    body: dict[str, Any] = {"chunks": [chunk_to_wire(c) for c in chunks]}
    optional = {"threshold": threshold, "lambda": lambda_, "target_k": target_k, "linkage": linkage,
                "selection": selection, "query": query}
    body.update({name: value for name, value in optional.items() if value is not None})
    if guards is not None:
        body["guards"] = list(guards)
    if query_embedding is not None:
        body["query_embedding"] = vector_to_wire(query_embedding)
    if explain:
        body["explain"] = True
    if preserve_cache_prefix:
        body["options"] = {"preserve_cache_prefix": True}
    return body


def chunk_to_wire(chunk: ChunkLike) -> dict[str, Any]:
    """A chunk as a JSON object; a mapping keeps all its fields (only its vector is converted)."""
    if isinstance(chunk, Chunk):
        wire: dict[str, Any] = {"id": chunk.id, "text": chunk.text, "score": chunk.score}
        if chunk.embedding is not None:
            wire["embedding"] = chunk.embedding
        if chunk.cache_control is not None:
            wire["cache_control"] = chunk.cache_control
    elif isinstance(chunk, Mapping):
        wire = dict(chunk)
    else:
        raise TypeError(f"a chunk must be a Chunk or a mapping, not {type(chunk).__name__}")
    if wire.get("embedding") is not None:
        wire["embedding"] = vector_to_wire(wire["embedding"])
    return wire


def vector_to_wire(vector: Any) -> Any:
    """Lists and base64 strings go as they are; an array (numpy) goes as base64 little-endian float32.

    numpy is imported only here, for callers that pass arrays: the client
    does not depend on it.
    """
    if isinstance(vector, (str, list)):
        return vector
    if isinstance(vector, tuple):
        return list(vector)
    if hasattr(vector, "__array__"):
        import numpy as np

        array = np.asarray(vector, dtype="<f4")
        if array.ndim != 1:
            raise ValueError(f"an embedding must be one vector, got shape {array.shape}")
        return base64.b64encode(array.tobytes()).decode("ascii")
    return list(vector)


def accept(stream: bool) -> str:
    return "text/event-stream" if stream else "application/json"


def result_from(response: httpx.Response) -> Result:
    """The typed answer of a 200 from `/v1/dedupe`."""
    return parse_result(_json_object(response))


def error_from(response: httpx.Response) -> DistillError:
    """The server's `{"error": ...}` message (or a short excerpt of whatever it sent) as a DistillError."""
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()
        message = text[0][:200] if text else f"HTTP {response.status_code}"
    return DistillError(str(message), response.status_code)


def transport_error(error: httpx.TransportError, base_url: str) -> DistillError:
    reason = str(error) or type(error).__name__
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return DistillError(f"cannot reach {base_url}: {reason}", 0)
    if isinstance(error, httpx.TimeoutException):
        return DistillError(f"{base_url} did not answer in time ({type(error).__name__})", 0)
    return DistillError(f"the connection to {base_url} broke: {reason}", 0)


def retry_wait(attempt: int, max_retries: int, response: httpx.Response | None = None,
               error: Exception | None = None) -> float | None:
    """Seconds to wait before trying again, or None when this failure is final.

    A 503 is retried only when it carries `Retry-After` (the server says it
    is busy, not broken); a connection failure is retried with exponential
    backoff. `dedupe` is a pure function of its input, so a retry is safe.
    """
    if attempt >= max_retries:
        return None
    if error is not None:
        return min(0.5 * 2 ** attempt, 8.0) if isinstance(error, RETRYABLE_TRANSPORT) else None
    if response is not None and response.status_code == 503:
        after = _retry_after_seconds(response.headers.get("Retry-After"))
        return None if after is None else min(after, MAX_RETRY_WAIT_S)
    return None


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise DistillError("the server's answer is not JSON", response.status_code) from None
    if not isinstance(data, dict):
        raise DistillError("the server's answer is not a JSON object", response.status_code)
    return data


@dataclass
class SSEDecoder:
    """Server-Sent Events frames from lines (WHATWG rules: comments skipped, data lines joined)."""

    status: int = 200
    _type: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> ProgressEvent | CompleteEvent | None:
        """One line in; a typed event out when a frame ends. An `error` event raises DistillError."""
        if line == "":
            if not self._data:
                self._type = ""
                return None
            kind, data = self._type or "message", "\n".join(self._data)
            self._type, self._data = "", []
            return self._event(kind, data)
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None

    def _event(self, kind: str, data: str) -> ProgressEvent | CompleteEvent | None:
        try:
            payload = json.loads(data)
        except ValueError:
            raise DistillError(f"the stream sent a {kind} event that is not JSON", self.status) from None
        if kind == "progress":
            return parse_progress(payload)
        if kind == "complete":
            return CompleteEvent(parse_result(payload))
        if kind == "error":
            raise DistillError(str(payload.get("error", "the stream failed")), self.status, payload.get("stage"))
        return None  # an event type this client does not know


STREAM_ENDED = "the stream ended before its complete event"
