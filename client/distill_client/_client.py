"""`DistillClient` and `AsyncDistillClient`: the same methods, one blocking, one `async`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, TypedDict, Unpack

import httpx

from ._errors import DistillError
from ._types import ChunkLike, CompleteEvent, ProgressEvent, Result, StreamEvent
from ._wire import (DEDUPE_PATH, STREAM_ENDED, STREAM_PATH, SSEDecoder, accept, build_body, error_from,
                    result_from, retry_wait, transport_error)

DEFAULT_BASE_URL = "http://localhost:8080"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # big requests embed for minutes
DEFAULT_MAX_RETRIES = 2


class DedupeOptions(TypedDict, total=False):
    """Request options; one left out is not sent, so the server's default applies."""

    threshold: float | None  # max cosine distance to merge
    lambda_: float | None  # MMR: 1 = relevance only, near 0 = diversity
    target_k: int | None  # re-rank to at most this many (MMR)
    guards: Sequence[str] | None  # e.g. ["numbers"] or []
    linkage: str | None  # average, single, complete
    selection: str | None  # score, centroid, length, hybrid
    query: str | None  # MMR relevance = similarity to this text
    query_embedding: Any  # ... or to this vector (list or numpy array)
    explain: bool  # add `Result.explain`
    preserve_cache_prefix: bool  # freeze chunks up to the last `cache_control` marker


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class DistillClient:
    """A blocking client of one Distill service.

    >>> with DistillClient("http://localhost:8080") as distill:
    ...     result = distill.dedupe([{"id": "1", "text": "..."}, {"id": "2", "text": "..."}])
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES):
        self.base_url, self.max_retries = base_url.rstrip("/"), max_retries
        self._settings = {"base_url": base_url, "api_key": api_key, "timeout": timeout,
                          "max_retries": max_retries}
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    def dedupe(self, chunks: Iterable[ChunkLike], *,
               on_progress: Callable[[ProgressEvent], object] | None = None,
               **options: Unpack[DedupeOptions]) -> Result:
        """De-duplicate `chunks`. With `on_progress`, the stream is used and each progress event passed to it."""
        if on_progress is None:
            return result_from(self._post(DEDUPE_PATH, build_body(chunks, **options), stream=False))
        with contextlib.closing(self.stream(chunks, **options)) as events:
            for event in events:
                if isinstance(event, CompleteEvent):
                    return event.result
                on_progress(event)
        raise DistillError(STREAM_ENDED)  # unreachable: stream() raises first

    def stream(self, chunks: Iterable[ChunkLike],
               **options: Unpack[DedupeOptions]) -> Generator[StreamEvent, None, None]:
        """Progress events, then one `CompleteEvent`; an `error` event raises DistillError."""
        response = self._post(STREAM_PATH, build_body(chunks, **options), stream=True)
        decoder = SSEDecoder(response.status_code)
        try:
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
                    if isinstance(event, CompleteEvent):
                        return
        except httpx.TransportError as error:
            raise transport_error(error, self.base_url) from error
        finally:
            response.close()
        raise DistillError(STREAM_ENDED)

    def _post(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        """POST with retries; a 200 response, or DistillError."""
        request = self._http.build_request("POST", path, json=body, headers={"Accept": accept(stream)})
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                wait = retry_wait(attempt, self.max_retries, error=error)
                if wait is None:
                    raise transport_error(error, self.base_url) from error
            else:
                if response.status_code == 200:
                    return response
                response.read()
                response.close()
                wait = retry_wait(attempt, self.max_retries, response=response)
                if wait is None:
                    raise error_from(response)
            time.sleep(wait)
        raise AssertionError("retry_wait ends the loop")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DistillClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncDistillClient:
    """The `async` twin of `DistillClient`: the same constructor and methods, awaited."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES):
        self.base_url, self.max_retries = base_url.rstrip("/"), max_retries
        self._settings = {"base_url": base_url, "api_key": api_key, "timeout": timeout,
                          "max_retries": max_retries}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    async def dedupe(self, chunks: Iterable[ChunkLike], *,
                     on_progress: Callable[[ProgressEvent], object | Awaitable[object]] | None = None,
                     **options: Unpack[DedupeOptions]) -> Result:
        """De-duplicate `chunks`; `on_progress` may be a plain function or a coroutine function."""
        if on_progress is None:
            return result_from(await self._post(DEDUPE_PATH, build_body(chunks, **options), stream=False))
        async with contextlib.aclosing(self.stream(chunks, **options)) as events:
            async for event in events:
                if isinstance(event, CompleteEvent):
                    return event.result
                outcome = on_progress(event)
                if inspect.isawaitable(outcome):
                    await outcome
        raise DistillError(STREAM_ENDED)  # unreachable: stream() raises first

    async def stream(self, chunks: Iterable[ChunkLike],
                     **options: Unpack[DedupeOptions]) -> AsyncGenerator[StreamEvent, None]:
        """Progress events, then one `CompleteEvent`; an `error` event raises DistillError."""
        response = await self._post(STREAM_PATH, build_body(chunks, **options), stream=True)
        decoder = SSEDecoder(response.status_code)
        try:
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
                    if isinstance(event, CompleteEvent):
                        return
        except httpx.TransportError as error:
            raise transport_error(error, self.base_url) from error
        finally:
            await response.aclose()
        raise DistillError(STREAM_ENDED)

    async def _post(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        request = self._http.build_request("POST", path, json=body, headers={"Accept": accept(stream)})
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                wait = retry_wait(attempt, self.max_retries, error=error)
                if wait is None:
                    raise transport_error(error, self.base_url) from error
            else:
                if response.status_code == 200:
                    return response
                await response.aread()
                await response.aclose()
                wait = retry_wait(attempt, self.max_retries, response=response)
                if wait is None:
                    raise error_from(response)
            await asyncio.sleep(wait)
        raise AssertionError("retry_wait ends the loop")

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDistillClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
