"""`make token-weights`: how much each token of the bundled model's vocabulary weighs
when the coverage guard asks whether a text says everything another says.

A token's weight is its inverse document frequency (idf) over sentences people
write: the Python documentation's library reference (the split the long-chunk
table tunes on) and the STS-B training sentences (news, captions, forums). Words
in nearly every sentence ("the", "of", ".") weigh little; names, figures and
rare words weigh most. Writes `pipeline/data/idf-<model>.npy`: (vocabulary,)
uint16, idf x 1000 (so the table, and every weight drawn from it, is the same
integers on every machine).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.embed import BUNDLED_MODEL, FastEmbedModel
from pipeline.segment import units

from . import long_chunks
from .quality import DATA

OUT = Path(__file__).resolve().parents[1] / "pipeline" / "data" / f"idf-{BUNDLED_MODEL.split('/')[-1]}.npy"


def sentences() -> list[str]:
    """Documentation sentences (library reference) and STS-B training sentences."""
    found = [doc[a:b] for doc in long_chunks.documents("tune") for a, b in units(doc)]
    with open(DATA / "sts-train.csv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            found.extend(row[5:7])
    return sorted(set(found))


def main() -> None:
    model = FastEmbedModel()
    texts = sentences()
    vocabulary = len(model.vocabulary())
    frequency = np.zeros(vocabulary, dtype=np.int64)
    for start in range(0, len(texts), 4096):
        for ids in model.token_ids(texts[start : start + 4096]):
            frequency[np.unique(ids)] += 1
    idf = np.log((len(texts) + 1) / (frequency + 1))
    np.save(OUT, np.rint(idf * 1000).astype(np.uint16))
    print(f"{OUT.name}: {len(texts)} sentences, {np.count_nonzero(frequency)} of {vocabulary} tokens seen")


if __name__ == "__main__":
    main()
