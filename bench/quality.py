"""`make eval-quality`: how well "duplicate" decisions match people's, on STS-B, and
what happens to long chunks (`long_chunks`).

Pairs with gold similarity >= 4 are duplicates, <= 2 distinct, the rest are
ignored. The model threshold is tuned on train (best F1 with precision >=
0.95) and checked on dev. Every decision goes through the pipeline's own
code: the bundled model, `distance_matrix`, `apply_number_guard` and, for the
rows at default settings, the stage runner itself.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.distance import distance_matrix
from pipeline.cache import EmbeddingCache
from pipeline.embed import BUNDLED_MODEL, FastEmbedModel
from pipeline.offload import Threads
from pipeline.guards import apply_number_guard
from pipeline.profiles import GO_THRESHOLD, coverage_threshold, model_threshold
from pipeline.runner import Defaults, drain, run
from pipeline.types import Chunk, DedupeRequest

from . import long_chunks, sentence_pairs
from .common import table

DATA = Path(os.environ.get("DISTILL_STSB_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"))
MIN_PRECISION = 0.95
PAIRS_PER_KIND = 50
SENTENCE_PAIRS_PER_KIND = 200
SWEEP = np.round(np.arange(0.05, 0.501, 0.005), 3)


@dataclass
class Pairs:
    left: list[str]
    right: list[str]
    duplicate: np.ndarray  # (m,) bool

    @classmethod
    def load(cls, split: str) -> "Pairs":
        left, right, duplicate = [], [], []
        with open(DATA / f"sts-{split}.csv", encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                gold = float(row[4])
                if 2.0 < gold < 4.0:
                    continue
                left.append(row[5])
                right.append(row[6])
                duplicate.append(gold >= 4.0)
        return cls(left, right, np.array(duplicate))


class PrecomputedModel:
    """The real model, its vectors and token states of the given texts computed once and
    served from memory (a text not among them, such as one sentence of a two-sentence
    text, is encoded then)."""

    def __init__(self, model: FastEmbedModel, texts: list[str]):
        self.model, self.name, self.batch_size = model, model.name, 256
        self.encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.encode(sorted(set(texts)))

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans, token_ids, vocabulary
        return getattr(self.model, name)

    def encode(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.encoded]
        for start in range(0, len(missing), 16):
            batch = missing[start : start + 16]
            vectors, states = self.model.encode(batch)
            self.encoded.update(zip(batch, zip(vectors, states)))
        return np.vstack([self.encoded[t][0] for t in texts]), [self.encoded[t][1] for t in texts]

    def embed(self, texts):
        return self.encode(texts)[0]


def pair_distances(pairs: Pairs, model: PrecomputedModel, guard: bool) -> np.ndarray:
    """Each pair's clustering distance, computed as the pipeline computes it."""
    out = np.empty(len(pairs.left))
    for k, (a, b) in enumerate(zip(pairs.left, pairs.right)):
        distances = distance_matrix(model.embed([a, b]))
        if guard:
            apply_number_guard(distances, [a, b], 2.0)
        out[k] = distances[0, 1]
    return out


def scores(merged: np.ndarray, duplicate: np.ndarray) -> dict[str, float]:
    true_pos = np.sum(merged & duplicate)
    precision = true_pos / max(1, merged.sum())
    recall = true_pos / max(1, duplicate.sum())
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    false_merge = np.sum(merged & ~duplicate) / max(1, (~duplicate).sum())
    return {"P": precision, "R": recall, "F1": f1, "distinct merged": false_merge}


def tune(distances: np.ndarray, duplicate: np.ndarray) -> float:
    """Best F1 among thresholds whose precision is >= MIN_PRECISION."""
    best, best_f1 = float(SWEEP[0]), -1.0
    for t in SWEEP:
        s = scores(distances <= t, duplicate)
        if s["P"] >= MIN_PRECISION and s["F1"] > best_f1:
            best, best_f1 = float(t), s["F1"]
    return best


def runner_merges(pairs: Pairs, model: PrecomputedModel, **fields) -> np.ndarray:
    """Merged or not, by running the stage runner on each pair at default settings."""
    merged = []
    for a, b in zip(pairs.left, pairs.right):
        request = DedupeRequest(chunks=(Chunk(text=a), Chunk(text=b)), **fields)
        merged.append(drain(run(request, model, Defaults())).cluster_count == 1)
    return np.array(merged)


