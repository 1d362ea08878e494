"""`explain`: per-chunk states and distances, guarded pairs, the PCA map; through the
runner and both endpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import explain as explain_module
from pipeline.embed import l2_normalise
from pipeline.explain import chunk_rows, cosine_distances, guarded_pairs, pca_map
from pipeline.guards import NumberGuard
from pipeline.offload import INLINE, Threads
from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest

from .support import FIVE
from .test_distance import exact_distance as canonical_distance


def exact_distance(u: np.ndarray, v: np.ndarray) -> float:
    """The canonical distance by its definition (summed exactly), as a Python float."""
    return float(canonical_distance(u, v))


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return l2_normalise(rng.normal(size=(n, d)).astype(np.float32))


class ParityGuard:
    """A second guard for the tests (only the Guard protocol matters here):
    separates inputs whose indices differ in parity."""

    name = "parity"

    def separates(self, first, second):
        return (np.asarray(first) % 2) != (np.asarray(second) % 2)


# --------------------------------------------------------------------------- chunk rows


def test_rows_say_kept_duplicate_and_mmr():
    unit = l2_normalise(np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.2], [0, 0, 1]], np.float32))
    labels = np.array([0, 0, 1, 1, 2])
    rows = chunk_rows(["a", "b", "c", "d", "e"], unit, labels, representatives=[0, 3, 4], kept=[0, 4])
    assert [r["state"] for r in rows] == ["kept", "duplicate", "duplicate", "mmr", "kept"]
    assert [r["kept_index"] for r in rows] == [0, 0, 3, None, 4]
    assert [r["cluster_id"] for r in rows] == [0, 0, 1, 1, 2]
    assert list(rows[0]) == ["index", "id", "cluster_id", "state", "kept_index", "distance"]
    assert rows[0]["distance"] == rows[4]["distance"] == 0.0 and rows[3]["distance"] is None
    assert rows[1]["distance"] == round(exact_distance(unit[1], unit[0]), 6) > 0
    assert rows[2]["distance"] == round(exact_distance(unit[2], unit[3]), 6) > 0


def test_distances_match_the_exact_sum_and_zero_rows_are_at_two():
    unit = random_unit(500, 384, seed=1)
    unit[7] = 0
    first, second = np.arange(500), np.roll(np.arange(500), 1)
    got = np.round(cosine_distances(unit, first, second), 6)
    want = [round(exact_distance(unit[i], unit[j]), 6) for i, j in zip(first, second)]
    assert got.tolist() == want
    assert got[7] == got[8] == 2.0


# --------------------------------------------------------------------------- guarded pairs


def brute_force_pairs(unit, threshold, guards):
    """The definition, pair by pair."""
    out = []
    for a in range(len(unit)):
        for b in range(a + 1, len(unit)):
            if exact_distance(unit[a], unit[b]) <= threshold:
                for guard in guards:
                    if guard.separates(np.array([a]), np.array([b]))[0]:
                        out.append({"a": a, "b": b, "guard": guard.name})
                        break
    return out


def clustered_texts(n: int, seed: int = 0):
    """n vectors in tight groups of 4, with texts whose numbers sometimes disagree."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 4 + 1, 64)).astype(np.float32)
    unit = l2_normalise(centres[np.arange(n) // 4] + 0.2 * rng.normal(size=(n, 64)).astype(np.float32))
    texts = [f"value {rng.integers(0, 3)} of group {i // 4}" if i % 3 else "no numbers" for i in range(n)]
    return unit, texts


@pytest.mark.parametrize("threshold", [0.1, 0.3, 2.0])
def test_guarded_pairs_are_the_definition(threshold):
    unit, texts = clustered_texts(120)
    guards = [NumberGuard(texts), ParityGuard()]
    got = guarded_pairs(unit, threshold, guards)
    assert got == brute_force_pairs(unit, threshold, guards)[:1000]
    assert any(p["guard"] == "numbers" for p in got) and any(p["guard"] == "parity" for p in got)


def test_guarded_pairs_are_ascending_and_capped_and_tiles_do_not_matter(monkeypatch):
    unit, texts = clustered_texts(400, seed=3)
    guards = [ParityGuard()]
    whole = guarded_pairs(unit, 2.0, guards, limit=10**6)
    assert len(whole) == 200 * 200  # every odd-even pair at threshold 2
    assert [(p["a"], p["b"]) for p in whole] == sorted((p["a"], p["b"]) for p in whole)
    monkeypatch.setattr(explain_module, "TILE_ENTRIES", 1000)  # tiles of 2+ rows
    assert guarded_pairs(unit, 2.0, guards, limit=10**6) == whole
    assert guarded_pairs(unit, 2.0, guards) == whole[:1000]


def test_no_guards_or_one_chunk_means_no_pairs():
    unit = random_unit(5, 8)
    assert guarded_pairs(unit, 2.0, []) == []
    assert guarded_pairs(unit[:1], 2.0, [ParityGuard()]) == []


# --------------------------------------------------------------------------- the map


def assert_map(coords, n):
    array = np.array(coords)
    assert array.shape == (n, 2)
    assert np.isfinite(array).all() and np.abs(array).max() <= 1.0
    assert array.round(4).tolist() == coords


@pytest.mark.parametrize(
    "unit, expected",
    [
        (np.array([[0.6, 0.8]], np.float32), [[0.0, 0.0]]),
        (np.array([[1, 0], [0, 1]], np.float32), [[1.0, 0.0], [-1.0, 0.0]]),
        (np.array([[0, 1], [1, 0]], np.float32), [[1.0, 0.0], [-1.0, 0.0]]),
        (np.array([[0.6, 0.8]] * 4, np.float32), [[0.0, 0.0]] * 4),
        (np.zeros((3, 8), np.float32), [[0.0, 0.0]] * 3),
        (np.array([[0, 0], [1, 0], [0, 0]], np.float32), [[0.5, 0.0], [-1.0, 0.0], [0.5, 0.0]]),
    ],
)
def test_degenerate_maps(unit, expected):
    assert pca_map(unit) == expected


def test_map_is_the_pca_projection_up_to_sign():
    unit = random_unit(200, 32, seed=2)
    centred = unit.astype(np.float64) - unit.astype(np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T
    reference /= np.abs(reference).max()
    got = np.array(pca_map(unit))
    assert np.allclose(np.abs(got), np.abs(reference), atol=1e-4)
    assert (got[0] >= 0).all()  # each axis points at the first input off the centre


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize(
    "unit",
    [
        random_unit(60, 16, seed=4),  # scatter matrix (n > d)
        random_unit(6, 16, seed=5),  # Gram matrix (n < d)
        np.eye(3, 16, dtype=np.float32),  # a tie: the top two eigenvalues are equal
        np.eye(4, 16, dtype=np.float32),  # a tie across all three axes of spread
        -random_unit(6, 16, seed=5),
    ],
    ids=["scatter", "gram", "tie-2", "tie-3", "negated"],
)
def test_map_does_not_depend_on_how_the_space_is_oriented(unit):
    """The same points in rotated coordinates, or negated, give the same map: the
    layout is fixed by the data, not by the eigensolver's choice of signs or bases."""
    expected = np.array(pca_map(unit))
    for seed in range(3):
        turned = (unit.astype(np.float64) @ rotation(16, seed)).astype(np.float32)
        assert np.allclose(pca_map(turned), expected, atol=2e-4)
    assert np.allclose(pca_map(-unit), expected, atol=2e-4)
    assert_map(expected.tolist(), len(unit))


def test_gram_and_scatter_paths_agree():
    """Points in a 10-dimensional subspace of 384: n = 50 < d uses the Gram matrix; the
    same points in their own 10 coordinates (n > d) use the scatter matrix."""
    low = random_unit(50, 10, seed=6)
    embedded = (np.hstack([low, np.zeros((50, 374), np.float32)]).astype(np.float64) @ rotation(384, 0)).astype(
        np.float32
    )
    assert np.allclose(pca_map(embedded), pca_map(low), atol=2e-4)


# --------------------------------------------------------------------------- through the runner


def text_request(texts=FIVE, **fields) -> DedupeRequest:
    return DedupeRequest(chunks=tuple(Chunk(id=str(i + 1), text=t) for i, t in enumerate(texts)), **fields)


def test_off_by_default_and_never_computed(embedder, monkeypatch):
    def refuse(*args):
        raise AssertionError("explain computed without being asked")

    monkeypatch.setattr("pipeline.runner.explain", refuse)
    result = drain(run(text_request(), embedder))
    assert result.explain is None and "explain" not in result.to_wire()


def test_five_chunks_explained(embedder):
    result = drain(run(text_request(explain=True), embedder))
    wire = result.to_wire()
    assert list(wire) == ["chunks", "stats", "explain"]
    explained = wire["explain"]
    assert list(explained) == ["chunks", "guarded_pairs", "map"]
    states = [(r["id"], r["state"], r["kept_index"]) for r in explained["chunks"]]
    # "An air plane ..." says all "A plane ..." says, and more: it is kept, whatever the scores
    assert states == [("1", "duplicate", 1), ("2", "kept", 1), ("3", "kept", 2), ("4", "kept", 3), ("5", "kept", 4)]
    assert 0 < explained["chunks"][0]["distance"] < 0.2
    assert explained["guarded_pairs"] == [{"a": 3, "b": 4, "guard": "numbers"}]
    assert_map(explained["map"], 5)
    kept_ids = [r["id"] for r in explained["chunks"] if r["state"] == "kept"]
    assert kept_ids == [c.id for c in result.chunks]


def test_mmr_rows_and_rows_agree_with_the_output(embedder):
    texts = FIVE + ["A cat sleeps on the sofa.", "A kitten sleeps on the couch."]
    result = drain(run(text_request(texts, explain=True, target_k=2), embedder))
    rows = result.explain["chunks"]
    output = {c.id: c.cluster_id for c in result.chunks}
    assert {r["id"]: r["cluster_id"] for r in rows if r["state"] == "kept"} == output
    assert len(output) == 2
    dropped_by_mmr = [r for r in rows if r["state"] == "mmr"]
    assert dropped_by_mmr and all(r["kept_index"] is None and r["distance"] is None for r in dropped_by_mmr)
    for r in rows:
        if r["state"] == "duplicate":
            assert rows[r["kept_index"]]["cluster_id"] == r["cluster_id"]
            assert rows[r["kept_index"]]["state"] in ("kept", "mmr")


def test_guarded_pairs_agree_with_the_clustering_stats(embedder):
    texts = [f"The plant produced {n} tonnes of steel last year." for n in range(1, 41)]
    items = list(run(text_request(texts, explain=True), embedder))
    stats = next(e.stats for e in items[:-1] if e.stage == "clustering" and e.stats)
    assert stats["guarded_pairs"] == len(items[-1].explain["guarded_pairs"]) == 40 * 39 // 2


def test_same_explain_inline_and_on_threads(embedder, monkeypatch):
    monkeypatch.setattr(explain_module, "TILE_ENTRIES", 3000)  # tiles of 10+ rows, two at once
    vectors = random_unit(300, 384, seed=7)
    vectors[150:] = l2_normalise(vectors[:150] + 0.05 * random_unit(150, 384, seed=8))
    request = DedupeRequest(
        chunks=tuple(Chunk(id=str(i), text=f"item {i % 7}", embedding=v) for i, v in enumerate(vectors)),
        guards=("numbers",), threshold=0.3, target_k=100, explain=True,
    )
    threads = Threads(2)
    try:
        inline = json.dumps(drain(run(request, embedder, offload=INLINE)).explain)
        assert json.dumps(drain(run(request, embedder, offload=threads)).explain) == inline
    finally:
        threads.close()


# --------------------------------------------------------------------------- over HTTP


def zero_latency(raw: bytes) -> bytes:
    import re

    return re.sub(rb'"latency_ms":\d+', b'"latency_ms":0', raw)


def body(**fields) -> dict:
    return {"chunks": [{"id": str(i + 1), "text": t} for i, t in enumerate(FIVE)], **fields}


def test_both_endpoints_answer_the_same_explain(client):
    plain = client.post("/v1/dedupe", json=body(explain=True))
    assert plain.status_code == 200
    response = client.post("/v1/dedupe/stream", json=body(explain=True))
    complete = response.data.decode().strip().split("\n\n")[-1]
    assert complete.startswith("event: complete\ndata: ")
    assert zero_latency(complete.split("data: ", 1)[1].encode()) == zero_latency(plain.data)
    assert zero_latency(client.post("/v1/dedupe", json=body(explain=True)).data) == zero_latency(plain.data)


@pytest.mark.parametrize("value", [False, None])
def test_false_or_null_means_no_explain(client, value):
    answer = client.post("/v1/dedupe", json=body(explain=value))
    assert zero_latency(answer.data) == zero_latency(client.post("/v1/dedupe", json=body()).data)
    assert "explain" not in answer.get_json()


@pytest.mark.parametrize("value", [1, 0, "true", [], {}])
@pytest.mark.parametrize("path", ["/v1/dedupe", "/v1/dedupe/stream"])
def test_non_boolean_explain_is_a_400(client, path, value):
    response = client.post(path, json=body(explain=value))
    assert response.status_code == 400
    assert response.get_json() == {"error": "explain must be true or false"}


def test_a_frozen_prefix_comes_first_in_explain_and_the_rest_is_shifted(client):
    frozen = {"id": "system", "text": "You are a helpful assistant.", "cache_control": {"type": "ephemeral"}}
    suffix = [
        {"id": "a", "embedding": [1.0, 0.0, 0.0]},
        {"id": "b", "embedding": [1.0, 0.01, 0.0]},
        {"id": "c", "embedding": [0.0, 1.0, 0.0]},
    ]
    body = {"chunks": [frozen, *suffix], "options": {"preserve_cache_prefix": True}, "explain": True}
    explained = client.post("/v1/dedupe", json=body).get_json()["explain"]
    rows = explained["chunks"]
    assert rows[0] == {"index": 0, "id": "system", "cluster_id": -1, "state": "frozen", "kept_index": None, "distance": None}
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert (rows[2]["state"], rows[2]["kept_index"]) == ("duplicate", 1)
    assert explained["map"][0] is None and all(len(point) == 2 for point in explained["map"][1:])
