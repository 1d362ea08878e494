"""LlamaIndex: `DistillPostprocessor`, a node postprocessor that drops redundant nodes.

    from distill_client.llama_index import DistillPostprocessor
    engine = index.as_query_engine(node_postprocessors=[DistillPostprocessor(target_k=5)])

The same `NodeWithScore` instances come back (score and metadata untouched),
in the service's order. Node scores are sent, so the best-scored duplicate is
kept (when the service embeds the text: the best-scored of those that say
everything the others say). When every node carries an embedding the vectors
are sent and nothing is embedded again; the query then goes as the query
bundle's embedding (its text would be embedded by a different model).
Otherwise the service embeds the nodes' text and the query text. The query is
sent only when `target_k` is set (MMR relevance).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from ._adapter import kept, request_options
from ._settings import AdapterSettings

__all__ = ["DistillPostprocessor"]


def _request(nodes: list[NodeWithScore], query: QueryBundle | None,
             options: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """Chunks for the nodes, and the options with the query in the form that matches them."""
    with_vectors = all(n.node.embedding is not None for n in nodes)
    chunks = []
    for i, n in enumerate(nodes):
        chunk: dict[str, Any] = {"id": str(i), "text": n.node.get_content(metadata_mode=MetadataMode.NONE)}
        if n.score is not None:
            chunk["score"] = n.score
        if with_vectors:
            chunk["embedding"] = n.node.embedding
        chunks.append(chunk)
    if query is None:
        return chunks, request_options(options)
    if with_vectors:
        return chunks, request_options(options, query_embedding=query.embedding)
    return chunks, request_options(options, query=query.query_str)


class DistillPostprocessor(AdapterSettings, BaseNodePostprocessor):
    """Removes near-duplicate nodes (and re-ranks to `target_k` with MMR when set)."""

    @classmethod
    def class_name(cls) -> str:
        return "DistillPostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        chunks, options = _request(nodes, query_bundle, self._options())
        return kept(nodes, self._clients.sync.dedupe(chunks, **options))

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore],
                                  query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        chunks, options = _request(nodes, query_bundle, self._options())
        return kept(nodes, await self._clients.async_.dedupe(chunks, **options))
