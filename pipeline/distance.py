"""Canonical cosine distances: one float32 value per pair, the same on every machine.

A float32 matrix product rounds each entry differently depending on the BLAS
kernel (AVX2, AVX-512, ...), the matrix shape and the thread count, so a pair
exactly at the threshold could merge on one machine and not on another. Every
clustering decision therefore uses the *canonical* distance of a pair:

    clip(1 - a·b, 0, 2) rounded to a multiple of GRID (2⁻²³), a·b the exact dot
    product of the float32 rows

(a zero row is at distance 2 from everything, and a row at 0 from itself).
Every multiple of GRID up to 2 is a float32, so the values are float32s, as
fine as float32 is near 1; a fixed grid (not float32's own, ever finer towards
0) keeps near-identical rows, the commonest pairs here, away from rounding
boundaries. The products of float32 numbers are exact in float64, so a
float64 product is within `_error_bound` of the exact value; where that
interval rounds to a single grid point, that is the answer, and the rare pair
whose interval straddles a boundary (about two in a million) is summed exactly
with `math.fsum`. Either way the value depends on the two rows alone.

Fast float32 products still find the *candidates* (pairs that may be within
the threshold): `candidate_margin` bounds their error, so no pair whose
canonical distance is within the threshold is missed.
"""

from __future__ import annotations

import math

import numpy as np

MAX_DISTANCE = 2.0
GRID = 2.0**-23  # canonical distances are multiples of this: float32s, 1.2e-7 apart
# float64 bytes of each side's rows per block in `pair_distances`: ~2 MB stays in cache
# for the few passes over it (blocks of 65,536 pairs ran 2.4-3.8x slower).
_PAIR_BLOCK_BYTES = 1 << 21


def distance_matrix(unit: np.ndarray) -> np.ndarray:
    """(n, n) float32 canonical distances between the rows of `unit` ((n, d) float32)."""
    distances = cross_distances(unit, unit)
    np.fill_diagonal(distances, 0.0)
    return distances


def cross_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, k) float32 canonical distances between the rows of `a` and those of `b`."""
    wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
    bound = _error_bound(wide_a, wide_b)
    distances = _canonical(1.0 - wide_a @ wide_b.T, bound, lambda i, j: _exact(wide_a[i], wide_b[j]))
    distances[~a.any(axis=1), :] = MAX_DISTANCE
    distances[:, ~b.any(axis=1)] = MAX_DISTANCE
    return distances


def pair_distances(unit: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(e,) float32 canonical distances of the pairs (first[k], second[k]) of rows of `unit`:
    bit for bit the entries `distance_matrix` gives them."""
    out = np.empty(len(first), dtype=np.float32)
    step = max(1, _PAIR_BLOCK_BYTES // (8 * unit.shape[1]))
    for start in range(0, len(first), step):
        rows_a, rows_b = first[start : start + step], second[start : start + step]
        a, b = unit[rows_a].astype(np.float64), unit[rows_b].astype(np.float64)
        dots = np.einsum("ij,ij->i", a, b)
        block = _canonical(1.0 - dots, _error_bound(a, b), lambda k: _exact(a[k], b[k]))
        block[~(a.any(axis=1) & b.any(axis=1))] = MAX_DISTANCE
        block[rows_a == rows_b] = 0.0
        out[start : start + step] = block
    return out


def float32_cutoff(threshold: float) -> np.float32:
    """The largest float32 c with c <= threshold: for a float32 distance d,
    `d <= c` is exactly fcluster's float64 test `d <= threshold`."""
    cutoff = np.float32(threshold)
    if float(cutoff) > threshold:
        cutoff = np.nextafter(cutoff, np.float32(-np.inf))
    return cutoff


def candidate_pairs(
    unit: np.ndarray,
    r0: int,
    r1: int,
    min_similarity: np.float32,
    buffers: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (i, j), r0 <= i < r1, i < j, whose float32 similarity is at least
    `min_similarity`: a row tile (rows r0..r1 against rows r0..n) of the upper triangle
    of `unit @ unit.T`. Zero rows pair with nothing. `buffers`: float32 and bool arrays of
    at least (r1 - r0)(n - r0) entries to reuse (fresh ~100 MB arrays cost page faults)."""
    width = len(unit) - r0
    entries = (r1 - r0) * width
    if buffers is None:
        buffers = (np.empty(entries, dtype=np.float32), np.empty(entries, dtype=bool))
    similarities, mask = (buffer[:entries] for buffer in buffers)
    np.matmul(unit[r0:r1], unit[r0:].T, out=similarities.reshape(r1 - r0, width))
    np.greater_equal(similarities, min_similarity, out=mask)
    rows, cols = np.divmod(np.flatnonzero(mask), width)  # (much faster than a 2-D np.nonzero)
    upper = cols > rows
    first, second = rows[upper] + r0, cols[upper] + r0
    if min_similarity <= 0:  # zero vectors are at distance 2 from everything
        nonzero = unit[first].any(axis=1) & unit[second].any(axis=1)
        first, second = first[nonzero], second[nonzero]
    return first, second


def candidate_margin(unit: np.ndarray) -> float:
    """How far a float32 product's `1 - a·b` may lie from the canonical distance.

    A float32 dot product of d terms errs by at most about d·2⁻²⁴·|a||b| (any
    summation order); doubled, plus the final roundings. |a|² is bounded from a
    float32 sum of squares (a fifth of the float64 one's time: this runs before
    the first tile).
    """
    return (unit.shape[1] + 8) * 2.0**-23 * max(1.0, _max_squared_norm_bound(unit))


def _max_squared_norm_bound(rows: np.ndarray) -> float:
    """An upper bound on the largest squared row norm: a float32 sum of d squares (in any
    order) is within γ = k/(1-k), k = (d+1)·2⁻²⁴, of the true sum, relative to it."""
    if rows.size == 0:
        return 0.0
    k = (rows.shape[1] + 1) * 2.0**-24
    return float(np.einsum("ij,ij->i", rows, rows).max()) / (1.0 - k / (1.0 - k))


def _canonical(approx: np.ndarray, bound: float, exact_at) -> np.ndarray:
    """float32 distances from float64 ones within `bound` of exact: where the interval
    rounds to one grid point, that one; elsewhere `exact_at(*index)`."""
    low = _on_grid(approx - bound)
    result = _on_grid(approx + bound)
    for index in zip(*np.nonzero(low != result)):
        result[index] = exact_at(*index)
    return result


def _on_grid(values: np.ndarray) -> np.ndarray:
    """Clipped to [0, 2] and rounded (half to even) to a multiple of GRID, as float32."""
    return (np.rint(np.clip(values, 0.0, MAX_DISTANCE) / GRID) * GRID).astype(np.float32)


def _exact(a: np.ndarray, b: np.ndarray) -> np.float32:
    """The canonical distance by exact summation: each float32·float32 product is exact
    in float64, and `fsum` rounds their exact sum once."""
    exact = math.fsum(np.concatenate(([1.0], -(a * b))))
    return _on_grid(np.float64(exact))[()]


def _error_bound(a: np.ndarray, b: np.ndarray) -> float:
    """Bound on |float64 (1 - a·b) - exact| over rows of a and b: d·2⁻⁵³·|a||b| for the
    sum in any order, doubled, plus the subtraction's rounding."""
    return (a.shape[1] + 4) * 2.0**-52 * max(1.0, _max_norm(a) * _max_norm(b))


def _max_norm(rows: np.ndarray) -> float:
    if rows.size == 0:
        return 0.0
    return float(np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64).max()))
