"""Clustering in tiles and component batches gives the reference's labels, label for label.

The reference is the whole canonical matrix: `distance_matrix`,
`apply_number_guard`, `cluster_labels`. Tiny tiles (a few rows each) and tiny
component batches make every case cross many tile and batch edges.
It runs 3 pieces of work at once on real threads (`Threads(3)`), as a server
runs 2, unless a test says otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.cluster
from pipeline.cluster import SPLIT_MIN_N, Clustering, cluster_labels, tile_rows
from pipeline.distance import distance_matrix
from pipeline.embed import l2_normalise
from pipeline.guards import NumberGuard, apply_number_guard
from pipeline.offload import INLINE, Threads
from pipeline.runner import run
from pipeline.types import Chunk, DedupeRequest, StageEvent

METHODS = ["average", "single", "complete"]
WIDE = Threads(3)


def full(unit, threshold, method, texts=None):
    distances = distance_matrix(unit)
    guarded = apply_number_guard(distances, texts, threshold) if texts else 0
    return cluster_labels(distances, threshold, method), guarded


def tiled(unit, threshold, method, texts=None, tile_bytes=None, offload=WIDE):
    """The tiled path; tiles of about n·rows float32, `rows` = n/8 unless tile_bytes is given."""
    tile_bytes = tile_bytes or 4 * len(unit) * max(2, len(unit) // 8)
    job = Clustering(unit, threshold, method, NumberGuard(texts) if texts else None, tile_bytes=tile_bytes)
    while job.step(offload) < 1.0:
        pass
    return job.labels, job.guarded_pairs


def assert_same(unit, threshold, method, texts=None, tile_bytes=None, offload=WIDE):
    expected, expected_guarded = full(unit, threshold, method, texts)
    labels, guarded = tiled(unit, threshold, method, texts, tile_bytes, offload)
    assert labels.tolist() == expected.tolist()
    assert guarded == expected_guarded
    return expected


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Components share a batch only up to 7 rows (many batches, some with one big component);
    pending edges are folded into components every 50."""
    monkeypatch.setattr(pipeline.cluster, "BATCH_ROWS", 7)
    monkeypatch.setattr(pipeline.cluster, "_PENDING_EDGES", 50)


