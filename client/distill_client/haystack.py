"""Haystack: `DistillDeduplicator`, a component that drops redundant documents.

    from distill_client.haystack import DistillDeduplicator
    pipeline.add_component("dedupe", DistillDeduplicator(target_k=5))
    pipeline.connect("retriever.documents", "dedupe.documents")

`run(documents=[...], query=None, query_embedding=None)` returns
`{"documents": [...]}`: the same `Document` instances (meta and score
untouched), in the service's order. Document scores are sent, so the
best-scored duplicate is kept (when the service embeds the text: the
best-scored of those that say everything the others say). When every
document carries an embedding the vectors are sent and nothing is embedded
again; MMR relevance then uses `query_embedding` (the query text would be
embedded by a different model). Otherwise the service embeds `content` and
uses `query`. The query is sent only when `target_k` is set. `run_async`
does the same in an AsyncPipeline.
"""

from __future__ import annotations

from typing import Any

from haystack import Document, component

from ._adapter import Clients, kept, request_options
from ._client import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, AsyncDistillClient, DistillClient

__all__ = ["DistillDeduplicator"]


@component
class DistillDeduplicator:
    """Removes near-duplicate documents (and re-ranks to `target_k` with MMR when set)."""

    def __init__(self, *, client: DistillClient | AsyncDistillClient | None = None,
                 base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 threshold: float | None = None, lambda_: float | None = None, target_k: int | None = None,
                 guards: list[str] | None = None, linkage: str | None = None, selection: str | None = None):
        self.base_url, self.timeout, self.max_retries = base_url, timeout, max_retries
        self.threshold, self.lambda_, self.target_k = threshold, lambda_, target_k
        self.guards, self.linkage, self.selection = guards, linkage, selection
        self._clients = Clients(client, base_url=base_url, api_key=api_key, timeout=timeout,
                                max_retries=max_retries)

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document], query: str | None = None,
            query_embedding: list[float] | None = None) -> dict[str, Any]:
        if not documents:
            return {"documents": []}
        chunks, options = self._request(documents, query, query_embedding)
        return {"documents": kept(documents, self._clients.sync.dedupe(chunks, **options))}

    @component.output_types(documents=list[Document])
    async def run_async(self, documents: list[Document], query: str | None = None,
                        query_embedding: list[float] | None = None) -> dict[str, Any]:
        if not documents:
            return {"documents": []}
        chunks, options = self._request(documents, query, query_embedding)
        return {"documents": kept(documents, await self._clients.async_.dedupe(chunks, **options))}

    def _request(self, documents: list[Document], query: str | None,
                 query_embedding: list[float] | None) -> tuple[list[dict], dict[str, Any]]:
        with_vectors = all(d.embedding is not None for d in documents)
        chunks = []
        for i, d in enumerate(documents):
            chunk: dict[str, Any] = {"id": str(i), "text": d.content or ""}
            if d.score is not None:
                chunk["score"] = d.score
            if with_vectors:
                chunk["embedding"] = d.embedding
            chunks.append(chunk)
        options = {"threshold": self.threshold, "lambda_": self.lambda_, "target_k": self.target_k,
                   "guards": self.guards, "linkage": self.linkage, "selection": self.selection}
        if with_vectors:
            return chunks, request_options(options, query_embedding=query_embedding)
        return chunks, request_options(options, query=query)
