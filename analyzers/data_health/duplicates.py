"""Duplicates and leakage: rows that are copies of each other, copies across splits, and copies with other labels.

`find_duplicates(x, *, ids, split, labels, embeddings)` finds two kinds of match between rows:
- exact: the same content. Each row's bytes are hashed with SHA-256 (`row_hashes`), `HASH_BATCH` rows copied at a
  time; float rows are first canonicalised (-0.0 becomes 0.0, every NaN the same NaN), so equal values hash equal
  and a missing value matches a missing value. A DataFrame, or an object array (text), is hashed value by value
  from each value's type and repr. Rows with the same digest form a group; a group of g rows is reported as all
  its g(g - 1)/2 pairs while g <= `FULL_GROUP` (20), and beyond that as g - 1 pairs, each row with the group's
  first row (a thousand blank images are 999 rows, not half a million); `Duplicates.groups` counts the groups and
  `largest_group` tells their size.
- near: close in embedding space (`embeddings`, a layer's activations, or the flattened inputs when none are
  given; rows of text without embeddings get no near search). Each row's `k` nearest neighbours are searched,
  exactly (faiss's `IndexFlatL2`, Euclidean) up to `exact_search_limit` rows and approximately above (faiss's
  HNSW graph; see `nearest_neighbours`), and a pair is
  near when its distance is at most `near_threshold` and its rows are not already an exact pair. Each row pairs
  with at most its k nearest, so a cluster of more than k + 1 copies is reported through overlapping neighbour
  lists rather than as all its pairs.

The near threshold, when not given, is calibrated on the data (`calibrated_threshold`): a pair is near when it is
closer than the nearest neighbours of data without copies would be, read off the distribution of each row's
distance d to its nearest neighbour at a positive distance. Where the density around a row is about constant at the
scale of its nearest neighbour (points of a Poisson process, locally), P(d > r) = exp(-c r^m), m the data's
intrinsic dimension: d is Weibull, and log d a min-Gumbel, G((y - mu) / beta) with G(z) = 1 - exp(-e^z) and
beta = 1 / m. Its median and median absolute deviation fit mu and beta robustly (the median of G is ln ln 2, its
MAD 0.767 in units of beta: `GUMBEL_MEDIAN`, `GUMBEL_MAD`, scipy's `gumbel_l`), and the threshold is the fitted
quantile at 0.5 / n (n rows with a positive distance): without copies, fewer than half a row is expected below it,
whatever the number of rows (Chauvenet's criterion on the fitted distribution). The left tail of a min-Gumbel is
exponential in log d, heavier than a normal's: a normal fitted the same way (median - z 1.4826 MAD of log d, z with
n Phi(-z) = 1/2) flagged natural pairs of 2000 Gaussian rows in 32 dimensions in 4 of 6 draws (1 to 4 pairs), and
a fixed 3 robust standard deviations flagged 2 or 3 pairs in 8, 32 and 128 dimensions; the min-Gumbel rule flagged
none in 12 draws (4 seeds x 8, 32, 128 dimensions), nor on scikit-learn's 1797 digits or 569 breast-cancer rows.
In 32 dimensions the threshold is 0.51 of the median nearest-neighbour distance (0.17 in 8, 0.76 in 128): a copy
with noise of 0.3 standard deviations per value is found (all 50 planted), one with 0.5 is not (6 of 50), being
about as far as a natural neighbour. The rule is scale-free (multiplying the embeddings multiplies the threshold);
the median and MAD are not moved by the near copies themselves as long as fewer than half the rows have one. Two
limits: when more do (a dataset of augmented copies), the typical nearest neighbour is a copy; and regions of
very different density (a mixture of two Gaussians 5 times apart in scale, in 16 dimensions) widen the MAD so much
that the threshold falls far below either region's neighbours (0.0016 against medians of 2.9 and 14.6). Give
`near_threshold` then.
Measured (tests/test_data_health_duplicates.py): 2000 Gaussian rows in 32 dimensions plus 120 copies of distinct
rows, 60 exact and 60 near (noise of 0.1 standard deviations per value: distances 0.38 to 0.75, the threshold 2.42,
the median nearest neighbour 5.0), 40 of them in another split and 20 with another label: exact pairs recall 1.0 and
precision 1.0, near pairs recall 1.0 and precision 1.0, all 40 leaks and 20 conflicting labels found and nothing
else; NN-descent (`exact_search_limit=100`) gives the same table (its threshold 2.48: a few rows' nearest
neighbours are missed, so their distances are larger) in 30 s, most of it numba compiling. On the tabular sample's
569 breast-cancer rows (train and test, 30 raw features) it finds no pair; the threshold there is 0.38 against a
median nearest neighbour of 15.9 (and a 1st percentile of 5.0): test rows planted into train scaled by 1.0001
(distances 0.07 to 0.19) are found as leaks, all 5, and scaled by 1.001 (0.67 to 1.9) they are not.

Every pair is reported once per kind that applies (`PAIR_COLUMNS`, one row per pair and kind), so a table filtered
on one kind holds every pair of that kind:
- `exact` or `near`: how the rows match (`match`, also on the rows below);
- `leak`: the two rows lie in different splits (`split` given);
- `conflicting-label`: their labels differ (`labels` given; compared by value, a row of a multi-label array as a
  whole; two missing float labels are equal).
An exact copy of a test row in train with another label is three rows: exact, leak and conflicting-label, each with
match "exact" and distance 0. `distance` is the embedding distance of a near pair and 0 for an exact one. Rows are
sorted by kind (in `KINDS` order), distance and rows; `id_a` is the pair's earlier row. `Duplicates.counts` holds
the pairs of each kind, `rows` the distinct rows in them, and `leaking_rows` per split the rows with a copy in
another split.

Bad input (no rows, ids/split/labels of the wrong length, repeated ids, NaN or infinite embeddings) raises a one-line
`AnalyzerError` that names the fix; bad options raise `InvalidOption` before any computation.
"""
from __future__ import annotations