def planted(rng, n, d):
    """Topics with near-duplicates at varied noise, some exact copies."""
    topics = rng.normal(size=(max(1, n // 5), d))
    rows = topics[rng.integers(0, len(topics), n)] + rng.normal(size=(n, d)) * rng.uniform(0.02, 0.6, (n, 1))
    copies = rng.random(n) < 0.1
    rows[copies] = rows[rng.integers(0, n, copies.sum())]
    return l2_normalise(rows.astype(np.float32))


@pytest.mark.parametrize("offload", [INLINE, WIDE], ids=["one at a time", "three at once"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(25))
def test_planted_duplicates(method, seed, offload):
    rng = np.random.default_rng(seed)
    unit = planted(rng, int(rng.integers(2, 300)), int(rng.choice([8, 64, 384, 1536])))
    threshold = float(rng.uniform(0.02, 0.9))
    assert_same(unit, threshold, method, tile_bytes=4 * len(unit) * int(rng.integers(2, 40)), offload=offload)


def test_a_step_runs_as_many_pieces_as_the_offload_is_wide(monkeypatch):
    """T tiles and one batch of components: T + 1 steps one at a time, ceil(T / 4) + 1
    four at a time, and the same labels."""
    monkeypatch.setattr(pipeline.cluster, "BATCH_ROWS", 1000)
    unit = planted(np.random.default_rng(3), 64, 16)
    tiles = len(tile_rows(64, 16, 4 * 64 * 4))
    assert tiles > 8

    def steps(offload):
        job = Clustering(unit, 0.3, tile_bytes=4 * 64 * 4)
        count = 1
        while job.step(offload) < 1.0:
            count += 1
        return count, job.labels.tolist()

    expected = full(unit, 0.3, "average")[0].tolist()
    assert steps(INLINE) == (tiles + 1, expected)
    assert steps(Threads(4)) == (-(-tiles // 4) + 1, expected)


@pytest.mark.parametrize("n", [2, 3, 255, 256, 257, 600, 3000])
def test_small_n_is_two_tiles_of_equal_work_from_the_split_size(n):
    """At default tile sizes a few thousand rows fit one tile; from SPLIT_MIN_N it is cut in
    two of about equal work, one per thread; the labels and guard count are the
    reference's whether the tiles ran one after the other or at once."""
    rng = np.random.default_rng(n)
    unit, texts = planted(rng, n, 32), numbered_texts(rng, n)
    tiles = tile_rows(n, 32)
    assert len(tiles) == (2 if n >= SPLIT_MIN_N else 1)
    if len(tiles) == 2:  # the second is square: a symmetric product, half the work
        work = [(r1 - r0) * (n - r0) / (2 if r1 == n else 1) for r0, r1 in tiles]
        assert max(work) <= 0.51 * sum(work) + n
    expected = full(unit, 0.3, "average", texts)
    for offload in (INLINE, WIDE):
        job = Clustering(unit, 0.3, "average", NumberGuard(texts))
        while job.step(offload) < 1.0:
            pass
        assert (job.labels.tolist(), job.guarded_pairs) == (expected[0].tolist(), expected[1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(5))
def test_chain_is_one_giant_single_linkage_component(method, seed):
    """Points along an arc, each close to the next: single linkage joins them all, the others split."""
    rng = np.random.default_rng(seed)
    n, d = 250, 32
    angles = np.cumsum(rng.uniform(0.01, 0.03, n))
    rows = np.zeros((n, d))
    rows[:, 0], rows[:, 1] = np.cos(angles), np.sin(angles)
    rows[:, 2:] = 0.001 * rng.normal(size=(n, d - 2))
    unit = l2_normalise(rows.astype(np.float32))
    labels = assert_same(unit, 0.002, method)
    if method == "single":
        assert labels.max() == 0
    else:
        assert labels.max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_one_giant_component(method):
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(1, 64)) + 0.15 * rng.normal(size=(300, 64))
    labels = assert_same(l2_normalise(rows.astype(np.float32)), 0.05, method)
    assert method != "single" or labels.max() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(30))
def test_exact_ties(method, seed):
    """Entries ±1/4 in 16 dimensions: unit norm exactly, every distance a multiple of 1/16,
    so many pairs are exactly tied; plus exact duplicate rows. Thresholds on and between
    the distance grid. (scipy on the whole matrix breaks such ties differently from
    scipy per component; `cluster_labels` is per component, so both paths agree.)"""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 250))
    prototypes = rng.choice([-0.25, 0.25], size=(max(1, n // 8), 16)).astype(np.float32)
    unit = prototypes[rng.integers(0, len(prototypes), n)]
    unit[rng.random((n, 16)) < rng.uniform(0.02, 0.3)] *= -1
    duplicated = rng.random(n) < 0.2
    unit[duplicated] = unit[rng.integers(0, n, duplicated.sum())]
    threshold = float(rng.choice([0.125, 0.25, 0.3, 0.375, 0.5, 0.6]))
    assert_same(unit, threshold, method, tile_bytes=4 * n * int(rng.integers(2, 40)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.999999, 1.0, 1.3, 1.99, 2.0])
def test_zero_vectors_stay_apart_below_two(method, threshold):
    rng = np.random.default_rng(5)
    unit = planted(rng, 120, 16)
    unit[rng.random(120) < 0.15] = 0.0
    labels = assert_same(unit, threshold, method)
    zeros = np.flatnonzero(~unit.any(axis=1))
    if threshold < 2:
        assert len(set(labels[zeros].tolist())) == len(zeros)
    else:
        assert labels.max() == 0


def numbered_texts(rng, n):
    """Texts with 0-2 numbers from a small pool: many pairs guarded, many not."""
    texts = []
    for _ in range(n):
        numbers = rng.choice(["3", "5", "7", "2023", "3.0"], size=int(rng.integers(0, 3)), replace=False)
        texts.append("rose " + " and ".join(numbers))
    return texts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(10))
def test_number_guard_and_its_count(method, seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 250))
    unit = planted(rng, n, 32)
    texts = numbered_texts(rng, n)
    threshold = float(rng.uniform(0.05, 0.8))
    assert_same(unit, threshold, method, texts, tile_bytes=4 * n * int(rng.integers(2, 40)))


@pytest.mark.parametrize("method", METHODS)
def test_number_guard_at_threshold_two(method):
    rng = np.random.default_rng(9)
    unit, texts = planted(rng, 80, 16), numbered_texts(rng, 80)
    assert assert_same(unit, 2.0, method, texts).max() == 0
    assert tiled(unit, 2.0, method, texts)[1] > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(10))
def test_thresholds_on_and_next_to_pairwise_distances(method, seed):
    """t exactly at a float32 distance and one float32 step either side: the edge
    filter's margin and the exact cut must agree with the full path."""
    rng = np.random.default_rng(200 + seed)
    unit = planted(rng, int(rng.integers(10, 200)), 64)
    distances = distance_matrix(unit)
    pairs = distances[np.triu_indices(len(unit), 1)]
    at = np.float32(rng.choice(pairs[pairs < 0.8]))
    for threshold in (np.nextafter(at, np.float32(0)), at, np.nextafter(at, np.float32(2))):
        assert_same(unit, float(threshold), method)
    texts = numbered_texts(rng, len(unit))
    assert_same(unit, float(at), method, texts)


def test_one_point_and_two_points():
    assert tiled(l2_normalise(np.ones((2, 3), dtype=np.float32)), 0.1, "average")[0].tolist() == [0, 0]
    job = Clustering(np.ones((1, 3), dtype=np.float32), 0.1)
    assert job.step() == 1.0 and job.labels.tolist() == [0]


def test_runner_reports_fractional_clustering_progress_per_tile(monkeypatch):
    """In small tiles, the clustering stage reports progress between 0 and 1, rising,
    and ends with the labels and stats of the full path. The clock moves 1 s per
    reading, so the throttle lets every step through."""
    rng = np.random.default_rng(11)
    n = 600
    unit = planted(rng, n, 32)
    texts = numbered_texts(rng, n)
    chunks = tuple(Chunk(id=str(i), text=t, score=i % 5, embedding=v) for i, (t, v) in enumerate(zip(texts, unit)))
    request = DedupeRequest(chunks=chunks, threshold=0.3, guards=("numbers",))
    ticks = iter(range(10**6))

    def clock():
        return float(next(ticks))

    expected = list(run(request, embedder=None))
    monkeypatch.setattr(pipeline.cluster, "TILE_BYTES", 4 * 5000)
    items = list(run(request, embedder=None, clock=clock))
    progress = [e for e in items if isinstance(e, StageEvent) and e.stage == "clustering"]
    fractions = [e.progress for e in progress[1:-1]]
    assert progress[0].progress == 0.0 and progress[-1].progress == 1.0
    assert len(fractions) >= 10
    assert all(0 < p < 1 for p in fractions) and fractions == sorted(fractions)
    assert items[-1].chunks == expected[-1].chunks
    full_stats = [e.stats for e in expected if isinstance(e, StageEvent) and e.stage == "clustering"][-1]
    stats = dict(progress[-1].stats)
    assert stats.pop("duration_ms") >= 0 and full_stats.pop("duration_ms") >= 0
    assert stats == full_stats and stats["guarded_pairs"] > 0
