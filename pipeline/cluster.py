"""Agglomerative clustering on cosine distance, cut at a threshold.

scipy's `linkage` + `fcluster(t, 'distance')` gives the same partition as the
naive loop "merge the closest pair of clusters while their linkage distance is
<= t" (average, single and complete linkage have no inversions), in O(n²)
instead of the Go service's O(n³).
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

MAX_DISTANCE = 2.0


def distance_matrix(unit: np.ndarray) -> np.ndarray:
    """(n, n) float32 cosine distances of L2-normalised rows.

    One float32 matrix product (much faster than `pdist`), clipped to [0, 2]:
    float error makes `1 - x·x` slightly negative, which `fcluster` rejects.
    A zero row is at distance 2 from everything, so it never merges below 2.
    """
    distances = unit @ unit.T
    np.subtract(1.0, distances, out=distances)
    np.clip(distances, 0.0, MAX_DISTANCE, out=distances)
    zero_rows = ~unit.any(axis=1)
    distances[zero_rows, :] = MAX_DISTANCE
    distances[:, zero_rows] = MAX_DISTANCE
    np.fill_diagonal(distances, 0.0)
    return distances


def cluster_labels(distances: np.ndarray, threshold: float, method: str = "average") -> np.ndarray:
    """(n,) int labels 0..k-1, numbered in the order of each cluster's first member.

    `distances`: (n, n) symmetric, zero diagonal; only the upper triangle is read.
    """
    n = distances.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    condensed = squareform(distances, checks=False, force="tovector").astype(np.float64)
    tree = linkage(condensed, method=method)
    return first_member_order(fcluster(tree, t=threshold, criterion="distance"))


def first_member_order(labels: np.ndarray) -> np.ndarray:
    """Renumber arbitrary labels 0..k-1 by first appearance (deterministic cluster ids)."""
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    return rank[inverse.ravel()]


def members(labels: np.ndarray) -> list[np.ndarray]:
    """Input indices of each cluster, in cluster-id order, each ascending."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels))[:-1]
    return np.split(order, bounds)
