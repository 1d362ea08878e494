"""Why each chunk was kept or dropped: the `explain` object of a response.

Pure functions over what the runner already has (unit vectors, cluster
labels, the representatives, the MMR picks, the guard objects), run only when
a request asks for it. Everything here must give the same bytes on every
machine:

* a distance is the canonical one clustering decided on (`pipeline.distance`),
  shown to 6 decimals;
* the map is the PCA of the unit vectors, with a canonical direction for each
  axis (see `pca_map`), rounded to 4 decimals.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol, Sequence

import numpy as np
from scipy import linalg

from .distance import candidate_margin, candidate_pairs, float32_cutoff, pair_distances
from .offload import INLINE, Offload

MAX_GUARDED_PAIRS = 1000
DISTANCE_DECIMALS = 6
MAP_DECIMALS = 4
TILE_ENTRIES = 1 << 22  # float32 similarities per tile (16 MB): small, so the search stops soon
TIE = 1e-6  # eigenvalues this close (relative; float32 inputs carry ~6e-8) are one eigenspace
FLAT = 1e-12  # an axis with variance below this share of the largest has no spread
NOT_AT_CENTRE = 1e-6  # a point this far out (relative) along an axis can orient it


class Guard(Protocol):
    """What explain needs of a guard: its wire name, and which pairs it separates."""

    name: str

    def separates(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(e,) bool: whether texts first[k] and second[k] are held apart."""
        ...


def explain(
    ids: Sequence[str],
    unit: np.ndarray,
    labels: np.ndarray,
    representatives: Sequence[int],
    kept: Sequence[int],
    threshold: float,
    guards: Sequence[Guard],
    offload: Offload = INLINE,
) -> dict:
    """The wire object: `chunks` (one row per input), `guarded_pairs`, `map`.

    unit: (n, d) float32, rows L2-normalised (or zero); labels: (n,) cluster
    ids; representatives: the input index chosen in each cluster, by cluster
    id; kept: the input indices returned (after MMR, when it ran). The parts
    run on `offload` (the same answer at any width).
    """
    rows, layout = offload.all([
        partial(chunk_rows, ids, unit, labels, representatives, kept), partial(pca_map, unit),
    ])
    pairs = guarded_pairs(unit, threshold, guards, offload=offload)
    return {"chunks": rows, "guarded_pairs": pairs, "map": layout}


def with_frozen_prefix(explained: dict | None, frozen_ids: Sequence[str]) -> dict:
    """The explain object of a whole request whose first chunks were frozen (a cache
    prefix): their rows first (state `frozen`, cluster -1; never embedded, so no place
    on the map: null), then the suffix's, every index shifted past the prefix."""
    k = len(frozen_ids)
    explained = explained or {"chunks": [], "guarded_pairs": [], "map": []}
    rows = [
        {"index": i, "id": chunk_id, "cluster_id": -1, "state": "frozen", "kept_index": None, "distance": None}
        for i, chunk_id in enumerate(frozen_ids)
    ]
    for row in explained["chunks"]:
        kept_index = row["kept_index"]
        rows.append({**row, "index": row["index"] + k, "kept_index": None if kept_index is None else kept_index + k})
    pairs = [{**pair, "a": pair["a"] + k, "b": pair["b"] + k} for pair in explained["guarded_pairs"]]
    return {"chunks": rows, "guarded_pairs": pairs, "map": [None] * k + explained["map"]}


def chunk_rows(
    ids: Sequence[str],
    unit: np.ndarray,
    labels: np.ndarray,
    representatives: Sequence[int],
    kept: Sequence[int],
) -> list[dict]:
    """Per input: `kept`; `duplicate` of its cluster's representative (at `distance` from
    it, even when MMR then left that representative out); or `mmr` (a representative
    MMR left out)."""
    representative = np.asarray(representatives, dtype=np.int64)[labels]
    distances = cosine_distances(unit, np.arange(len(unit)), representative)
    returned = set(kept)
    rows = []
    columns = zip(ids, labels.tolist(), representative.tolist(), distances.tolist())
    for i, (chunk_id, cluster, rep, distance) in enumerate(columns):
        if rep != i:
            state, kept_index, distance = "duplicate", rep, round(distance, DISTANCE_DECIMALS)
        elif i in returned:
            state, kept_index, distance = "kept", i, 0.0
        else:
            state, kept_index, distance = "mmr", None, None
        rows.append({
            "index": i, "id": chunk_id, "cluster_id": cluster,
            "state": state, "kept_index": kept_index, "distance": distance,
        })
    return rows