import contextlib
import concurrent.futures
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import AnalyzerError, InvalidOption, whole_number
from .shift import json_value

KINDS = ("exact", "near", "leak", "conflicting-label")
MATCHES = ("exact", "near")
PAIR_COLUMNS = ("id_a", "id_b", "kind", "match", "distance", "row_a", "row_b", "split_a", "split_b", "label_a",
                "label_b")
HASH_BATCH = 1024  # rows copied and canonicalised at a time for hashing
FULL_GROUP = 20  # an exact group up to this size is reported as all its pairs, a larger one as a star
# The calibrated threshold (module docstring): log nearest-neighbour distances as a min-Gumbel (scipy's gumbel_l),
# whose median is ln(ln 2) and whose median absolute deviation from it is GUMBEL_MAD (in units of its scale)
GUMBEL_MEDIAN = -0.36651292058166435  # ln(ln 2)
GUMBEL_MAD = 0.7670492513257083  # G(m + a) - G(m - a) = 1/2, G(z) = 1 - exp(-e^z), m = GUMBEL_MEDIAN
EXPECTED_FALSE_ROWS = 0.5  # the threshold is the quantile below which this many rows are expected without copies
# faiss's HNSW graph: links per node, candidates kept while building, and the least kept while searching. At 16 /
# 40 / 32 the 10 nearest of the shapes sample's 100k embeddings came back with recall 0.998 in 2.0 s on two cores
# (32 / 80 / 64: 0.9999 in 4.1 s). pynndescent, used before, compiled numba code for 20-80 s in every process.
HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = 16, 40, 32
DISTANCE_BATCH = 1024  # rows whose neighbour distances are recomputed in float64 at a time


# -------------------------------------------------------------------------------------------------------- hashing

def _object_row_digest(row) -> bytes:
    digest = hashlib.sha256()
    for value in np.asarray(row, dtype=object).ravel():
        if isinstance(value, float) and math.isnan(value):
            value = math.nan  # every NaN the same
        elif isinstance(value, float) and value == 0:
            value = 0.0
        digest.update(f"{type(value).__name__}:{value!r}\x1f".encode("utf-8", "surrogatepass"))
    return digest.digest()


