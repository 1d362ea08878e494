"""Per-model defaults for model mode.

A cosine threshold means different things for different embedding models, so
the bundled model carries its own, chosen with `make eval-quality` (STS-B train,
the sentence pairs of `bench/sentence_pairs.py` and the long-chunk pairs of
`bench/long_chunks.py`, each tuned on one split and reported on another). A model
without a calibrated profile falls back to the Go service's threshold and a
default token profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from .embed import BUNDLED_MODEL

GO_THRESHOLD = 0.15
CALIBRATED_THRESHOLDS = {BUNDLED_MODEL: 0.27}
# Sentence distance within which the coverage guard compares two sentences of long chunks.
CALIBRATED_COVERAGE = {BUNDLED_MODEL: 0.2}  # tuned on long-chunk pairs (`make eval-quality`)


@dataclass(frozen=True)
class TokenProfile:
    """How `pipeline.tokens` judges that one sentence says everything another says.

    match: token-state cosine similarity at which a token counts as said;
    budget: how many content words' weight may go unsaid;
    margin: how much more one sentence may leave unsaid than the other and still
    count as covering it (content words);
    extra: how many content words the covering sentence may say beyond the other
    (one that says more is a statement of its own, not a restatement);
    idf_scale: the idf at which a token weighs a whole content word.
    """

    match: float = 0.5
    budget: float = 4.5
    margin: float = 0.33
    extra: float = 5.5
    idf_scale: float = 8.0


CALIBRATED_TOKENS = {BUNDLED_MODEL: TokenProfile()}


def model_threshold(model_name: str) -> float:
    return CALIBRATED_THRESHOLDS.get(model_name, GO_THRESHOLD)


def coverage_threshold(model_name: str) -> float:
    """A model without a calibrated coverage distance uses its merge threshold."""
    return CALIBRATED_COVERAGE.get(model_name, model_threshold(model_name))


def token_profile(model_name: str) -> TokenProfile:
    return CALIBRATED_TOKENS.get(model_name, TokenProfile())
