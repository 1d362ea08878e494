"""The request path of big Go-mode bodies: read into shared memory the helper process maps
(arenas, reused), the vectors' matrix written back into it, the same requests as in place."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from app import jsonio
from app.config import Config
from app.parsing import INLINE_MAX_BYTES, Arenas, BodyParser, parse_body
from app.validate import ApiError
from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest


@pytest.fixture()
def parser():
    parser = BodyParser(Config())
    yield parser
    parser.close()


def body_of(vectors: list[list[float]], **fields) -> bytes:
    raw = json.dumps({"chunks": [{"id": str(i), "embedding": v, "score": i % 3} for i, v in enumerate(vectors)],
                      **fields}).encode()
    return raw + b" " * max(0, INLINE_MAX_BYTES + 1 - len(raw))


def read_in(parser: BodyParser, raw: bytes) -> memoryview:
    """As the server reads a body: into the buffer the parser gives for its size."""
    buffer = parser.buffer(len(raw))
    buffer[:] = raw
    return buffer


def rows(n: int, d: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32).round(6).tolist()


def assert_vectors(request: DedupeRequest, expected: np.ndarray) -> None:
    assert request.vectors is not None and request.vectors.dtype == np.float32
    assert np.array_equal(request.vectors.view(np.uint32), expected.view(np.uint32))
    for chunk, row in zip(request.chunks, expected):
        assert np.array_equal(chunk.embedding.view(np.uint32), row.view(np.uint32))


def test_a_big_body_is_read_into_shared_memory_and_its_matrix_comes_back_in_place(parser):
    vectors = rows(300, 64)
    raw = body_of(vectors, target_k=5)
    request, _ = parser(read_in(parser, raw))
    reference, _ = parse_body(raw, Config())
    assert_vectors(request, np.float32(vectors))
    assert_vectors(reference, np.float32(vectors))
    assert [c.id for c in request.chunks] == [c.id for c in reference.chunks]


def test_an_arena_is_reused_once_the_requests_vectors_are_gone(parser):
    raw = body_of(rows(200, 32))
    first = read_in(parser, raw)
    arena = first.obj
    request, _ = parser(first)
    del first
    second = parser.buffer(len(raw))
    assert second.obj is not arena  # still holds the first request's vectors
    del second, request
    gc.collect()
    third = parser.buffer(len(raw))
    assert third.obj is arena  # given back, and taken again
    third[:] = raw
    again, _ = parser(third)
    assert_vectors(again, np.float32(rows(200, 32)))


def test_a_matrix_bigger_than_its_body_is_sent_in_memory_of_its_own(parser):
    """'0,' is two bytes and a float32 four: such a body's vectors do not fit where it was."""
    n, d = 300, 2048
    raw = body_of([[0] * d] * n)
    assert n * d * 4 > len(raw)
    request, _ = parser(read_in(parser, raw))
    assert_vectors(request, np.zeros((n, d), dtype=np.float32))


def test_a_refused_body_keeps_the_helper_and_gives_its_arena_back(parser):
    raw = body_of(rows(100, 16) + [[1.0, 2.0]])
    parser.start()
    pid = parser._helper.process.pid
    buffer = read_in(parser, raw)
    arena = buffer.obj
    with pytest.raises(ApiError) as info:
        parser(buffer)
    assert info.value.status == 400 and "same dimension" in info.value.message
    assert parser._helper.process.pid == pid  # a 4xx is an answer, not a failure
    del buffer
    assert parser.buffer(len(raw)).obj is arena


def test_unused_arenas_beyond_the_kept_few_are_dropped_and_the_helper_forgets_them(parser):
    sizes = [INLINE_MAX_BYTES + k * (1 << 20) for k in range(1, 5)]
    held = []
    for size in sizes:  # four bodies at once: four arenas
        vectors = rows(10, 8, seed=size)
        raw = json.dumps({"chunks": [{"embedding": v} for v in vectors]}).encode()
        raw += b" " * (size - len(raw))
        request, _ = parser(read_in(parser, raw))
        held.append(request)
    assert len(parser._helper.mapped) == 4
    held.clear()
    gc.collect()
    parser.buffer(sizes[0])  # settles: two kept, two dropped
    assert len(parser.arenas.free) == 1 and len(parser.arenas.dropped) == 2  # (one just taken)
    raw = body_of(rows(10, 8))
    parser(read_in(parser, raw))
    assert len(parser._helper.mapped) <= 3 and not parser.arenas.dropped