def row_hashes(x, *, batch_size: int = HASH_BATCH) -> list:
    """SHA-256 digests (32 bytes each) of every row of `x` (an array (N, ...), a DataFrame, or a 1-D object array of
    texts), canonicalised as the module's docstring says, `batch_size` rows at a time."""
    batch_size = whole_number(batch_size, "batch_size", 1)
    if hasattr(x, "to_numpy") and hasattr(x, "columns"):  # a DataFrame: values with their types
        x = x.to_numpy(dtype=object)
    array = np.asarray(x)
    if array.ndim == 0:
        raise AnalyzerError("x must hold one row per sample, got a single value: pass an array (rows, ...)")
    if array.dtype.kind == "O":
        return [_object_row_digest(row) for row in array]
    if array.dtype.kind not in "biufcUSV":
        raise AnalyzerError(f"rows of dtype {array.dtype} cannot be hashed: pass numbers, text or a DataFrame")
    digests = []
    row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    # hashlib releases the GIL on a buffer of more than 2047 bytes: rows that long are hashed on two threads, half
    # a batch each (100k images of 12 KB: 0.82 s -> 0.42 s), each row read in place (no copy of its bytes)
    pool = concurrent.futures.ThreadPoolExecutor(2) if row_bytes > 2047 and len(array) > 1 else None
    try:
        for start in range(0, len(array), batch_size):
            batch = np.ascontiguousarray(array[start:start + batch_size])
            if batch.dtype.kind in "fc":
                batch = batch + batch.dtype.type(0)  # -0.0 + 0.0 = 0.0 (a copy, so x is untouched)
                batch[np.isnan(batch)] = np.nan
            if pool is None:
                digests.extend(_digests(batch))
            else:
                half = (len(batch) + 1) // 2
                for part in pool.map(_digests, (batch[:half], batch[half:])):
                    digests.extend(part)
    finally:
        if pool is not None:
            pool.shutdown()
    return digests


def _digests(rows: np.ndarray) -> list:
    """The SHA-256 digest of each row's bytes (a C-contiguous array's rows, hashed in place: the bytes of
    `row.tobytes()`, which a 1-D array's rows, scalars, are hashed as)."""
    if not len(rows) or rows.ndim == 1 or rows[0].nbytes == 0:
        return [hashlib.sha256(row.tobytes()).digest() for row in rows]
    return [hashlib.sha256(row).digest() for row in rows]


# ------------------------------------------------------------------------------------------------------ neighbours

def nearest_neighbours(points: np.ndarray, k: int, *, seed: int = 0, exact_search_limit: int = 20000):
    """(rows (N, k') int64, distances (N, k') float64, search): each row's k' = min(k, N - 1) nearest other rows,
    nearest first, by exact search up to `exact_search_limit` rows ("exact", faiss's `IndexFlatL2`) and a graph
    search above ("hnsw", faiss's `IndexHNSWFlat`, `HNSW_LINKS` links per node, `HNSW_BUILD` candidates while
    building and at least `HNSW_SEARCH` while searching: recall 0.998 of the 10 nearest on the shapes sample's 100k
    embeddings, 2 s on two cores). The distances are recomputed in float64 from the points (faiss's float32
    squared distances lose the smallest ones). faiss runs on torch's thread count, so a run sharing the cores
    keeps to its share. `seed` is kept for callers; neither search draws at random (HNSW's levels come from
    faiss's fixed seed, and its graph is the same on every call with the same threads)."""
    import faiss

    n = len(points)
    want = min(k, n - 1)
    flat = np.asarray(points).reshape(n, -1)
    data = np.ascontiguousarray(flat, dtype=np.float32)
    if n <= exact_search_limit:
        search = "exact"
        index = faiss.IndexFlatL2(data.shape[1])
        with _faiss_threads():
            index.add(data)
            _, rows = index.search(data, want + 1)
    else:
        search = "hnsw"
        rows = _hnsw_rows(data, want)
    found = rows >= 0
    partner = np.where(found, rows, 0)
    distances = np.empty(rows.shape)
    for start in range(0, n, DISTANCE_BATCH):  # exact float64 distances of the pairs found, a batch at a time
        stop = start + DISTANCE_BATCH
        block = np.asarray(flat[start:stop], dtype=np.float64)[:, None, :]
        others = np.asarray(flat[partner[start:stop]], dtype=np.float64)
        distances[start:stop] = np.sqrt(((others - block) ** 2).sum(-1))
    distances[~found] = np.inf
    rows = np.asarray(rows, dtype=np.int64)
    # drop each row itself (not always first: exact copies tie with it at distance 0), else its farthest neighbour
    own = rows == np.arange(n)[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    rows = rows[keep].reshape(n, want)
    distances = distances[keep].reshape(n, want)
    order = np.argsort(distances, axis=1, kind="stable")
    rows, distances = np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1)
    missing = rows < 0
    distances[missing] = np.inf
    return rows, np.maximum(distances, 0.0), search


