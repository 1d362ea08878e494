"""Clustering: scipy's linkage cut at t == the naive "merge closest while <= t" loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import pipeline.cluster
from pipeline.cluster import cluster_labels, first_member_order, members
from pipeline.distance import distance_matrix
from pipeline.embed import l2_normalise

LINKAGE_OF = {"average": np.mean, "single": np.min, "complete": np.max}


def naive_partition(distances: np.ndarray, threshold: float, method: str) -> list[list[int]]:
    """The reference: merge the closest pair of clusters while their linkage distance <= t."""
    clusters = [[i] for i in range(len(distances))]
    combine = LINKAGE_OF[method]
    while len(clusters) > 1:
        best, pair = np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = combine(distances[np.ix_(clusters[a], clusters[b])])
                if d < best:
                    best, pair = d, (a, b)
        if best > threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


def partition(labels: np.ndarray) -> list[list[int]]:
    return sorted(m.tolist() for m in members(labels))


def planted(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n unit vectors: a few topics, each with near-duplicates at varied noise."""
    topics = rng.normal(size=(max(1, n // 4), d))
    rows = topics[rng.integers(0, len(topics), n)] + rng.normal(size=(n, d)) * rng.uniform(0.05, 0.8, (n, 1))
    return l2_normalise(rows.astype(np.float32))


@pytest.mark.parametrize("method", ["average", "single", "complete"])
@pytest.mark.parametrize("seed", range(40))
def test_scipy_cut_equals_naive_merge_loop(method, seed):
    rng = np.random.default_rng(seed)
    unit = planted(rng, int(rng.integers(2, 30)), int(rng.choice([8, 32, 384])))
    distances = distance_matrix(unit)
    threshold = float(rng.uniform(0.05, 0.9))
    expected = naive_partition(distances.astype(np.float64), threshold, method)
    assert partition(cluster_labels(distances, threshold, method)) == expected


def test_distances_are_clipped_and_zero_rows_are_far_from_everything():
    unit = l2_normalise(np.array([[1, 0], [1, 1e-4], [-1, 0], [0, 0], [0, 0]], dtype=np.float32))
    distances = distance_matrix(unit)
    assert distances.min() >= 0.0 and distances.max() <= 2.0
    assert distances[0, 2] == pytest.approx(2.0)
    assert (distances[3, [0, 1, 2, 4]] == 2.0).all() and (distances[:, 3][[0, 1, 2, 4]] == 2.0).all()
    assert np.diag(distances).tolist() == [0.0] * 5


def test_rounding_never_makes_a_distance_negative():
    rng = np.random.default_rng(7)
    unit = l2_normalise(np.repeat(rng.normal(size=(1, 384)).astype(np.float32), 50, axis=0))
    distances = distance_matrix(unit)
    assert distances.min() >= 0.0
    assert cluster_labels(distances, 0.15).tolist() == [0] * 50


def test_zero_vectors_stay_alone_below_threshold_two():
    unit = l2_normalise(np.array([[0, 0], [0, 0], [1, 0], [1, 0]], dtype=np.float32))
    assert cluster_labels(distance_matrix(unit), 1.99).tolist() == [0, 1, 2, 2]
    assert cluster_labels(distance_matrix(unit), 2.0).tolist() == [0, 0, 0, 0]


def test_single_and_all_distinct_and_all_identical():
    assert cluster_labels(np.zeros((1, 1), dtype=np.float32), 0.15).tolist() == [0]
    eye = np.eye(5, dtype=np.float32)
    assert cluster_labels(distance_matrix(eye), 0.5).tolist() == [0, 1, 2, 3, 4]
    same = l2_normalise(np.ones((4, 3), dtype=np.float32))
    assert cluster_labels(distance_matrix(same), 0.01).tolist() == [0, 0, 0, 0]


def test_cluster_ids_follow_first_member_order():
    assert first_member_order(np.array([7, 3, 7, 9, 3])).tolist() == [0, 1, 0, 2, 1]
    unit = l2_normalise(np.array([[0, 1], [1, 0], [0, 1], [1, 0.01]], dtype=np.float32))
    labels = cluster_labels(distance_matrix(unit), 0.1)
    assert labels.tolist() == [0, 1, 0, 1]
    assert [m.tolist() for m in members(labels)] == [[0, 2], [1, 3]]


def whole_matrix_scipy(distances: np.ndarray, threshold: float, method: str) -> np.ndarray:
    condensed = squareform(distances, checks=False).astype(np.float64)
    return first_member_order(fcluster(linkage(condensed, method=method), t=threshold, criterion="distance"))


@pytest.mark.parametrize("method", ["average", "complete"])
@pytest.mark.parametrize("seed", range(30))
def test_tight_groups_are_one_cluster_each_as_scipy_finds(method, seed):
    """Groups of near-copies (every pair within t: a component that is one cluster),
    mixed with looser groups that the linkage must split; thresholds near the
    groups' widest pair too."""
    rng = np.random.default_rng(300 + seed)
    groups = rng.normal(size=(8, 64))
    noise = rng.choice([0.01, 0.05, 0.3], size=8)
    which = rng.integers(0, 8, int(rng.integers(20, 120)))
    unit = l2_normalise((groups[which] + noise[which, None] * rng.normal(size=(len(which), 64))).astype(np.float32))
    distances = distance_matrix(unit)
    widest = max(distances[np.ix_(which == g, which == g)].max() for g in set(which.tolist()))
    for threshold in (float(rng.uniform(0.01, 0.6)), float(widest), float(np.nextafter(widest, 2))):
        assert cluster_labels(distances, threshold, method).tolist() == whole_matrix_scipy(distances, threshold, method).tolist()


def test_a_component_with_every_pair_within_t_skips_the_linkage(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("linkage ran")

    monkeypatch.setattr(pipeline.cluster, "linkage", refuse)
    unit = l2_normalise(np.array([[1, 0, 0], [1, 0.01, 0], [1, 0, 0.01], [0, 1, 0], [0, 1, 0.01], [0, 1.01, 0]], dtype=np.float32))
    assert cluster_labels(distance_matrix(unit), 0.05).tolist() == [0, 0, 0, 1, 1, 1]
