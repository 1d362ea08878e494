"""Choose one representative per cluster.

Every strategy breaks ties toward the earliest input, so the same request
always keeps the same chunk.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

HYBRID_SCORE_WEIGHT = 0.7


def representatives(
    clusters: Sequence[np.ndarray],
    strategy: str,
    unit: np.ndarray,
    scores: np.ndarray,
    texts: Sequence[str],
    eligible: np.ndarray | None = None,
) -> list[int]:
    """The input index chosen in each cluster, in cluster order.

    clusters: ascending input indices per cluster; unit: (n, d) L2-normalised
    rows; scores: (n,) float64; eligible: (n,) bool, the chunks that may
    represent their cluster (with the coverage guard: those covering every other
    member); the strategy chooses among them (default: every chunk may).
    """
    choose = _STRATEGIES[strategy]
    picked = []
    for members in clusters:
        if eligible is not None:
            members = members[eligible[members]]
        picked.append(int(members[choose(members, unit, scores, texts)]))
    return picked


def best_scored(labels: np.ndarray, scores: np.ndarray) -> list[int]:
    """`representatives(members(labels), "score", ...)` when every chunk may represent its
    cluster, in one sort instead of a member list and an argmax per cluster (~700 clusters:
    3 ms -> 0.2 ms): each cluster's highest score, ties to the earliest input."""
    order = np.lexsort((-scores, labels))  # by cluster, then score descending; stable: input order
    sorted_labels = labels[order]
    firsts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    return order[firsts].tolist()


def _by_score(members, unit, scores, texts) -> int:
    return int(np.argmax(scores[members]))  # argmax returns the first maximum


def _by_length(members, unit, scores, texts) -> int:
    return int(np.argmax([len(texts[i]) for i in members]))


def _by_centroid(members, unit, scores, texts) -> int:
    return int(np.argmax(_centroid_closeness(unit[members])))


def _by_hybrid(members, unit, scores, texts) -> int:
    blended = HYBRID_SCORE_WEIGHT * min_max(scores[members]) + (
        1 - HYBRID_SCORE_WEIGHT
    ) * min_max(_centroid_closeness(unit[members]))
    return int(np.argmax(blended))


def _centroid_closeness(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row to the members' mean (0 for a zero mean)."""
    mean = vectors.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm == 0:
        return np.zeros(len(vectors))
    return vectors.astype(np.float64) @ (mean / norm)


def min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; all-equal values become 1 (every member equally good)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if high == low:
        return np.ones_like(values)
    return (values - low) / (high - low)


_STRATEGIES = {
    "score": _by_score,
    "length": _by_length,
    "centroid": _by_centroid,
    "hybrid": _by_hybrid,
}