def context_level(pairs: Pairs, model: PrecomputedModel, contexts: int = 40, seed: int = 0) -> dict:
    """Contexts of 50 chunks (25 pairs, duplicates and distinct mixed) through the runner.

    Judged on what a user gets back: a removed chunk is right when its
    partner is its duplicate (precision); a duplicate pair is caught when at
    most one of the two survives (recall); `distinct lost` is the share of
    chunks from distinct pairs that were removed.
    """
    rng = random.Random(seed)
    removed = justified = caught = duplicates = lost = distinct = 0
    for _ in range(contexts):
        picked = rng.sample(range(len(pairs.left)), 25)
        texts = [t for k in picked for t in (pairs.left[k], pairs.right[k])]
        chunks = tuple(Chunk(id=str(i), text=t) for i, t in enumerate(texts))
        kept = {int(c.id) for c in drain(run(DedupeRequest(chunks=chunks), model, Defaults())).chunks}
        for p, k in enumerate(picked):
            gone = [i not in kept for i in (2 * p, 2 * p + 1)]
            removed += sum(gone)
            if pairs.duplicate[k]:
                justified += sum(gone)
                duplicates += 1
                caught += any(gone)
            else:
                distinct += 2
                lost += sum(gone)
    precision, recall = justified / max(1, removed), caught / max(1, duplicates)
    return {
        "P": precision,
        "R": recall,
        "F1": 2 * precision * recall / max(1e-12, precision + recall),
        "distinct lost": lost / max(1, distinct),
    }


def main() -> None:
    model = FastEmbedModel()
    splits = {name: Pairs.load(name) for name in ("train", "dev")}
    every_text = [t for p in splits.values() for t in p.left + p.right]
    precomputed = PrecomputedModel(model, every_text)
    raw = {n: pair_distances(p, precomputed, guard=False) for n, p in splits.items()}
    guarded = {n: pair_distances(p, precomputed, guard=True) for n, p in splits.items()}
    alone_t = tune(raw["train"], splits["train"].duplicate)
    guarded_t = tune(guarded["train"], splits["train"].duplicate)
    shipped_t = model_threshold(BUNDLED_MODEL)
    rows = []
    for name, pairs in splits.items():
        settings = [
            (f"Go mode: {GO_THRESHOLD}, no guard", raw[name] <= GO_THRESHOLD),
            (f"threshold alone (tuned): {alone_t}", raw[name] <= alone_t),
            (f"number guard + tuned threshold: {guarded_t}", guarded[name] <= guarded_t),
            (f"numbers guard only: {shipped_t} (runner)", runner_merges(pairs, precomputed, guards=("numbers",))),
            (f"model mode as shipped: {shipped_t} + numbers + coverage (runner)", runner_merges(pairs, precomputed)),
        ]
        for label, merged in settings:
            s = scores(merged, pairs.duplicate)
            rows.append([name, label, s["P"], s["R"], s["F1"], s["distinct merged"]])
    table(
        "STS-B pairs (gold >= 4 duplicate, <= 2 distinct); thresholds tuned on train only",
        ["split", "setting", "P", "R", "F1", "distinct merged"],
        [[r[0], r[1]] + [f"{v:.3f}" for v in r[2:]] for r in rows],
    )
    context = context_level(splits["dev"], precomputed)
    table(
        "Dev contexts of 50 chunks (25 pairs), model mode as shipped, 40 contexts",
        ["P (removals justified)", "R (duplicate pairs caught)", "F1", "distinct chunks lost"],
        [[f"{context[k]:.3f}" for k in ("P", "R", "F1", "distinct lost")]],
    )
    news_table(precomputed)
    sentence_pair_table(precomputed)
    long_chunk_table(model)


