"""Agglomerative clustering on cosine distance, cut at a threshold.

scipy's `linkage` + `fcluster(t, 'distance')` gives the same partition as the
naive loop "merge the closest pair of clusters while their linkage distance is
<= t" (average, single and complete linkage have no inversions), in O(n²)
instead of the Go service's O(n³).

No cluster at cut t spans two connected components of the graph "distance
<= t" (a linkage distance is never below the single-linkage one), so
`Clustering` finds candidate components from row tiles of fast float32
similarities, keeping only the edges, and runs the linkage inside each
component on canonical distances (`pipeline.distance`): memory is one tile
plus the largest component's matrix instead of n², and every decision is the
same on every machine.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

from .coverage import covering_split
from .distance import (
    MAX_DISTANCE,
    candidate_margin,
    candidate_pairs,
    distance_matrix,
    float32_cutoff,
    pair_distances,
)
from .offload import INLINE, Offload

if TYPE_CHECKING:
    from .coverage import Coverage
    from .guards import NumberGuard

TILE_BYTES = 128 << 20  # float32 similarities held per tile
TILE_MACS = 10**10  # multiply-adds per tile: ~0.1 s of GEMM on one core
SPLIT_MIN_N = 256  # from here a lone tile is split in two of equal work (two threads)
BATCH_ROWS = 1024  # small components share one distance matrix, up to this many rows
PRODUCT_MIN_ROWS = 32  # a component this big gets its own float64 product
_PENDING_EDGES = 1 << 22
# A component whose pairwise distances are all <= t is one cluster: average and complete
# linkage distances never exceed the largest pairwise one. The margin covers float64
# rounding in scipy's running averages (relative error ~1e-16 per merge).
CLIQUE_MARGIN = 1e-9


def cluster_labels(distances: np.ndarray, threshold: float, method: str = "average") -> np.ndarray:
    """(n,) int labels 0..k-1, numbered in the order of each cluster's first member.

    `distances`: (n, n) symmetric, zero diagonal. The linkage runs separately in
    each connected component of "distance <= threshold" (the same cut: see the
    module docstring), and not at all in a component whose pairs are all within
    t. This also makes exact ties come out the same whatever lies outside a
    component: scipy's nn-chain breaks ties along a chain that can wander
    through other components, so on the whole matrix equal distances could
    merge differently from the tiled path.
    """
    n = distances.shape[0]
    _, component = connected_components(
        sparse.csr_matrix(distances <= float32_cutoff(threshold)), directed=False
    )
    if method == "single":  # single-linkage clusters at t are exactly these components
        return first_member_order(component)
    labels = component.astype(np.int64)  # components of 1 or 2 members are one cluster
    next_id = n
    for index in _groups(component, min_size=3):
        sub = distances if len(index) == n else distances[np.ix_(index, index)]
        if sub.max() <= threshold * (1 - CLIQUE_MARGIN):
            continue  # every pair within t: every merge is too, so the component is one cluster
        condensed = squareform(sub, checks=False, force="tovector").astype(np.float64)
        cut = fcluster(linkage(condensed, method=method), t=threshold, criterion="distance")
        labels[index] = next_id + cut
        next_id += int(cut.max()) + 1
    return first_member_order(labels)


def first_member_order(labels: np.ndarray) -> np.ndarray:
    """Renumber arbitrary labels 0..k-1 by first appearance (deterministic cluster ids)."""
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    return rank[inverse.ravel()]


def members(labels: np.ndarray) -> list[np.ndarray]:
    """Input indices of each cluster, in cluster-id order, each ascending."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels))[:-1]
    return np.split(order, bounds)