def cosine_distances(unit: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(e,) float64: the canonical distances of rows first[k] and second[k] (the ones
    clustering decided on, the same on every machine), in [0, 2]."""
    return pair_distances(unit, first, second).astype(np.float64)


def guarded_pairs(
    unit: np.ndarray,
    threshold: float,
    guards: Sequence[Guard],
    limit: int = MAX_GUARDED_PAIRS,
    offload: Offload = INLINE,
) -> list[dict]:
    """Pairs (a < b) within `threshold` by distance alone that a guard held apart,
    ascending, at most `limit`; each names the first guard (in `guards` order)
    that separates it.

    Row tiles of float32 similarities find the candidates (upper triangle, with a
    margin), the guards judge them, and the canonical distance decides. Tiles run
    `offload.width` at a time, in row order, until `limit` pairs are found: the
    first found are the smallest pairs.
    """
    n = len(unit)
    if not guards or n < 2:
        return []
    tiles, r0 = [], 0
    while r0 < n - 1:
        tiles.append((r0, min(n, r0 + max(1, TILE_ENTRIES // (n - r0)))))
        r0 = tiles[-1][1]
    found: list[dict] = []
    for start in range(0, len(tiles), offload.width):
        group = tiles[start : start + offload.width]
        for pairs in offload.all([partial(_tile_pairs, unit, r0, r1, threshold, guards) for r0, r1 in group]):
            found.extend(pairs)
        if len(found) >= limit:
            break
    return found[:limit]


def _tile_pairs(
    unit: np.ndarray, r0: int, r1: int, threshold: float, guards: Sequence[Guard]
) -> list[dict]:
    """The guarded pairs (a, b) with r0 <= a < r1, a < b, ascending."""
    min_similarity = np.float32(1.0 - float(float32_cutoff(threshold)) - candidate_margin(unit))
    first, second = candidate_pairs(unit, r0, r1, min_similarity)
    guard_of = _first_separating_guard(guards, first, second)
    held = guard_of >= 0
    first, second, guard_of = first[held], second[held], guard_of[held]
    within = pair_distances(unit, first, second) <= float32_cutoff(threshold)
    return [
        _guarded_pair(a, b, guards[g])
        for a, b, g in zip(first[within].tolist(), second[within].tolist(), guard_of[within].tolist())
    ]


def _guarded_pair(a: int, b: int, guard: Guard) -> dict:
    """One guarded pair; for a guard that can say what each chunk says that the other
    does not (coverage), those words too."""
    pair: dict = {"a": a, "b": b, "guard": guard.name}
    unsaid_words = getattr(guard, "unsaid_words", None)
    if unsaid_words is not None:
        pair["unsaid"] = {"a": unsaid_words(b, a), "b": unsaid_words(a, b)}
    return pair


def _first_separating_guard(guards: Sequence[Guard], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(e,) index into `guards` of the first guard that separates each pair; -1: none."""
    guard_of = np.full(len(first), -1, dtype=np.int64)
    for g, guard in enumerate(guards):
        open_ = np.flatnonzero(guard_of < 0)
        if len(open_) == 0:
            break
        guard_of[open_[guard.separates(first[open_], second[open_])]] = g
    return guard_of


def pca_map(unit: np.ndarray) -> list[list[float]]:
    """(n, 2) layout of the rows: their projection on the top two principal axes,
    scaled together so the farthest coordinate is ±1, rounded to 4 decimals.

    Eigenvectors have no sign, and a repeated eigenvalue has no preferred axis,
    so each axis is fixed by the data: within its eigenspace (minus the axes
    already chosen there), it points at the first input that lies clearly off
    the centre. An axis without spread (n = 1 or 2, identical rows) gives 0.
    """
    coords = np.zeros((len(unit), 2))
    centred = unit.astype(np.float64)
    centred -= centred.mean(axis=0)
    axis = 0
    for projections in _eigenspaces(centred, 2):
        chosen: list[np.ndarray] = []  # directions taken inside this eigenspace
        while axis < 2 and len(chosen) < projections.shape[1]:
            residual = projections
            for direction in chosen:
                residual = residual - np.outer(residual @ direction, direction)
            norms = np.linalg.norm(residual, axis=1)
            if norms.max() == 0:
                break
            first = int(np.argmax(norms >= NOT_AT_CENTRE * norms.max()))
            direction = residual[first] / norms[first]
            chosen.append(direction)
            coords[:, axis] = projections @ direction
            axis += 1
    scale = np.abs(coords).max()
    if scale > 0:
        coords /= scale
    return (np.round(coords, MAP_DECIMALS) + 0.0).tolist()  # + 0.0: no -0.0


def _eigenspaces(centred: np.ndarray, k: int) -> list[np.ndarray]:
    """The eigenspaces of the rows' scatter with the largest eigenvalues (values
    within TIE of each other are one space), enough to hold `k` axes, largest
    first; each as the (n, g) projections of the rows on an orthonormal basis of
    it. Spaces without spread (eigenvalue below FLAT of the largest) are left out.

    Only the top eigenpairs are computed, of the smaller side's matrix: the
    (d, d) scatter or, for n < d, the (n, n) Gram matrix, whose eigenvectors
    scaled by sqrt(eigenvalue) are those projections.
    """
    n, d = centred.shape
    gram = n < d
    matrix = centred @ centred.T if gram else centred.T @ centred
    m = len(matrix)
    wanted = min(m, k + 1)
    while True:
        values, vectors = linalg.eigh(matrix, subset_by_index=[m - wanted, m - 1])
        values, vectors = values[::-1], vectors[:, ::-1]
        live = int(np.count_nonzero(values > FLAT * values[0])) if values[0] > 0 else 0
        ends = _run_ends(values[:live])
        if live < wanted or wanted == m:
            break  # every run of live values is whole
        if len(ends) > 1 and ends[-2] >= k:
            ends = ends[:-1]  # the last run may go on past the subset
            break
        wanted = min(m, 2 * wanted)
    spaces, start = [], 0
    for end in ends:
        if start >= k:
            break
        basis = vectors[:, start:end]
        spaces.append(basis * np.sqrt(values[start:end]) if gram else centred @ basis)
        start = end
    return spaces


def _run_ends(values: np.ndarray) -> list[int]:
    """End positions of the runs of (descending) values that tie within TIE of the largest."""
    return [
        i for i in range(1, len(values) + 1)
        if i == len(values) or values[i] < values[i - 1] - TIE * values[0]
    ]