def _hnsw_rows(data: np.ndarray, want: int) -> np.ndarray:
    """(N, want + 1) rows nearest each row by faiss's HNSW graph, the row itself among them where found, -1 where
    too few were found. The graph holds each distinct point once: HNSW loses most neighbours of the other points
    when many rows are identical (500 zero rows among 1,500 Gaussian ones in 16 dimensions: 6% of the true 5
    nearest of the Gaussian rows found). Copies of a row come first among its neighbours (distance 0), then the
    rows of the nearest distinct points, each point's copies in row order."""
    import faiss

    n = len(data)
    distinct, first, group, counts = np.unique(data, axis=0, return_index=True, return_inverse=True,
                                               return_counts=True)
    group = group.reshape(-1)
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_LINKS)
    index.hnsw.efConstruction = HNSW_BUILD
    index.hnsw.efSearch = max(HNSW_SEARCH, 2 * (want + 1))
    searched = min(want + 1, len(distinct))
    with _faiss_threads():
        index.add(np.ascontiguousarray(distinct))
        _, near = index.search(np.ascontiguousarray(distinct), searched)  # distinct points, -1 where not found
    representative = np.append(first, -1)  # a group's first row; -1 stays -1
    if len(distinct) == n:
        rows = representative[near[group]]
        return np.pad(rows, ((0, 0), (0, want + 1 - rows.shape[1])), constant_values=-1)
    rows = np.full((n, want + 1), -1, dtype=np.int64)
    simple = counts[group] == 1
    found = near[group]
    simple &= (np.where(found >= 0, counts[np.maximum(found, 0)], 1) == 1).all(1)
    rows[simple, :searched] = representative[found[simple]]
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(counts)[:-1])  # each group's rows, in order
    for row in np.flatnonzero(~simple):  # rows with copies, or near points with copies: their rows in turn
        listed = [row] + [r for r in members[group[row]] if r != row]
        for point in found[row]:
            if len(listed) > want or point < 0:
                break
            if point != group[row]:
                listed.extend(members[point][:want + 1 - len(listed)].tolist())
        rows[row, :min(len(listed), want + 1)] = listed[:want + 1]
    return rows


def neighbours_of(points, k: int, neighbours=None, **search) -> tuple:
    """`nearest_neighbours(points, k, **search)`, or the first k columns of `neighbours`, a result of it for the
    same points with at least k columns (checked: a table of another size is refused)."""
    if neighbours is None:
        return nearest_neighbours(points, k, **search)
    rows, distances, how = neighbours
    want = min(k, len(points) - 1)
    if rows.shape[0] != len(points) or rows.shape[1] < want or distances.shape != rows.shape:
        raise AnalyzerError(f"neighbours of shape {rows.shape} do not fit {len(points)} points and k={k}: pass "
                            f"nearest_neighbours of the same points with at least k neighbours, or None")
    return rows[:, :want], distances[:, :want], how