def news_table(model: PrecomputedModel) -> None:
    """News sentence pairs, one request of two chunks each, the shorter sent with the
    higher score: P/R/F1 of "merged", and the share of merges that kept a text with
    under 80 % of the other's words. Always STS-B's MSRpar genre (pairs from a news
    paraphrase corpus; gold >= 3.5 counts as a paraphrase); and, when
    DISTILL_NEWS_PAIRS names one, a file of labelled pairs in the Microsoft Research
    Paraphrase Corpus layout (a header, then label, id, id, sentence, sentence)."""
    rows = []
    for name, pairs, paraphrase in news_sets():
        model.encode([t for pair in pairs for t in pair])
        for label, fields in (("numbers guard only", {"guards": ("numbers",)}), ("as shipped", {})):
            merged, short_kept = [], 0
            for pair in pairs:
                shorter, longer = sorted(pair, key=lambda t: (len(t.split()), t))
                chunks = (Chunk(id="s", text=shorter, score=0.9), Chunk(id="l", text=longer, score=0.5))
                result = drain(run(DedupeRequest(chunks=chunks, **fields), model, Defaults()))
                merged.append(result.cluster_count == 1)
                lost = len(shorter.split()) < 0.8 * len(longer.split()) and result.chunks[0].id == "s"
                short_kept += merged[-1] and lost
            s = scores(np.array(merged), paraphrase)
            rows.append([name, label, f"{s['P']:.3f}", f"{s['R']:.3f}", f"{s['F1']:.3f}", str(sum(merged)),
                         f"{short_kept / max(1, sum(merged)):.3f}"])
    table(
        "News sentence pairs (STS-B MSRpar: gold >= 3.5 paraphrase; a labelled file: its labels),"
        " shorter sent with the higher score",
        ["pairs", "setting", "P", "R", "F1", "merges", "merges keeping < 80 % of the words"],
        rows,
    )


def news_sets() -> list[tuple[str, list[tuple[str, str]], np.ndarray]]:
    """(name, sentence pairs, paraphrase or not) for each set of news pairs `news_table` reads."""
    sets = []
    for split in ("train", "dev"):
        with open(DATA / f"sts-{split}.csv", encoding="utf-8") as f:
            found = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r[1] == "MSRpar"]
        sets.append((f"MSRpar {split}", [(r[5], r[6]) for r in found], np.array([float(r[4]) >= 3.5 for r in found])))
    labelled = os.environ.get("DISTILL_NEWS_PAIRS")
    if labelled:
        with open(labelled, encoding="utf-8-sig") as f:
            found = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
        sets.append((Path(labelled).name, [(r[3], r[4]) for r in found], np.array([r[0] == "1" for r in found])))
    return sets


def sentence_pair_table(model: PrecomputedModel) -> None:
    """Per kind of `sentence_pairs` (clause, name or figure dropped; paraphrases;
    neighbours): merged / merged with the fuller kept / apart, on both splits."""
    rows = []
    for split in ("tune", "eval"):
        pair_list = sentence_pairs.pairs(split, SENTENCE_PAIRS_PER_KIND, DATA)
        model.encode([t for p in pair_list for t in (p.fuller, p.other)])
        for label, fields in (("numbers guard only", {"guards": ("numbers",)}), ("as shipped", {})):
            found = sentence_pairs.outcomes(pair_list, model, Defaults(), **fields)
            rows.append([split, label] + ["{:.2f} / {:.2f} / {:.2f}".format(*found[k]) for k in sentence_pairs.KINDS])
    table(
        f"Sentence pairs ({SENTENCE_PAIRS_PER_KIND} per kind and split): merged / fuller kept / apart"
        " (the shorter sent first, with the higher score)",
        ["split", "setting", *sentence_pairs.KINDS],
        rows,
    )


def long_chunk_table(model: FastEmbedModel) -> None:
    """Share of long-chunk pairs answered right, per kind (see `long_chunks`), with and
    without the coverage guard, on the split the coverage distance was tuned on and on
    the held-out one."""
    cache, offload = EmbeddingCache(2 << 30), Threads(2)
    rows = []
    for split in ("tune", "eval"):
        pair_list = long_chunks.pairs(split, PAIRS_PER_KIND)
        settings = [
            ("numbers guard only", {"guards": ("numbers",)}),
            (f"as shipped: numbers + coverage {coverage_threshold(BUNDLED_MODEL)}", {}),
        ]
        for label, fields in settings:
            right = long_chunks.outcomes(pair_list, model, Defaults(), offload, cache, **fields)
            rows.append([split, label] + [f"{right[kind]:.2f}" for kind in long_chunks.KINDS])
    table(
        f"Long chunk pairs from the Python docs ({PAIRS_PER_KIND} per kind and split): share answered right",
        ["split", "setting", "tail apart", "middle apart", "contained: merged, larger kept",
         "neighbours apart", "cosmetic merged"],
        rows,
    )


if __name__ == "__main__":
    main()
