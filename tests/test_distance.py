"""Canonical distances: one float32 per pair, whatever the shape, the thread count or the BLAS kernel."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import pipeline.distance
from pipeline.cluster import Clustering
from pipeline.distance import GRID, MAX_DISTANCE, candidate_margin, distance_matrix, pair_distances
from pipeline.embed import l2_normalise
from pipeline.guards import NumberGuard
from pipeline.offload import Threads

from .support import ROOT


def exact_distance(a: np.ndarray, b: np.ndarray) -> np.float32:
    """The definition, computed the slow way: the exact sum of the exact products, rounded."""
    if not a.any() or not b.any():
        return np.float32(MAX_DISTANCE)
    products = [float(x) * float(y) for x, y in zip(a.tolist(), b.tolist())]
    exact = min(max(math.fsum([1.0] + [-p for p in products]), 0.0), MAX_DISTANCE)
    return np.float32(round(exact / GRID) * GRID)  # round(): half to even, as the grid


def rows(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(max(1, n // 5), d))
    noisy = topics[rng.integers(0, len(topics), n)] + rng.normal(size=(n, d)) * rng.uniform(0.01, 0.5, (n, 1))
    unit = l2_normalise(noisy.astype(np.float32))
    unit[rng.random(n) < 0.05] = 0.0
    return unit


@pytest.mark.parametrize("d", [3, 64, 384, 1536])
def test_matrix_entries_are_the_exact_definition(d):
    unit = rows(d, 40, d)
    distances = distance_matrix(unit)
    for i in range(len(unit)):
        for j in range(len(unit)):
            expected = np.float32(0.0) if i == j else exact_distance(unit[i], unit[j])
            assert distances[i, j] == expected, (i, j)


def test_pairs_sub_matrices_and_transposes_give_the_same_bits():
    unit = rows(1, 300, 384)
    distances = distance_matrix(unit)
    first, second = np.triu_indices(len(unit), 1)
    assert np.array_equal(pair_distances(unit, first, second), distances[first, second])
    assert np.array_equal(pair_distances(unit, second, first), distances[first, second])
    assert np.array_equal(distances, distances.T)
    picked = np.random.default_rng(2).permutation(len(unit))[:77]
    assert np.array_equal(distance_matrix(unit[picked]), distances[np.ix_(picked, picked)])


def test_the_exact_path_agrees_with_the_fast_path(monkeypatch):
    """With a huge error bound every entry is summed exactly: the same bits."""
    unit = rows(3, 60, 384)
    fast = distance_matrix(unit)
    first, second = np.triu_indices(len(unit), 1)
    fast_pairs = pair_distances(unit, first, second)
    monkeypatch.setattr(pipeline.distance, "_error_bound", lambda a, b: 1e-3)
    assert np.array_equal(distance_matrix(unit), fast)
    assert np.array_equal(pair_distances(unit, first, second), fast_pairs)


def test_distances_stay_in_range_for_identical_and_opposite_rows():
    unit = l2_normalise(np.array([[1, 2, 3], [1, 2, 3], [-1, -2, -3], [0, 0, 0]], dtype=np.float32))
    distances = distance_matrix(unit)
    assert distances.min() >= 0.0 and distances.max() <= MAX_DISTANCE
    assert distances[0, 1] == 0.0 and distances[0, 2] == 2.0
    assert (distances[3, :3] == MAX_DISTANCE).all() and distances[3, 3] == 0.0


def test_the_candidate_margin_covers_float32_products():
    """Every pair's float32 `1 - a·b` is within the margin of its canonical distance."""
    for d in (16, 384, 1536):
        unit = rows(d + 1, 400, d)
        unit = unit[unit.any(axis=1)]
        fast = 1.0 - unit @ unit.T
        gap = np.abs(fast.astype(np.float64) - distance_matrix(unit).astype(np.float64))
        np.fill_diagonal(gap, 0.0)
        assert gap.max() < candidate_margin(unit)


KERNEL_SCRIPT = "import json, sys; from tests.test_distance import in_this_process; json.dump(in_this_process(), sys.stdout)"


def cases():
    """Clustering cases whose thresholds sit exactly on, and one float32 step beside,
    pairwise distances, in two tile sizes."""
    for seed in range(6):
        rng = np.random.default_rng(900 + seed)
        unit = rows(seed, int(rng.integers(50, 300)), int(rng.choice([64, 384])))
        texts = ["rose " + str(int(rng.integers(0, 4))) if rng.random() < 0.3 else "flat" for _ in unit]
        distances = distance_matrix(unit)
        pairs = distances[np.triu_indices(len(unit), 1)]
        at = np.float32(rng.choice(pairs[pairs < 0.6]))
        for threshold in (np.nextafter(at, np.float32(0)), at, np.nextafter(at, np.float32(2))):
            for method in ("average", "complete"):
                for tile_bytes in (None, 4 * len(unit) * 7):
                    yield unit, texts, float(threshold), method, tile_bytes


