"""The number guard on hand-written pairs, and through clustering."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cluster import cluster_labels
from pipeline.embed import BUNDLED_MODEL
from pipeline.guards import apply_number_guard, numbers_in
from pipeline.profiles import model_threshold
from pipeline.runner import drain, run
from pipeline.types import Chunk, DedupeRequest


@pytest.mark.parametrize(
    "text, numbers",
    [
        ("Revenue rose 3% in 2023.", {"3", "2023"}),
        ("3.0 and 3", {"3"}),
        ("3,000 units or 3000 units", {"3000"}),
        ("It fell to -5 degrees, then +5", {"-5", "5"}),
        ("\u22125 is minus five", {"-5"}),
        ("pages 2-3", {"2", "3"}),
        ("version v1.2 of covid19", set()),
        ("0.50 and .5 and 0.5", {"0.5"}),
        ("-0 equals 0", {"0"}),
        ("no numbers here, three of them", set()),
        ("1,234.50 dollars", {"1234.5"}),
    ],
)
def test_numbers_are_extracted_and_normalised(text, numbers):
    assert numbers_in(text) == frozenset(numbers)


def guard(texts, distance=0.05, threshold=0.3):
    n = len(texts)
    distances = np.full((n, n), distance, dtype=np.float32)
    np.fill_diagonal(distances, 0)
    separated = apply_number_guard(distances, texts, threshold)
    return distances, separated


def test_different_numbers_are_kept_apart():
    distances, separated = guard(["Revenue rose 3%.", "Revenue rose 5%."])
    assert distances[0, 1] == distances[1, 0] == 2.0
    assert separated == 1


def test_same_number_in_another_format_is_not_guarded():
    distances, separated = guard(["Sales hit 3,000 units.", "Sales reached 3000.0 units."])
    assert distances[0, 1] == pytest.approx(0.05)
    assert separated == 0


def test_texts_without_numbers_or_with_a_subset_are_unaffected():
    distances, separated = guard(
        ["A man plays a flute.", "A man plays the flute.", "In 2012 a man plays 2 flutes.", "A man plays 2 flutes."]
    )
    assert separated == 0
    assert (distances[~np.eye(4, dtype=bool)] == np.float32(0.05)).all()


def test_separated_counts_only_pairs_within_threshold():
    distances, separated = guard(["rose 3%", "rose 5%", "rose 7%"], distance=0.5, threshold=0.3)
    assert separated == 0
    assert (distances[~np.eye(3, dtype=bool)] == 2.0).all()


def test_a_guarded_pair_is_not_merged_through_a_third_chunk():
    texts = ["Revenue rose 3% this year.", "Revenue rose this year.", "Revenue rose 5% this year."]
    distances = np.array([[0, 0.1, 0.12], [0.1, 0, 0.1], [0.12, 0.1, 0]], dtype=np.float32)
    threshold = model_threshold(BUNDLED_MODEL)
    assert cluster_labels(distances.copy(), threshold).tolist() == [0, 0, 0]  # without the guard
    apply_number_guard(distances, texts, threshold)
    labels = cluster_labels(distances, threshold)
    assert labels[0] != labels[2]


def test_the_real_model_with_defaults_keeps_different_numbers(embedder):
    texts = ["Revenue rose 3% this year.", "Revenue rose this year.", "Revenue rose 5% this year."]
    request = DedupeRequest(chunks=tuple(Chunk(id=str(i), text=t) for i, t in enumerate(texts)))
    kept = [c.text for c in drain(run(request, embedder)).chunks]
    assert texts[0] in kept and texts[2] in kept


def test_guard_is_vectorised_across_blocks():
    texts = [f"item {i % 1500}" for i in range(3000)]
    distances, separated = guard(texts, distance=0.1, threshold=0.3)
    assert distances[0, 1500] == pytest.approx(0.1)  # same number
    assert distances[0, 1] == 2.0 and distances[2999, 0] == 2.0
    assert separated == 3000 * 2999 // 2 - 1500
