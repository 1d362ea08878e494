"""Maximal Marginal Relevance: re-rank representatives for relevance and diversity."""

from __future__ import annotations

import numpy as np


def mmr_order(unit: np.ndarray, relevance: np.ndarray, lambda_: float, k: int) -> list[int]:
    """Positions of the `k` picks, in pick order.

    unit: (m, d) L2-normalised rows, ordered by input index so that
    `argmax` (first maximum) sends ties to the earliest input; relevance: (m,).
    Each step picks argmax λ·rel − (1−λ)·max(0, max similarity to the picked);
    negative similarities count as 0, as in the Go service.
    """
    m = len(relevance)
    k = min(k, m)
    gain = lambda_ * np.asarray(relevance, dtype=np.float64)
    redundancy = np.zeros(m)  # max(0, max similarity to anything picked)
    available = np.ones(m, dtype=bool)
    picks: list[int] = []
    for step in range(k):
        value = np.where(available, gain - (1 - lambda_) * redundancy, -np.inf)
        pick = int(np.argmax(value))
        picks.append(pick)
        available[pick] = False
        if step + 1 < k:  # (after the last pick nothing reads it)
            np.maximum(redundancy, unit @ unit[pick], out=redundancy)  # float32 product
    return picks
