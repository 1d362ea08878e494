"""The LangChain, LlamaIndex and Haystack adapters, inside their frameworks, against a real gunicorn."""

from __future__ import annotations

import asyncio

import pytest

from distill_client import AsyncDistillClient, DistillClient

from .support import Server

pytestmark = pytest.mark.e2e

TEXTS = [
    "React is a JavaScript library for building user interfaces.",
    "React.js is a JS library for building UIs.",  # a near-duplicate of the first
    "Vue is a progressive JavaScript framework.",
    "Revenue rose 3% in the second quarter.",
    "Revenue rose 5% in the second quarter.",  # not a duplicate: the number differs
]
KEPT = [0, 2, 3, 4]  # what the service keeps of TEXTS (first of each cluster, all scores equal)


@pytest.fixture(scope="module")
def server():
    running = Server(WEB_CONCURRENCY="1").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def one_vector_for_two_texts(embedder) -> list[list[float]]:
    """Real vectors, except that "Vue ..." gets the first text's vector.

    The model would never merge "Vue ..." into "React ...", so a merge proves
    the given vectors were used, not re-embedded ones.
    """
    vectors = embedder.embed(TEXTS).astype(float)
    vectors[2] = vectors[0]
    return vectors.tolist()


# --- LangChain ---------------------------------------------------------------------------------

def langchain_retriever(documents, compressor):
    """LangChain's own ContextualCompressionRetriever over a retriever that returns a fixed list."""
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.retrievers import BaseRetriever

    class FixedListRetriever(BaseRetriever):  # the store is not what is tested here
        documents: list

        def _get_relevant_documents(self, query, *, run_manager):
            return self.documents

    return ContextualCompressionRetriever(base_compressor=compressor,
                                          base_retriever=FixedListRetriever(documents=documents))


def test_langchain_compressor_in_a_compression_retriever(url):
    from langchain_core.documents import Document

    from distill_client.langchain import DistillCompressor

    documents = [Document(t, metadata={"n": i}) for i, t in enumerate(TEXTS)]
    retriever = langchain_retriever(documents, DistillCompressor(base_url=url))
    kept = retriever.invoke("JavaScript libraries")
    assert [d.metadata["n"] for d in kept] == KEPT
    assert all(d is documents[d.metadata["n"]] for d in kept)  # the caller's own objects
    kept_async = asyncio.run(retriever.ainvoke("JavaScript libraries"))
    assert [d.metadata["n"] for d in kept_async] == KEPT


def test_langchain_sends_the_query_for_mmr_when_target_k_is_set(url):
    from langchain_core.documents import Document

    from distill_client.langchain import DistillCompressor

    documents = [Document(t, metadata={"n": i}) for i, t in enumerate(TEXTS)]
    with DistillClient(url) as client:
        compressor = DistillCompressor(client=client, target_k=1, lambda_=1.0)
        kept = compressor.compress_documents(documents, query="quarterly revenue growth")
    assert [d.metadata["n"] for d in kept] in ([3], [4])  # the chunk closest to the query, not the first
    assert DistillCompressor(base_url=url).compress_documents([], query="x") == []


# --- LlamaIndex --------------------------------------------------------------------------------

def model_embedding(embedder):
    """A LlamaIndex embedding model backed by the service's own bundled model (the real one)."""
    from llama_index.core.embeddings import BaseEmbedding

    class BundledModelEmbedding(BaseEmbedding):
        def _get_query_embedding(self, query):
            return embedder.embed([query])[0].tolist()

        async def _aget_query_embedding(self, query):
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text):
            return embedder.embed([text])[0].tolist()

        def _get_text_embeddings(self, texts):
            return embedder.embed(texts).tolist()

    return BundledModelEmbedding(model_name="bundled")


def test_llama_index_postprocessor_in_a_query_engine(url, embedder, monkeypatch):
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import TextNode

    from distill_client.llama_index import DistillPostprocessor

    nodes = [TextNode(text=t, metadata={"n": i}) for i, t in enumerate(TEXTS)]
    index = VectorStoreIndex(nodes, embed_model=model_embedding(embedder))
    postprocessor = DistillPostprocessor(base_url=url)
    monkeypatch.setattr(Settings, "_llm", MockLLM())  # "no_text" answers need no LLM, but ask for one
    engine = index.as_query_engine(response_mode="no_text", similarity_top_k=5,
                                   node_postprocessors=[postprocessor])
    for response in (engine.query("JavaScript libraries"), asyncio.run(engine.aquery("JavaScript libraries"))):
        kept = sorted(n.node.metadata["n"] for n in response.source_nodes)
        assert 1 not in kept or 0 not in kept  # the near-duplicate pair is one chunk now
        assert len(kept) == 4 and {2, 3, 4} <= set(kept)

    retrieved = index.as_retriever(similarity_top_k=5).retrieve("JavaScript libraries")
    kept = postprocessor.postprocess_nodes(retrieved, query_str="JavaScript libraries")
    assert all(any(k is r for r in retrieved) for k in kept)  # the caller's NodeWithScore objects
    assert [k.score for k in kept] == sorted(k.score for k in kept)[::-1]  # best-scored kept, service order


