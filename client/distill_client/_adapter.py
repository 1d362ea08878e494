"""What the framework adapters share: their clients, their options, the index round trip.

Every adapter sends its objects as chunks whose ids are their positions
("0", "1", ...) and maps the kept ids back to the very same objects, so the
caller's objects, metadata and all, come back in the service's order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import httpx

from ._client import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, AsyncDistillClient, DistillClient
from ._types import Result

T = TypeVar("T")


class Clients:
    """The caller's client (sync or async), with its twin built from the same settings when first needed."""

    def __init__(self, client: DistillClient | AsyncDistillClient | None = None, *,
                 base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = DEFAULT_MAX_RETRIES):
        self._sync = client if isinstance(client, DistillClient) else None
        self._async = client if isinstance(client, AsyncDistillClient) else None
        self._own_async = False
        self._async_loop: asyncio.AbstractEventLoop | None = None
        if client is not None and self._sync is None and self._async is None:
            raise TypeError(f"client must be a DistillClient or an AsyncDistillClient, not {type(client).__name__}")
        self._settings: dict[str, Any] = client._settings if client is not None else {
            "base_url": base_url, "api_key": api_key, "timeout": DEFAULT_TIMEOUT if timeout is None else timeout,
            "max_retries": max_retries}

    @property
    def sync(self) -> DistillClient:
        if self._sync is None:
            self._sync = DistillClient(**self._settings)
        return self._sync

    @property
    def async_(self) -> AsyncDistillClient:
        """The async client; one built here is rebuilt for each new event loop.

        An httpx connection pool belongs to the loop that opened it, and
        callers often run each query in its own `asyncio.run`.
        """
        if self._own_async or self._async is None:
            loop = asyncio.get_running_loop()
            if self._async is None or self._async_loop is not loop:
                self._async, self._async_loop, self._own_async = AsyncDistillClient(**self._settings), loop, True
        return self._async


def request_options(options: Mapping[str, Any], *, query: str | None = None,
                    query_embedding: Any = None) -> dict[str, Any]:
    """The adapter's options, plus the query when MMR will use it (`target_k` set).

    Without `target_k` the service runs no MMR, so the query would change
    nothing and is not sent.
    """
    chosen = {name: value for name, value in options.items() if value is not None}
    if chosen.get("target_k"):
        if query_embedding is not None:
            chosen["query_embedding"] = query_embedding
        elif query:
            chosen["query"] = query
    return chosen


def kept(items: Sequence[T], result: Result) -> list[T]:
    """The caller's own objects for the kept chunks (ids are positions), in the service's order."""
    return [items[int(chunk.id)] for chunk in result.chunks]
