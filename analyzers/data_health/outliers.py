"""Outliers and underrepresented cases: samples far from the data the model knows, and sparse regions where it fails.

`find_outliers(points, *, errors, reference, method, k, contamination)` scores every row of `points` (a layer's
embeddings, or the flattened inputs) by how isolated it is; a higher score is more of an outlier:
- "knn" (the default): the mean Euclidean distance to the row's `k` nearest neighbours among the `reference` rows
  (all rows when none are given; a reference row is never its own neighbour). With the training split as the
  reference, a test row scores how far it lies from anything the model was trained on, so a test-only cluster (a
  new background) scores high even when it is dense in itself. The mean of k distances rather than the k-th alone
  (the "kth" and "mean" variants of kNN outlier detection, Ramaswamy et al. 2000 and Angiulli and Pizzuti 2002)
  is steadier at small k; k = 10 by default. The search is `duplicates.nearest_neighbours` (exact up to
  `exact_search_limit` rows, an HNSW graph above) without a reference, and scikit-learn's `NearestNeighbors`
  fitted on the reference rows with one.
- "isolation_forest": scikit-learn's `IsolationForest(random_state=seed)` fitted on the reference rows; the score
  is minus its `score_samples` (the forest's anomaly score s in (0, 1], higher more anomalous).

`flagged` marks the `contamination` share of rows with the highest scores (ceil(contamination * N), ties at the
threshold included), `threshold` the lowest flagged score. Contamination is a budget, not a test: the scores have
no calibrated null across embedding spaces, so the page shows the ranked list with the budget as a cut.

Regions (when `errors` are given): the rows are grouped by k-means (scikit-learn's `KMeans`, `n_init=3`,
`random_state=seed`) into `n_regions` (default round(sqrt(N / 10)), between 2 and 30) regions of the same space.
Each region gets its size, its density score (the median outlier score of its rows over the median score of the
reference rows, all rows without a reference: above 1 its typical row lies farther from its neighbours, or from
the reference, than a typical reference row lies from the others), its error rate, and a
one-sided Fisher exact test (`scipy.stats.fisher_exact`, alternative "greater") of its error rate against the
rows outside it, Holm-corrected over the regions (`shift.holm`). A region is `low_density_high_error` when its
density score is at least `LOW_DENSITY` (1.25: its typical row lies a quarter farther from its neighbours than a
typical reference row does; with m intrinsic dimensions the density there is about 1.25^m times lower, 2.4 times
at m = 4), its error rate is higher than the rest's and its adjusted p is below `alpha`: underrepresented cases
the model fails on, rather than a dense hard region (a slice) or a sparse easy one. The level was first 1.5 and
lowered after the drift sample: its near-white test images the model fails on (240 rows, 37% wrong against 7%
overall) form a region of density score 1.46 against the training split, and that is the case this check exists
to name; the synthetic test's planted sparse region scores far above either level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError, InvalidOption, whole_number

METHODS = ("knn", "isolation_forest")
LOW_DENSITY = 1.25  # a region's median score over the reference rows' median at or above which it is sparse
ALPHA = 0.05
REGION_COLUMNS = ("region", "rows", "size", "density_score", "errors", "error_rate", "overall_error_rate",
                  "p_value", "p_adjusted", "low_density_high_error")


@dataclass(frozen=True)
class Outliers:
    """Outlier scores and flags per row, and the regions (a DataFrame of REGION_COLUMNS, or None without errors)."""

    scores: np.ndarray  # (N,) float64, higher is more of an outlier
    flagged: np.ndarray  # (N,) bool, the `contamination` share with the highest scores
    threshold: float  # the lowest flagged score
    method: str
    k: int | None  # neighbours per row (knn), None for the forest
    contamination: float
    reference_rows: int  # rows the scores are measured against
    search: str  # "exact", "hnsw" or "isolation_forest"
    regions: object = None  # pandas DataFrame of REGION_COLUMNS, sorted by density score (sparsest first)
    ids: np.ndarray | None = None

    def top(self, count: int = 20) -> np.ndarray:
        """Rows of the `count` highest scores, highest first (ties by row)."""
        return np.lexsort((np.arange(len(self.scores)), -self.scores))[:count]

    def to_json(self) -> dict:
        """The summary (no per-row arrays, no regions): method, parameters, threshold and counts, and the top rows
        with their ids."""
        from .shift import json_value

        top = self.top()
        return {"method": self.method, "k": self.k, "contamination": self.contamination,
                "threshold": float(self.threshold), "n": int(len(self.scores)),
                "n_flagged": int(self.flagged.sum()), "reference_rows": int(self.reference_rows),
                "search": self.search, "low_density": LOW_DENSITY,
                "top": [{"row": int(r), "score": float(self.scores[r]),
                         **({"id": json_value(self.ids[r])} if self.ids is not None else {})} for r in top]}


def _points(points) -> np.ndarray:
    z = np.asarray(points)
    if z.dtype == object or not np.issubdtype(z.dtype, np.number):
        raise AnalyzerError("outliers need numeric points (embeddings or flattened inputs), not text: store an "
                            "embedding layer for text runs")
    z = z.reshape(len(z), -1).astype(np.float64, copy=False)
    if len(z) < 3:
        raise AnalyzerError(f"outliers need at least 3 rows, got {len(z)}")
    if not np.isfinite(z).all():
        raise AnalyzerError("the points hold NaN or infinite values: outlier distances are undefined; drop or "
                            "repair those rows first")
    return z


def _mask(value, n: int, name: str) -> np.ndarray | None:
    if value is None:
        return None
    mask = np.asarray(value)
    if mask.shape != (n,) or mask.dtype != bool:
        raise AnalyzerError(f"{name} must be a boolean array of one value per row ({n}), got {mask.dtype} of "
                            f"shape {mask.shape}")
    return mask


def _knn_scores(z: np.ndarray, reference: np.ndarray | None, k: int, seed: int, exact_search_limit: int,
                neighbours=None):
    """(mean distance to the k nearest reference rows, k used, search)."""
    from .duplicates import neighbours_of

    if reference is None:
        _, distances, search = neighbours_of(z, k, neighbours, seed=seed, exact_search_limit=exact_search_limit)
        return distances.mean(axis=1), distances.shape[1], search
    from sklearn.neighbors import NearestNeighbors

    ref_rows = np.flatnonzero(reference)
    want = min(k, len(ref_rows) - 1)
    if want < 1:
        raise AnalyzerError(f"the reference holds {len(ref_rows)} row(s): kNN outliers need at least 2")
    distances, rows = NearestNeighbors(n_neighbors=want + 1).fit(z[ref_rows]).kneighbors(z)
    # a reference row finds itself (distance 0, not always first when it has exact copies): drop it; every other
    # row drops its farthest of the want + 1
    own = ref_rows[rows] == np.arange(len(z))[:, None]
    own[~own.any(1), -1] = True
    distances = distances[~own].reshape(len(z), want)
    return distances.mean(axis=1), want, "exact"


def _regions(z, scores, errors, reference, n_regions, seed, alpha):
    import pandas as pd
    from scipy.stats import fisher_exact
    from sklearn.cluster import KMeans

    from .shift import _level, holm

    level = _level(alpha)
    n = len(z)
    count = n_regions or int(np.clip(round(np.sqrt(n / 10)), 2, 30))
    count = whole_number(count, "n_regions", 2)
    count = min(count, n)
    labels = KMeans(n_clusters=count, n_init=3, random_state=seed).fit_predict(z)
    # the typical reference row's score: how far a training sample lies from the other training samples
    median = float(np.median(scores if reference is None else scores[reference]))
    total_errors = int(errors.sum())
    rows = []
    for region in range(count):
        inside = labels == region
        size = int(inside.sum())
        if not size:
            continue
        wrong = int(errors[inside].sum())
        outside, outside_wrong = n - size, total_errors - wrong
        p = fisher_exact([[wrong, size - wrong], [outside_wrong, outside - outside_wrong]],
                         alternative="greater")[1] if outside else 1.0
        rows.append({"region": region, "rows": np.flatnonzero(inside), "size": size,
                     "density_score": float(np.median(scores[inside]) / median) if median > 0 else
                     (np.inf if np.median(scores[inside]) > 0 else 1.0),
                     "errors": wrong, "error_rate": wrong / size,
                     "overall_error_rate": total_errors / n, "p_value": float(p),
                     "rest_error_rate": outside_wrong / outside if outside else np.nan})
    table = pd.DataFrame(rows)
    table["p_adjusted"] = holm(table["p_value"])
    table["low_density_high_error"] = ((table["density_score"] >= LOW_DENSITY)
                                       & (table["error_rate"] > table["rest_error_rate"])
                                       & (table["p_adjusted"] < level))
    table = table.sort_values(["density_score", "region"], ascending=[False, True], ignore_index=True)
    return table[list(REGION_COLUMNS)]


def find_outliers(points, *, errors=None, reference=None, ids=None, method: str = "knn", k: int = 10,
                  contamination: float = 0.01, n_regions: int | None = None, seed: int = 0,
                  alpha: float = ALPHA, exact_search_limit: int = 20000, neighbours=None) -> Outliers:
    """Outlier scores of `points` (N rows, any trailing shape) and, given `errors` (N booleans, True where the
    model is wrong), the low-density regions where it fails; see the module's docstring. `reference` (N booleans)
    names the rows the scores are measured against, for example the training split. `neighbours`, a result of
    `duplicates.nearest_neighbours` for the same points with at least `k` neighbours, is reused by the kNN score
    without a reference instead of searching again."""
    if method not in METHODS:
        raise InvalidOption(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < float(contamination) < 0.5:
        raise InvalidOption(f"contamination must lie between 0 and 0.5 (a share of rows), got {contamination}")
    k = whole_number(k, "k", 1)
    z = _points(points)
    n = len(z)
    reference = _mask(reference, n, "reference")
    errors = _mask(errors, n, "errors")
    if ids is not None and len(ids) != n:
        raise AnalyzerError(f"ids has {len(ids)} values for {n} rows: give one id per row")
    if reference is not None and reference.all():
        reference = None
    ref_count = n if reference is None else int(reference.sum())
    if method == "knn":
        scores, used_k, search = _knn_scores(z, reference, k, seed, exact_search_limit, neighbours)
    else:
        from sklearn.ensemble import IsolationForest

        if ref_count < 2:
            raise AnalyzerError(f"the reference holds {ref_count} row(s): an isolation forest needs at least 2")
        forest = IsolationForest(random_state=seed).fit(z if reference is None else z[reference])
        scores, used_k, search = -forest.score_samples(z), None, "isolation_forest"
    scores = np.asarray(scores, dtype=np.float64)
    flagged_count = max(1, int(np.ceil(float(contamination) * n)))
    threshold = float(np.sort(scores)[::-1][flagged_count - 1])
    regions = None if errors is None else _regions(z, scores, errors, reference, n_regions, seed, alpha)
    return Outliers(scores=scores, flagged=scores >= threshold, threshold=threshold, method=method, k=used_k,
                    contamination=float(contamination), reference_rows=ref_count, search=search, regions=regions,
                    ids=None if ids is None else np.asarray(ids))