@contextlib.contextmanager
def _faiss_threads():
    """faiss (OpenMP) on torch's thread count for the duration, then back to what it had."""
    import faiss
    import torch

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def calibrated_threshold(distances) -> float:
    """The near threshold of the module's docstring from the neighbour distances (N, k) of `nearest_neighbours`:
    with d each row's smallest positive finite distance (n rows have one), log d fitted as a min-Gumbel by its
    median and MAD (beta = MAD / GUMBEL_MAD, mu = median - beta * GUMBEL_MEDIAN) and the threshold its quantile at
    0.5 / n: exp(mu + beta * ln(-ln(1 - 0.5 / n))). 0 when no row has a positive distance (every neighbour is an
    identical embedding)."""
    distances = np.asarray(distances, dtype=np.float64)
    positive = np.where((distances > 0) & np.isfinite(distances), distances, np.inf).min(axis=1)
    positive = positive[np.isfinite(positive)]
    if len(positive) == 0:
        return 0.0
    logs = np.log(positive)
    median = np.median(logs)
    beta = np.median(np.abs(logs - median)) / GUMBEL_MAD
    mu = median - beta * GUMBEL_MEDIAN
    return float(np.exp(mu + beta * np.log(-np.log1p(-EXPECTED_FALSE_ROWS / len(logs)))))


