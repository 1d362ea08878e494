"""The real bundled model: offline, verified, normalised, meaningful, batch-independent."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache import Embedded, EmbeddingCache
from pipeline.embed import (
    FastEmbedModel,
    ModelUnavailable,
    bundled_model_dir,
    l2_normalise,
    length_sorted_batches,
)


def test_bundled_model_gives_unit_vectors_of_384(embedder):
    vectors = embedder.embed(["A plane is taking off.", "Ein Flugzeug hebt ab.", "🙂"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_paraphrases_are_closer_than_unrelated_sentences(embedder):
    a, b, c, d = embedder.embed(
        [
            "A plane is taking off.",
            "An air plane is taking off.",
            "A man is playing a flute.",
            "Someone is playing a wind instrument.",
        ]
    )
    assert a @ b > 0.85
    assert a @ b > a @ c + 0.4
    assert c @ d > a @ d


def test_vectors_do_not_depend_on_batch_neighbours(embedder):
    """Bit for bit: what makes the embedding cache safe for determinism."""
    texts = ["short", "a considerably longer sentence about the weather in spring", "word " * 300]
    together = embedder.embed(texts)
    alone = np.vstack([embedder.embed([t]) for t in texts])
    assert np.array_equal(together, alone)


def test_cache_keeps_the_most_recently_used_texts_within_its_bytes():
    a, b, c = (Embedded(np.full(384, k, dtype=np.float32), 1, k) for k in range(3))
    entry = EmbeddingCache(0)._size("a", a)
    cache = EmbeddingCache(2 * entry)
    cache.put_many({"a": a, "b": b})
    assert set(cache.get_many(["a"])) == {"a"}  # "a" is now the most recent
    cache.put_many({"c": c})
    assert set(cache.get_many(["a", "b", "c"])) == {"a", "c"}
    assert len(cache) == 2 and cache.bytes == 2 * entry
    cache.put_many({"a": a})  # replacing an entry does not count it twice
    assert cache.bytes == 2 * entry


def test_cache_bytes_count_the_text():
    entry = Embedded(np.zeros(384, dtype=np.float32), 1, 2500)
    cache = EmbeddingCache(10**6)
    cache.put_many({"x" * 10_000: entry})
    assert cache.bytes >= 10_000 + entry.vector.nbytes


def test_cache_of_size_zero_stores_nothing():
    cache = EmbeddingCache(0)
    cache.put_many({"a": Embedded(np.zeros(2, dtype=np.float32), 1, 1)})
    assert cache.get_many(["a"]) == {} and len(cache) == 0


def test_very_long_text_is_truncated_not_an_error(embedder):
    assert embedder.embed(["word " * 5000]).shape == (1, 384)


def test_model_directory_is_verified_and_complete(tmp_path):
    folder = bundled_model_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "tokenizer.json", "tokenizer_config.json"]


def test_unknown_model_is_a_clear_error_not_a_hang():
    model = FastEmbedModel("no-such/model")
    with pytest.raises(ModelUnavailable):
        model.dim()
    with pytest.raises(ModelUnavailable):  # remembered: no second slow attempt
        model.embed(["x"])


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([3, 10, 1, 7, 7, 2], 4)
    assert batches == [[1, 3, 4, 0], [5, 2]]
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_length_sorted_batches_hold_a_budget_of_padded_tokens():
    """Padded to the longest: 10 * 3 <= 30 but 10 * 4 > 30; an input over budget is a batch alone."""
    assert length_sorted_batches([10, 9, 8, 2, 2, 2, 1], 16, budget=30) == [[0, 1, 2], [3, 4, 5, 6]]
    assert length_sorted_batches([254] * 5, 16) == [[0, 1, 2, 3], [4]]
    assert length_sorted_batches([100, 1], 16, budget=50) == [[0], [1]]


def test_l2_normalise_keeps_zero_rows_and_survives_huge_values():
    unit = l2_normalise(np.array([[3, 4], [0, 0], [3e38, 3e38]], dtype=np.float32))
    assert unit[0].tolist() == pytest.approx([0.6, 0.8])
    assert unit[1].tolist() == [0, 0]
    assert unit[2].tolist() == pytest.approx([2**-0.5, 2**-0.5])