def test_arenas_come_back_from_any_thread_and_are_taken_smallest_first():
    from concurrent.futures import ThreadPoolExecutor

    arenas = Arenas(keep=3)
    taken = [arenas.take(size) for size in (5 << 20, 2 << 20, 3 << 20)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(arenas.give_back, taken))
    assert sorted(len(a) for a in [arenas.take(1 << 20)] + arenas.free) == [2 << 20, 3 << 20, 5 << 20]
    assert len(arenas.take(2 << 20)) == 3 << 20  # the smallest that fits (2 MiB was taken)


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7])
def test_counting_a_byte_in_blocks_is_bytes_count(size):
    raw = np.random.default_rng(size).integers(88, 96, size, dtype=np.uint8).tobytes()
    assert jsonio.count_byte(raw, ord("[")) == raw.count(b"[")
    assert jsonio.count_byte(memoryview(raw), ord("[")) == raw.count(b"[")


def test_vectors_are_gathered_only_when_every_chunk_has_one_of_one_dimension():
    config = Config()
    both, _ = parse_body(json.dumps({"chunks": [{"embedding": [1, 2]}, {"embedding": [3, 4.5]}]}).encode(), config)
    assert both.vectors.tolist() == [[1, 2], [3, 4.5]]
    mixed, _ = parse_body(json.dumps({"chunks": [{"embedding": [1, 2]}, {"text": "a"}]}).encode(), config)
    assert mixed.vectors is None
    frozen = {"chunks": [{"embedding": [1, 2, 3], "cache_control": True}, {"embedding": [1, 2]}, {"embedding": [2, 1]}],
              "options": {"preserve_cache_prefix": True}}
    assert parse_body(json.dumps(frozen).encode(), config)[0].vectors is None  # two dimensions


def test_a_frozen_prefix_with_gathered_vectors_gives_the_same_result_as_without():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    x[6:] = x[:6] + 0.01
    chunks = tuple(Chunk(id=str(i), text=f"t{i}", score=i % 4, embedding=x[i]) for i in range(12))
    plain = DedupeRequest(chunks=chunks, frozen_count=3, target_k=4)
    gathered = DedupeRequest(chunks=chunks, frozen_count=3, target_k=4, vectors=x)
    wire = lambda r: {**drain(run(r, embedder=None)).to_wire(), "stats": None}  # noqa: E731
    assert wire(plain) == wire(gathered)


