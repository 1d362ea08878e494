"""LangChain: `DistillCompressor`, a document compressor that drops redundant documents.

    from distill_client.langchain import DistillCompressor
    compressor = DistillCompressor(base_url="http://localhost:8080", target_k=5)
    kept = compressor.compress_documents(documents, query="...")

The same `Document` instances come back, metadata intact, in the service's
order. LangChain documents carry no score or vector: the service embeds their
`page_content`, and among duplicates that say everything the others say the
earliest (the retriever's best ranked) is kept. The query is sent for MMR
relevance when `target_k` is set.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document

from ._adapter import kept, request_options
from ._settings import AdapterSettings

__all__ = ["DistillCompressor"]


def _chunks(documents: Sequence[Document]) -> list[dict]:
    return [{"id": str(i), "text": d.page_content} for i, d in enumerate(documents)]


class DistillCompressor(AdapterSettings, BaseDocumentCompressor):
    """Removes near-duplicate documents (and re-ranks to `target_k` with MMR when set)."""

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        result = self._clients.sync.dedupe(_chunks(documents), **request_options(self._options(), query=query))
        return kept(documents, result)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        result = await self._clients.async_.dedupe(_chunks(documents),
                                                   **request_options(self._options(), query=query))
        return kept(documents, result)