def test_llama_index_sends_node_embeddings_and_the_query_embedding(url, embedder):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from distill_client.llama_index import DistillPostprocessor

    vectors = one_vector_for_two_texts(embedder)
    nodes = [NodeWithScore(node=TextNode(text=t, embedding=v, metadata={"n": i}), score=1.0)
             for i, (t, v) in enumerate(zip(TEXTS, vectors))]
    postprocessor = DistillPostprocessor(base_url=url, threshold=0.15, guards=["numbers"])
    kept = postprocessor.postprocess_nodes(nodes, query_str="ignored")
    assert [n.node.metadata["n"] for n in kept] == [0, 3, 4]  # "Vue" merged into "React": its vector was used
    query = QueryBundle("revenue", embedding=vectors[4])

    async def near(query):
        async with AsyncDistillClient(url) as client:
            postprocessor = DistillPostprocessor(client=client, target_k=1, lambda_=1.0, guards=["numbers"])
            return await postprocessor.apostprocess_nodes(nodes, query_bundle=query)

    near_query = asyncio.run(near(query))
    assert [n.node.metadata["n"] for n in near_query] == [4]


# --- Haystack ----------------------------------------------------------------------------------

def haystack_run_async(pipeline, data):
    """Haystack 3 runs any Pipeline with `run_async`; Haystack 2 has AsyncPipeline for that."""
    if hasattr(pipeline, "run_async"):
        return asyncio.run(pipeline.run_async(data))
    from haystack import AsyncPipeline

    async_pipeline = AsyncPipeline.from_dict(pipeline.to_dict())
    return asyncio.run(async_pipeline.run_async(data))


def test_haystack_component_after_a_bm25_retriever(url):
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from distill_client.haystack import DistillDeduplicator

    store = InMemoryDocumentStore()
    store.write_documents([Document(content=t, meta={"n": i}) for i, t in enumerate(TEXTS)])
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(store, top_k=5))
    pipeline.add_component("dedupe", DistillDeduplicator(base_url=url))
    pipeline.connect("retriever.documents", "dedupe.documents")
    data = {"retriever": {"query": "JavaScript library revenue"}}
    retrieved = pipeline.run(data, include_outputs_from={"retriever"})
    kept = retrieved["dedupe"]["documents"]
    assert len(kept) == 4 and not {0, 1} <= {d.meta["n"] for d in kept}
    scores = {d.meta["n"]: d.score for d in retrieved["retriever"]["documents"]}
    dropped = ({0, 1} - {d.meta["n"] for d in kept}).pop()
    survivor = 1 - dropped
    assert scores[survivor] >= scores[dropped]  # the better-scored duplicate stays
    assert all(d.score == scores[d.meta["n"]] for d in kept)  # scores and meta untouched
    kept_async = haystack_run_async(pipeline, data)["dedupe"]["documents"]
    assert [d.meta["n"] for d in kept_async] == [d.meta["n"] for d in kept]


def test_haystack_sends_document_embeddings_and_the_query_embedding(url, embedder):
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from distill_client.haystack import DistillDeduplicator

    vectors = one_vector_for_two_texts(embedder)
    documents = [Document(content=t, embedding=v, meta={"n": i}) for i, (t, v) in enumerate(zip(TEXTS, vectors))]
    deduplicator = DistillDeduplicator(base_url=url, threshold=0.15, guards=["numbers"])
    direct = deduplicator.run(documents=documents)["documents"]
    assert [d.meta["n"] for d in direct] == [0, 3, 4] and direct[0] is documents[0]

    store = InMemoryDocumentStore()
    store.write_documents(documents)
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryEmbeddingRetriever(store, top_k=5, return_embedding=True))
    pipeline.add_component("dedupe", DistillDeduplicator(base_url=url, target_k=1, lambda_=1.0,
                                                           guards=["numbers"]))
    pipeline.connect("retriever.documents", "dedupe.documents")
    query = {"retriever": {"query_embedding": vectors[4]}, "dedupe": {"query_embedding": vectors[4]}}
    assert [d.meta["n"] for d in pipeline.run(query)["dedupe"]["documents"]] == [4]
    assert [d.meta["n"] for d in haystack_run_async(pipeline, query)["dedupe"]["documents"]] == [4]