@pytest.mark.parametrize("seed", range(40))
def test_the_best_scored_member_per_cluster_in_one_sort_is_what_selection_picks(seed):
    from pipeline.cluster import members
    from pipeline.select import best_scored, representatives

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    labels = rng.integers(0, max(1, n // 3), n)
    _, labels = np.unique(labels, return_inverse=True)  # 0..k-1, each present
    scores = rng.choice([0.0, -0.0, 1.0, 0.5, -2.0, 3.0, 1e300, -1e-300], n)  # ties, signed zeros
    unit = np.zeros((n, 2), dtype=np.float32)
    expected = representatives(members(labels), "score", unit, scores, [""] * n)
    assert best_scored(labels, scores) == expected


@pytest.mark.parametrize("shape", [(1, 3), (300, 7), (1000, 384), (513, 1536)])
def test_rows_normalised_in_blocks_at_once_are_the_rows_normalised_whole(shape):
    from pipeline.embed import l2_normalise
    from pipeline.offload import Threads
    from pipeline.runner import _unit_rows

    rng = np.random.default_rng(shape[0])
    x = (rng.normal(size=shape) * rng.choice([1e-30, 1.0, 1e30], size=(shape[0], 1))).astype(np.float32)
    x[::7] = 0.0
    threads = Threads(2)
    try:
        assert np.array_equal(_unit_rows(x, threads).view(np.uint32), l2_normalise(x).view(np.uint32))
    finally:
        threads.close()


def b64(values) -> str:
    import base64

    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


@pytest.mark.parametrize("dim", [6, 12, 384, 7, 8])  # 7 and 8: padded strings, decoded one by one
def test_base64_vectors_decoded_at_once_are_each_ones_decoding(dim):
    from app.validate import _chunk, parse_request

    rng = np.random.default_rng(dim)
    raw = [{"id": str(i), "embedding": b64(rng.normal(size=dim)), "score": i} for i in range(50)]
    request = parse_request({"chunks": raw}, Config())
    expected = [_chunk(dict(c), i) for i, c in enumerate(raw)]
    for got, want in zip(request.chunks, expected):
        assert (got.id, got.text, got.score) == (want.id, want.text, want.score)
        assert np.array_equal(got.embedding.view(np.uint32), want.embedding.view(np.uint32))
    assert np.array_equal(request.vectors, np.stack([c.embedding for c in expected]))


@pytest.mark.parametrize("case, message", [
    ("bad-character-late-bad-id-early", "chunks[2].id must be a string"),
    ("not-finite", "chunks[3].embedding must contain finite float32 numbers"),
    ("padding-in-the-middle", "chunks[4].embedding is not valid base64"),
    ("one-shorter", "all embeddings must have the same dimension, got [5, 6]"),
])
def test_base64_vectors_decoded_at_once_keep_every_message(case, message):
    from app.validate import parse_request

    rng = np.random.default_rng(0)
    raw = [{"id": str(i), "embedding": b64(rng.normal(size=6))} for i in range(8)]
    if case == "bad-character-late-bad-id-early":
        raw[2]["id"] = 5
        raw[6]["embedding"] = "!" + raw[6]["embedding"][1:]
    elif case == "not-finite":
        raw[3]["embedding"] = b64([1, 2, np.inf, 4, 5, 6])
    elif case == "padding-in-the-middle":
        raw[4]["embedding"] = raw[4]["embedding"][:6] + "=" + raw[4]["embedding"][7:]
    else:
        raw[5]["embedding"] = b64(rng.normal(size=5))
    with pytest.raises(ApiError) as info:
        parse_request({"chunks": raw}, Config())
    assert info.value.message == message


def test_decoded_arrays_cast_at_once_are_each_ones_cast_and_keep_every_message():
    from app.validate import parse_request

    rng = np.random.default_rng(5)
    values = rng.normal(size=(40, 9)) * rng.choice([1e-40, 1.0, 1e30], size=(40, 1))
    raw = [{"id": str(i), "embedding": values[i].copy(), "score": 1} for i in range(40)]
    request = parse_request({"chunks": raw}, Config())
    for chunk, row in zip(request.chunks, values):
        assert np.array_equal(chunk.embedding.view(np.uint32), row.astype(np.float32).view(np.uint32))
    assert np.array_equal(request.vectors, values.astype(np.float32))
    raw[3]["embedding"][4] = 1e39  # past float32: infinite once cast
    with pytest.raises(ApiError) as info:
        parse_request({"chunks": raw}, Config())
    assert info.value.message == "chunks[3].embedding must contain finite float32 numbers"
    raw[1]["id"] = 7
    with pytest.raises(ApiError) as info:
        parse_request({"chunks": raw}, Config())
    assert info.value.message == "chunks[1].id must be a string"


def test_unused_arenas_are_kept_up_to_a_number_of_bytes_the_biggest_let_go_first():
    arenas = Arenas(keep=3, keep_bytes=6 << 20)
    taken = [arenas.take(size) for size in (1 << 20, 4 << 20, 3 << 20)]
    for arena in taken:
        arenas.give_back(arena)
    del taken, arena
    held = arenas.take(1)  # settles, then takes the smallest
    gc.collect()
    assert len(held) == 1 << 20
    assert [len(a) for a in arenas.free] == [3 << 20]  # 8 MiB kept would pass 6: the 4 MiB one went
    assert len(arenas.dropped) == 1