def in_this_process():
    out = []
    for unit, texts, threshold, method, tile_bytes in cases():
        job = Clustering(unit, threshold, method, NumberGuard(texts), tile_bytes=tile_bytes)
        while job.step(Threads(2)) < 1.0:
            pass
        out.append([job.labels.tolist(), job.guarded_pairs, hashlib.sha256(distance_matrix(unit).tobytes()).hexdigest()])
    return out


@pytest.mark.parametrize("kernel", ["Haswell", "Sandybridge", "Prescott"])
def test_the_same_labels_and_bits_under_every_blas_kernel(kernel):
    """OpenBLAS picks its float32 kernel by CPU (or OPENBLAS_CORETYPE); each rounds the
    products differently. Labels, guard counts and canonical distances must not change."""
    env = {**os.environ, "OPENBLAS_CORETYPE": kernel, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == in_this_process()


def test_copies_and_near_copies_need_no_exact_sums(monkeypatch):
    """Duplicates are the commonest pairs here: their distances sit near 0, where a float32
    grid would be ever finer; on the fixed grid they never straddle a rounding boundary,
    so no pair takes the slow exact path."""
    calls = []
    exact = pipeline.distance._exact
    monkeypatch.setattr(pipeline.distance, "_exact", lambda a, b: calls.append(1) or exact(a, b))
    rng = np.random.default_rng(4)
    base = rng.normal(size=(1, 384)).astype(np.float32)
    near = base + 1e-4 * rng.normal(size=(150, 384)).astype(np.float32)
    unit = l2_normalise(np.vstack([np.repeat(base, 150, axis=0), near]))
    distances = distance_matrix(unit)
    assert calls == [] and distances[:150, :150].max() == 0.0


# --------------------------------------------------------------------------- l2_normalise


def reference_unit_rows(x: np.ndarray) -> np.ndarray:
    """The plain definition: float64 rows over np.linalg.norm, zero rows +0.0."""
    wide = x.astype(np.float64)
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    np.divide(wide, norms, out=wide, where=norms > 0)
    wide[(norms == 0).ravel()] = 0.0
    return wide.astype(np.float32)


@pytest.mark.parametrize("n, d", [(0, 4), (1, 1), (3, 5), (1000, 1536), (2049, 384), (700, 3000)])
def test_l2_normalise_is_the_plain_definition_bit_for_bit(n, d):
    rng = np.random.default_rng(n + d)
    scale = rng.choice([1e-30, 1e-3, 1.0, 1e10, 1e30], size=(n, 1))  # float32 squares would overflow
    x = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    if n > 3:
        x[1], x[2], x[3] = 0.0, -0.0, np.float32(1e-45)  # zero rows; a subnormal one
    assert l2_normalise(x).tobytes() == reference_unit_rows(x).tobytes()


def test_l2_normalise_does_not_depend_on_the_block_size(monkeypatch):
    import pipeline.embed

    x = np.random.default_rng(1).normal(size=(300, 96)).astype(np.float32)
    reference = l2_normalise(x)
    for block in (8, 8 * 96 * 7, 1 << 30):  # one row, 7 rows, everything at once
        monkeypatch.setattr(pipeline.embed, "NORMALISE_BLOCK_BYTES", block)
        assert l2_normalise(x).tobytes() == reference.tobytes()


def test_zero_rows_become_positive_zeros_and_float64_input_is_taken():
    x = np.array([[3.0, 4.0], [-0.0, 0.0], [1e100, 1e100]])  # float64, beyond float32
    unit = l2_normalise(x)
    assert unit.dtype == np.float32
    assert unit.tolist() == [[0.6000000238418579, 0.800000011920929], [0.0, 0.0], [0.7071067690849304] * 2]
    assert not np.signbit(unit[1]).any()


@pytest.mark.parametrize("d", [1, 3, 384, 1536, 4096])
def test_the_squared_norm_bound_of_the_candidate_margin_is_never_below_the_exact_one(d):
    from pipeline.distance import _max_squared_norm_bound

    rng = np.random.default_rng(d)
    for scale in (1e-3, 1.0, 1e15):
        rows = (rng.normal(size=(40, d)) * scale).astype(np.float32)
        rows[0] = np.float32(scale)  # equal terms: the float32 sum's worst rounding
        exact = max(math.fsum(float(v) ** 2 for v in row) for row in rows)  # float32 squares are exact in float64
        assert exact <= _max_squared_norm_bound(rows) <= exact * (1 + 2 * (d + 1) * 2.0**-24) + 1e-300
