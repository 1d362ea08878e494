"""Per-model defaults for model mode.

A cosine threshold means different things for different embedding models, so
the bundled model carries its own, chosen on STS-B train (best F1 with
precision >= 0.95) and checked on dev. A model without a calibrated profile
falls back to the Go service's threshold.
"""

from __future__ import annotations

from .embed import BUNDLED_MODEL

GO_THRESHOLD = 0.15
CALIBRATED_THRESHOLDS = {BUNDLED_MODEL: 0.255}  # `make eval-quality` prints how
# Sentence distance within which the coverage guard counts a sentence as said.
CALIBRATED_COVERAGE = {BUNDLED_MODEL: 0.2}  # tuned on long-chunk pairs (`make eval-quality`)


def model_threshold(model_name: str) -> float:
    return CALIBRATED_THRESHOLDS.get(model_name, GO_THRESHOLD)


def coverage_threshold(model_name: str) -> float:
    """A model without a calibrated coverage distance uses its merge threshold."""
    return CALIBRATED_COVERAGE.get(model_name, model_threshold(model_name))
