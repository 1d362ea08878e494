"""Selection strategies and MMR: the documented choice, ties to the earliest input."""

from __future__ import annotations

import numpy as np

from pipeline.embed import l2_normalise
from pipeline.mmr import mmr_order
from pipeline.select import min_max, representatives

UNIT = l2_normalise(np.array([[1, 0], [1, 0.2], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32))
TEXTS = ["short", "a much longer text", "medium text", "x", "yy"]
CLUSTERS = [np.array([0, 1, 2]), np.array([3, 4])]


def pick(strategy, scores):
    return representatives(CLUSTERS, strategy, UNIT, np.asarray(scores, dtype=np.float64), TEXTS)


def test_score_takes_the_highest_and_ties_go_to_the_earliest():
    assert pick("score", [0.1, 0.9, 0.5, 0.3, 0.2]) == [1, 3]
    assert pick("score", [0.5, 0.5, 0.5, 0.2, 0.2]) == [0, 3]


def test_length_takes_the_longest_text():
    assert pick("length", [0] * 5) == [1, 4]


def test_centroid_takes_the_member_closest_to_the_mean():
    assert pick("centroid", [0] * 5)[0] == 2  # [1, 0.1] sits between the others


def test_hybrid_blends_score_and_centroid_closeness():
    # Scores decide when they differ a lot: member 0 has the top score.
    assert pick("hybrid", [1.0, 0.0, 0.0, 0, 0])[0] == 0
    # Equal scores: centroid closeness decides.
    assert pick("hybrid", [0.5, 0.5, 0.5, 0, 0])[0] == 2


def test_min_max_maps_equal_values_to_one():
    assert min_max(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]
    assert min_max(np.array([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]


def test_mmr_with_lambda_one_is_pure_relevance():
    unit = l2_normalise(np.eye(4, dtype=np.float32))
    assert mmr_order(unit, np.array([0.2, 0.9, 0.5, 0.7]), 1.0, 3) == [1, 3, 2]


def test_mmr_trades_relevance_for_diversity():
    unit = l2_normalise(np.array([[1, 0], [1, 0.05], [0, 1]], dtype=np.float32))
    relevance = np.array([1.0, 0.95, 0.6])
    assert mmr_order(unit, relevance, 0.5, 2) == [0, 2]  # the near-copy of 0 loses to the distinct one
    assert mmr_order(unit, relevance, 1.0, 2) == [0, 1]


def test_mmr_ties_go_to_the_earliest_and_negative_similarity_counts_as_zero():
    unit = l2_normalise(np.array([[1, 0], [-1, 0], [0, 1]], dtype=np.float32))
    # After picking 0, item 1 (similarity -1 -> 0) and item 2 (0) tie: earliest wins.
    assert mmr_order(unit, np.array([1.0, 0.5, 0.5]), 0.5, 3) == [0, 1, 2]


def test_mmr_never_picks_more_than_available():
    unit = l2_normalise(np.eye(2, dtype=np.float32))
    assert mmr_order(unit, np.ones(2), 0.5, 5) == [0, 1]