class Clustering:
    """Exact clustering of n unit vectors as bounded steps a caller drives.

    `step(offload)` does one step (~0.1-0.3 s of work per thread) and returns
    the fraction done; once it returns 1.0, `labels` ((n,) int, as
    `cluster_labels` numbers them), `guarded_by` (pairs within t each guard
    separated), `guarded_pairs` (their sum) and `eligible` (which chunks may
    represent their cluster) are set. A step is up to `offload.width`
    independent pieces run at once (`offload.all`), then a short bookkeeping
    call. The labels are the reference's label for label (`distance_matrix`,
    the guards, `cluster_labels` on the whole matrix), whatever the width, the
    tile sizes or the BLAS kernel:

    * Tiles: one piece per row tile of the upper triangle of the float32
      `unit @ unit.T`, keeping the pairs that may be within t (`candidate_margin`
      covers the product's rounding) and that the number guard lets through; the
      bookkeeping unites them into candidate components (memory: one tile,
      <= 128 MB, per piece at once, plus the edges). Up to a few thousand rows
      this is two tiles of equal work, for two threads.
    * Sentences (with the coverage guard): one piece per embedding batch of the
      sentences of chunks in multi-member candidate components.
    * Batches: one piece per batch of components: the components' canonical
      distances (`pipeline.distance`), guards and `cluster_labels`, then, with the
      coverage guard, `covering_split`; small components share one matrix with
      the pairs across them set to 2. A candidate component may join a few true
      ones; `cluster_labels` separates them again from the canonical distances,
      so nothing depends on how the float32 products rounded. Memory is bounded
      by the largest component (~14 m² bytes for m members, mostly scipy's linkage).
    * threshold >= 2 without the coverage guard: every pair merges; no distances
      are needed. With it, every chunk is one candidate component.
    """

    def __init__(
        self,
        unit: np.ndarray,
        threshold: float,
        method: str = "average",
        guard: NumberGuard | None = None,
        coverage: Coverage | None = None,
        tile_bytes: int | None = None,
    ):
        n, dim = unit.shape
        self.unit, self.threshold, self.method = unit, threshold, method
        self.guard, self.coverage = guard, coverage
        self.labels: np.ndarray | None = None
        self.guarded_by = {g.name: 0 for g in (guard, coverage) if g is not None}
        self.eligible = np.ones(n, dtype=bool)
        self._cutoff = float32_cutoff(threshold)
        self._min_similarity = np.float32(1.0 - float(self._cutoff) - candidate_margin(unit))
        everything = threshold >= MAX_DISTANCE
        self._tiles = [] if everything else tile_rows(n, dim, TILE_BYTES if tile_bytes is None else tile_bytes)
        self._shares = (0.3, 0.6) if coverage is not None else (0.9, 0.0)  # tiles, sentences
        work = np.cumsum([(r1 - r0) * (n - r0) for r0, r1 in self._tiles], dtype=np.float64)
        self._tile_progress = self._shares[0] * work / (work[-1] if len(work) else 1.0)
        self._done_tiles = 0
        self._components = _Components(n)
        if everything and n > 1:
            self._components.add(np.zeros(n - 1, dtype=np.int64), np.arange(1, n))
        self._buffers: list[tuple[np.ndarray, np.ndarray]] = []  # per concurrent tile: similarities, mask
        self._sentence_batches: list[list[str]] | None = None  # planned once the tiles are done
        self._done_sentences = 0
        self._batches: list[list[np.ndarray]] = []  # planned once the tiles are done
        self._done_batches = 0
        self._raw = np.arange(n, dtype=np.int64)  # cluster ids; a batch gives its rows ids >= n
        self._next_id = n

    @property
    def guarded_pairs(self) -> int:
        return sum(self.guarded_by.values())

    def step(self, offload: Offload = INLINE) -> float:
        """Do the next step; return the fraction done (1.0: finished)."""
        results = offload.all(self._next_pieces(offload.width))
        return offload(self._absorb, results, offload.width)

    def _next_pieces(self, width: int) -> list[Callable[[], Any]]:
        """The next step's independent pieces of work: at most `width` of them."""
        if self.threshold >= MAX_DISTANCE and self.coverage is None:
            return [self._count_all_guarded]
        if self._done_tiles < len(self._tiles):
            tiles = self._tiles[self._done_tiles : self._done_tiles + width]
            while len(self._buffers) < len(tiles):  # reused: fresh ~100 MB arrays cost page faults
                size = max((b - a) * (len(self.unit) - a) for a, b in self._tiles)
                self._buffers.append((np.empty(size, dtype=np.float32), np.empty(size, dtype=bool)))
            return [partial(self._tile_edges, slot, r0, r1) for slot, (r0, r1) in enumerate(tiles)]
        if self._sentence_batches is None:
            return []  # the bookkeeping plans the batches
        if self._done_sentences < len(self._sentence_batches):
            batches = self._sentence_batches[self._done_sentences : self._done_sentences + width]
            return [partial(self.coverage.embed_batch, batch) for batch in batches]
        batches = self._batches[self._done_batches : self._done_batches + width]
        return [partial(self._batch_labels, groups) for groups in batches]

    def _absorb(self, results: list[Any], width: int) -> float:
        """Fold the pieces' results in, in order (so the outcome does not depend on width)."""
        if self.threshold >= MAX_DISTANCE and self.coverage is None:
            self.labels = np.zeros(len(self.unit), dtype=np.int64)
            if self.guard is not None:
                (self.guarded_by["numbers"],) = results[0]
            return 1.0
        if self._done_tiles < len(self._tiles):
            for first, second, guarded in results:
                self._components.add(first, second)
                if self.guard is not None:
                    self.guarded_by["numbers"] += guarded
            self._done_tiles += len(results)
            if self._done_tiles < len(self._tiles):
                return float(self._tile_progress[self._done_tiles - 1])
        elif self._sentence_batches is not None and self._done_sentences < len(self._sentence_batches):
            for computed in results:
                self.coverage.absorb(computed)
            self._done_sentences += len(results)
        elif self._sentence_batches is not None:
            for index, local, eligible, guarded in results:
                self._raw[index] = self._next_id + local
                self._next_id += int(local.max()) + 1
                self.eligible[index] = eligible
                for name, count in guarded.items():
                    self.guarded_by[name] += count
            self._done_batches += len(results)
        if self._sentence_batches is None:
            self._plan(width)
        return self._progress()

    def _progress(self) -> float:
        """The fraction done after the tiles; 1.0 (with the labels set) at the end."""
        tiles_share, sentences_share = self._shares
        if self._done_sentences < len(self._sentence_batches):
            return tiles_share + sentences_share * self._done_sentences / len(self._sentence_batches)
        if self._done_batches < len(self._batches):
            done = tiles_share + sentences_share
            return done + (1 - done) * self._done_batches / len(self._batches)
        self.labels = first_member_order(self._raw)
        return 1.0

    def _plan(self, width: int) -> None:
        """Once the candidate components are known: their batches and, with the coverage
        guard, the sentences of their members that the model must embed."""
        self._batches = self._plan_batches(width)
        chunks = [int(i) for groups in self._batches for group in groups for i in group]
        self._sentence_batches = self.coverage.plan(sorted(chunks)) if self.coverage is not None else []

    def _count_all_guarded(self) -> tuple[int]:
        return (self.guard.count_separated() if self.guard is not None else 0,)

    def _tile_edges(self, slot: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Similarities of rows r0..r1 with rows r0..n: the pairs i < j that may be within t
        and that the number guard lets through, and how many pairs within t it separated."""
        unit = self.unit
        first, second = candidate_pairs(unit, r0, r1, self._min_similarity, self._buffers[slot])
        guarded = 0
        if self.guard is not None and len(first):
            separated = self.guard.separates(first, second)
            within = pair_distances(unit, first[separated], second[separated]) <= self._cutoff
            guarded = int(np.count_nonzero(within))
            first, second = first[~separated], second[~separated]
        return first, second, guarded

    def _plan_batches(self, width: int) -> list[list[np.ndarray]]:
        """Components of 2+ members (each ascending), packed into batches of <= BATCH_ROWS rows;
        with two threads or more, a lone batch of several components is cut in two of about
        as many rows, so two threads share it (1,000 x 1,536 with a third near-copies: one batch of ~670 rows,
        ~7 ms on one thread)."""
        batches: list[list[np.ndarray]] = []
        rows = BATCH_ROWS
        for group in _groups(self._components.labels(), min_size=2):
            if rows + len(group) > BATCH_ROWS:
                batches.append([])
                rows = 0
            batches[-1].append(group)
            rows += len(group)
        if width > 1 and len(batches) == 1 and len(batches[0]) > 1:
            sizes = np.cumsum([len(group) for group in batches[0]])
            cut = min(max(1, int(np.searchsorted(sizes, sizes[-1] / 2))), len(sizes) - 1)
            batches = [batches[0][:cut], batches[0][cut:]]
        return batches

    def _batch_labels(self, groups: list[np.ndarray]):
        """Canonical distances, guards and linkage for a few components at once: their
        rows, local labels, which may represent their cluster, and the pairs within t
        each guard separated here (the number guard's were counted in the tiles)."""
        index, distances = component_distances(self.unit, groups)
        guarded = {}
        if self.guard is not None:
            counted = self.guard.apply(distances, self.threshold, index)
            guarded["numbers"] = counted if not self._tiles else 0
        covers = None
        if self.coverage is not None:
            covers = self._coverage_blocks(groups)
            apart = ~(covers | covers.T)
            guarded["coverage"] = int(np.count_nonzero(np.triu(apart & (distances <= self._cutoff))))
            distances[apart] = MAX_DISTANCE
        labels = cluster_labels(distances, self.threshold, self.method)
        eligible = np.ones(len(index), dtype=bool)
        if covers is not None:
            labels, eligible = _split_uncovered(labels, covers, self.coverage.sizes(index))
        return index, labels, eligible, guarded

    def _coverage_blocks(self, groups: list[np.ndarray]) -> np.ndarray:
        """(m, m) bool over the batch's rows: coverage within each group, False across."""
        size = sum(len(g) for g in groups)
        covers = np.zeros((size, size), dtype=bool)
        start = 0
        for group in groups:
            end = start + len(group)
            covers[start:end, start:end] = self.coverage.covers(group)
            start = end
        return covers


def _split_uncovered(labels: np.ndarray, covers: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split every cluster that no member covers (`covering_split`); local labels and
    which members may represent their cluster."""
    out = np.empty(len(labels), dtype=np.int64)
    eligible = np.ones(len(labels), dtype=bool)
    next_label = 0
    for group in members(labels):
        if len(group) == 1:
            out[group] = next_label
            next_label += 1
            continue
        parts, eligible[group] = covering_split(covers[np.ix_(group, group)], sizes[group])
        out[group] = next_label + parts
        next_label += int(parts.max()) + 1
    return out, eligible


def component_distances(unit: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `groups` (concatenated) and their canonical distance matrix, with the
    pairs across groups at 2. Big groups take one float64 product each; the small ones'
    pairs are computed together."""
    index = np.concatenate(groups)
    distances = np.full((len(index), len(index)), MAX_DISTANCE, dtype=np.float32)
    small_first, small_second = [], []
    start = 0
    for group in groups:
        end = start + len(group)
        if len(group) >= PRODUCT_MIN_ROWS:
            distances[start:end, start:end] = distance_matrix(unit[group])
        else:
            first, second = _upper_pairs(len(group))
            small_first.append(first + start)
            small_second.append(second + start)
        start = end
    if small_first:
        first, second = np.concatenate(small_first), np.concatenate(small_second)
        values = pair_distances(unit, index[first], index[second])
        distances[first, second] = values
        distances[second, first] = values
    np.fill_diagonal(distances, 0.0)
    return index, distances


@lru_cache(maxsize=None)
def _upper_pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m, 1)


def tile_rows(n: int, dim: int, tile_bytes: int = TILE_BYTES) -> list[tuple[int, int]]:
    """Row ranges (r0, r1): tile k is rows r0..r1 against columns r0..n (the upper
    triangle), with <= tile_bytes of float32 and <= TILE_MACS multiply-adds.
    At least 2 rows, so every tile is a GEMM (a 1-row product takes the gemv path);
    the last row alone has no pair above the diagonal. The last tile is square (rows
    r0..n against themselves), which numpy computes as a symmetric product (BLAS syrk:
    half the multiply-adds). A lone tile of SPLIT_MIN_N rows or more is cut in two of
    about equal work, so two threads share it: where cut·n == (n - cut)²/2 (the cut of
    two equal plain products left the first tile ~1.4x the second's time at
    1,000 x 1,536). An odd number of tiles, which left one thread idle for the last
    step, becomes one more, cut so that the tiles' work is about equal (10,000 x 384:
    two tiles, then one of less than a third of their time, became two steps of two)."""
    limit = max(1, min(tile_bytes // 4, TILE_MACS // dim))  # float32 entries per tile
    tiles = _cut_tiles(n, limit, float("inf"))
    if len(tiles) == 1 and n >= SPLIT_MIN_N:
        cut = round(n * (2 - 3**0.5))  # cut·n == (n - cut)²/2: equal work
        tiles = [(0, cut), (cut, n)]
    elif len(tiles) > 1 and len(tiles) % 2:
        tiles = _balanced_tiles(n, limit, len(tiles) + 1)
    return tiles


def _cut_tiles(n: int, limit: int, most: float) -> list[tuple[int, int]]:
    """Each tile as many rows as fit `limit` entries and `most` work (multiply-adds per
    dimension: rows x width, or width²/2 for the square last one), at least 2 rows."""
    tiles, r0 = [], 0
    while r0 < n - 1:
        width = n - r0
        if width * width <= limit and width * width / 2 <= most:
            tiles.append((r0, n))
            break
        rows = max(2, min(limit // width, most // width))
        tiles.append((r0, min(n, r0 + int(rows))))
        r0 = tiles[-1][1]
    return tiles


def _balanced_tiles(n: int, limit: int, count: int) -> list[tuple[int, int]]:
    """At most `count` tiles whose largest work is within 0.1 % of the least it can be (a
    bisection between an equal share of the triangle and the plain cut's largest tile)."""
    best = _cut_tiles(n, limit, float("inf"))
    low = n * n / 2 / count
    high = float(max((r1 - r0) * (n - r0) if r1 < n else (n - r0) ** 2 / 2 for r0, r1 in best))
    while high - low > high * 1e-3:
        middle = (low + high) / 2
        tiles = _cut_tiles(n, limit, middle)
        if len(tiles) <= count:
            best, high = tiles, middle
        else:
            low = middle
    return best


def _groups(component: np.ndarray, min_size: int):
    """Yield the members (ascending) of each component with at least min_size of them."""
    sizes = np.bincount(component)
    order = np.argsort(component, kind="stable")
    starts = np.cumsum(sizes) - sizes
    for c in np.flatnonzero(sizes >= min_size):
        yield order[starts[c] : starts[c] + sizes[c]]


class _Components:
    """Connected components of an n-node graph whose edges arrive in batches.

    Edges wait in a list and are folded into a component id per node when they
    pile up, so memory stays O(n + pending edges) however many edges arrive.
    """

    def __init__(self, n: int):
        self.n = n
        self.root = np.arange(n)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, first: np.ndarray, second: np.ndarray) -> None:
        if len(first):
            self.pending.append((first, second))
            self.count += len(first)
        if self.count > _PENDING_EDGES:
            self._fold()

    def labels(self) -> np.ndarray:
        """(n,) component id per node."""
        self._fold()
        return self.root

    def _fold(self) -> None:
        if not self.pending:
            return
        first = self.root[np.concatenate([p[0] for p in self.pending])]
        second = self.root[np.concatenate([p[1] for p in self.pending])]
        graph = sparse.csr_matrix((np.ones(len(first), dtype=bool), (first, second)), shape=(self.n, self.n))
        _, component = connected_components(graph, directed=False)
        self.root = component[self.root]
        self.pending, self.count = [], 0