# --------------------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Duplicates:
    """Duplicate, near-duplicate, leaking and conflicting pairs; see the module's docstring."""

    pairs: object  # DataFrame, PAIR_COLUMNS: one row per pair and kind
    counts: dict  # kind -> pairs of that kind
    rows: dict  # kind -> distinct rows in pairs of that kind
    leaking_rows: dict  # split -> rows of that split with a copy in another split
    groups: int  # groups of exact copies (2 rows or more)
    largest_group: int  # rows in the largest group (0 without exact copies)
    near_threshold: float | None  # distance at or below which a pair is near; None without a near search
    threshold_source: str  # "given", "calibrated" or "none"
    search: str  # "exact", "hnsw" or "none"
    n: int  # rows searched
    k: int
    seed: int
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in PAIR_COLUMNS if c not in getattr(self.pairs, "columns", ())]
        if missing or set(self.counts) != set(KINDS) or set(self.rows) != set(KINDS):
            raise AnalyzerError("the duplicates came back malformed (a table without its columns, or counts without "
                                "every kind): run the search again")

    def table(self):
        """The pairs: PAIR_COLUMNS, one row per pair and kind (a copy)."""
        return self.pairs.copy()

    def of_kind(self, kind: str):
        if kind not in KINDS:
            raise InvalidOption(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return self.pairs[self.pairs["kind"] == kind].reset_index(drop=True)

    def to_json(self) -> dict:
        """The summary and every pair, plain JSON values."""
        pairs = [{c: json_value(v) for c, v in zip(PAIR_COLUMNS, row)}
                 for row in self.pairs[list(PAIR_COLUMNS)].itertuples(index=False, name=None)]
        return {"counts": {k: int(v) for k, v in self.counts.items()},
                "rows": {k: int(v) for k, v in self.rows.items()},
                "leaking_rows": {str(k): int(v) for k, v in self.leaking_rows.items()},
                "groups": int(self.groups), "largest_group": int(self.largest_group),
                "near_threshold": json_value(self.near_threshold), "threshold_source": self.threshold_source,
                "search": self.search, "n": int(self.n), "k": int(self.k), "seed": int(self.seed), "pairs": pairs}


# ------------------------------------------------------------------------------------------------------ the search

def _per_row(value, n: int, name: str, fix: str):
    if value is None:
        return None
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    array = np.asarray(value)
    if array.ndim == 0 or len(array) != n:
        raise AnalyzerError(f"{name} must have one entry per row ({n}), got {array.shape}: {fix}")
    return array


def _differ(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair: do the rows' values differ (a multi-label row as a whole; two NaNs do not differ)."""
    va, vb = values[a], values[b]
    if values.dtype.kind in "fc":
        unequal = (va != vb) & ~(np.isnan(va) & np.isnan(vb))
    elif values.dtype.kind == "O":
        unequal = np.array([not (x == y or (x != x and y != y)) if np.ndim(x) == 0 else
                            not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(va, vb)], dtype=bool)
        return unequal.reshape(len(a))
    else:
        unequal = va != vb
    return unequal.reshape(len(a), -1).any(axis=1) if unequal.ndim > 1 else unequal


def _embedding_points(x, embeddings, n: int):
    if embeddings is None:
        if hasattr(x, "columns"):
            try:
                x = x.to_numpy(dtype=np.float64)
            except (TypeError, ValueError):
                return None  # a table with text: exact matches only
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            return None
        points = array.reshape(n, -1)
        name, fix = "the inputs", "pass embeddings, or drop those rows"
    else:
        if hasattr(embeddings, "to_numpy"):
            embeddings = embeddings.to_numpy()
        try:
            points = np.asarray(embeddings, dtype=np.float64)
        except (TypeError, ValueError):
            raise AnalyzerError("embeddings must be a numeric array with one row per sample") from None
        if points.ndim < 1 or len(points) != n:
            raise AnalyzerError(f"embeddings must have one row per sample ({n}), got shape {points.shape}: pass the "
                                f"activations of the same rows")
        points = points.reshape(n, -1)
        name, fix = "embeddings", "drop those rows (or fix the layer)"
    if points.shape[1] == 0:
        return None
    if not np.isfinite(points).all():
        raise AnalyzerError(f"{name} hold NaN or infinite values: {fix} before searching for near duplicates")
    return np.ascontiguousarray(points, dtype=np.float32)


def find_duplicates(x, *, ids=None, split=None, labels=None, embeddings=None, near_threshold=None, k: int = 5,
                    seed: int = 0, exact_search_limit: int = 20000, neighbours=None) -> Duplicates:
    """Exact and near duplicate pairs of the rows of `x`, and which of them leak across `split` or carry
    conflicting `labels`; see the module's docstring for every choice. `neighbours` is what `nearest_neighbours`
    returned for the same points (`embeddings`, else the flattened `x`) with at least `k` neighbours, reused rather
    than searched again (the data-health stage searches once for this and the outliers)."""
    k = whole_number(k, "k", 1)
    seed = whole_number(seed, "seed", 0)
    exact_search_limit = whole_number(exact_search_limit, "exact_search_limit", 0)
    if near_threshold is not None:
        if isinstance(near_threshold, (bool, np.bool_)) or not isinstance(
                near_threshold, (int, float, np.integer, np.floating)) or not 0 <= float(near_threshold) < math.inf:
            raise InvalidOption(f"near_threshold must be a distance of at least 0 (or None to calibrate it), got "
                                f"{near_threshold!r}")
        near_threshold = float(near_threshold)
    n = len(x) if hasattr(x, "__len__") else 0
    if n == 0:
        raise AnalyzerError("no rows to search for duplicates: pass at least one row")
    ids = _per_row(ids, n, "ids", "pass one id per row")
    if ids is None:
        ids = np.arange(n)
    elif len(np.unique(ids.astype(str) if ids.dtype.kind == "O" else ids)) != n:
        raise AnalyzerError("ids repeat: give every row its own id so that a pair names two rows")
    split = _per_row(split, n, "split", "pass each row's split name")
    labels = _per_row(labels, n, "labels", "pass one label per row")

    digests = row_hashes(x)
    groups = {}
    for row, digest in enumerate(digests):
        groups.setdefault(digest, []).append(row)
    pair_a, pair_b = [], []
    sizes = [len(rows) for rows in groups.values() if len(rows) > 1]
    for rows in groups.values():
        if len(rows) < 2:
            continue
        if len(rows) <= FULL_GROUP:
            for i, first in enumerate(rows):
                pair_a.extend([first] * (len(rows) - i - 1))
                pair_b.extend(rows[i + 1:])
        else:
            pair_a.extend([rows[0]] * (len(rows) - 1))
            pair_b.extend(rows[1:])
    exact_a, exact_b = np.asarray(pair_a, dtype=np.int64), np.asarray(pair_b, dtype=np.int64)

    points = _embedding_points(x, embeddings, n) if n > 1 else None
    search, source = "none", "none"
    near_a = near_b = np.zeros(0, dtype=np.int64)
    near_d = np.zeros(0)
    if points is not None:
        rows, distances, search = neighbours_of(points, k, neighbours, seed=seed,
                                                exact_search_limit=exact_search_limit)
        if near_threshold is None:
            near_threshold, source = calibrated_threshold(distances), "calibrated"
        else:
            source = "given"
        i, j = np.nonzero(distances <= near_threshold)
        a, b = np.minimum(i, rows[i, j]), np.maximum(i, rows[i, j])
        d = distances[i, j]
        same = np.fromiter((digests[p] == digests[q] for p, q in zip(a, b)), dtype=bool, count=len(a))
        a, b, d = a[~same], b[~same], d[~same]
        if len(a):  # one entry per pair, at its smallest distance (the two directions agree but for rounding)
            order = np.lexsort((d, b, a))
            a, b, d = a[order], b[order], d[order]
            first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
            near_a, near_b, near_d = a[first], b[first], d[first]
    else:
        near_threshold = None

    row_a = np.concatenate([exact_a, near_a])
    row_b = np.concatenate([exact_b, near_b])
    match = np.array(["exact"] * len(exact_a) + ["near"] * len(near_a), dtype=object)
    distance = np.concatenate([np.zeros(len(exact_a)), near_d])
    kinds = [(match == "exact", "exact"), (match == "near", "near")]
    if split is not None:
        kinds.append((_differ(split, row_a, row_b), "leak"))
    if labels is not None:
        kinds.append((_differ(labels, row_a, row_b), "conflicting-label"))

    import pandas as pd

    parts = []
    for mask, kind in kinds:
        pa, pb = row_a[mask], row_b[mask]
        parts.append(pd.DataFrame({
            "id_a": ids[pa], "id_b": ids[pb], "kind": kind, "match": match[mask], "distance": distance[mask],
            "row_a": pa, "row_b": pb,
            "split_a": split[pa] if split is not None else None, "split_b": split[pb] if split is not None else None,
            "label_a": list(labels[pa]) if labels is not None else None,
            "label_b": list(labels[pb]) if labels is not None else None,
        }, columns=list(PAIR_COLUMNS)))
    filled = [p for p in parts if len(p)]  # an empty part would turn integer labels into floats
    table = pd.concat(filled, ignore_index=True) if filled else parts[0]
    table["_kind"] = [KINDS.index(kind) for kind in table["kind"]]
    table = table.sort_values(["_kind", "distance", "row_a", "row_b"], kind="stable").drop(columns="_kind")
    table = table.reset_index(drop=True)
    for column in ("row_a", "row_b"):
        table[column] = table[column].astype(np.int64)
    table["distance"] = table["distance"].astype(np.float64)

    counts, involved = {}, {}
    for kind in KINDS:
        chosen = table[table["kind"] == kind]
        counts[kind] = int(len(chosen))
        involved[kind] = int(len(np.union1d(chosen["row_a"].to_numpy(), chosen["row_b"].to_numpy())))
    leaking = {}
    if split is not None:
        chosen = table[table["kind"] == "leak"]
        leaked = np.union1d(chosen["row_a"].to_numpy(), chosen["row_b"].to_numpy()).astype(np.int64)
        names, per_split = np.unique(split[leaked].astype(str), return_counts=True) if len(leaked) else ([], [])
        leaking = {str(s): int(c) for s, c in zip(names, per_split)}
    return Duplicates(pairs=table, counts=counts, rows=involved, leaking_rows=leaking, groups=len(sizes),
                      largest_group=max(sizes, default=0), near_threshold=near_threshold, threshold_source=source,
                      search=search, n=n, k=k, seed=seed,
                      options={"exact_search_limit": exact_search_limit, "full_group": FULL_GROUP,
                               "expected_false_rows": EXPECTED_FALSE_ROWS})
