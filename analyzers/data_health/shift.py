"""Shift between two splits: which features moved, and whether a model's embeddings tell the splits apart.

`feature_shift(a, b)` tests every feature of two samples (train against test, a run's data against last month's):
- numeric features: the two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`, two-sided, scipy's default
  exact/asymptotic choice); its statistic D, the largest gap between the two empirical CDFs (0 to 1), is the effect
  size, and the difference of means in pooled-standard-deviation units (Cohen's d, (mean_b - mean_a) / s_pooled,
  s_pooled^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)) says which way the feature moved: D alone
  does not. Two constant sides with different values have d = +-inf (None in JSON);
- categorical features: Pearson's chi-square test of the 2 x C table of value counts (`scipy.stats.chi2_contingency`
  with `correction=False`: no Yates continuity correction, so a two-valued feature is tested like any other and the
  statistic is the one Cramér's V is defined on); the effect size is Cramér's V = sqrt(chi2 / (n (min(2, C) - 1))),
  0 to 1. A feature with one value over both sides has chi2 = 0, p = 1, V = 0.
  A DataFrame's object, category, string and bool columns are categorical, and so are all the columns of an object,
  string or bool array; `categorical` (names or indices) adds more (integer codes, say).

With F features there are F tests, so the p-values are corrected for multiple testing with Holm's step-down method
(`holm`): the i-th smallest of m p-values is multiplied by m - i + 1, the running maximum is taken so the order is
kept, and the result is capped at 1. Holm controls the family-wise error rate (the chance of calling any unshifted
feature shifted) under any dependence between the tests, which matters here: features are correlated, and
Benjamini-Hochberg (`scipy.stats.false_discovery_control`) controls the false discovery rate only under positive
dependence (or at a log-factor cost in its Benjamini-Yekutieli form). A feature reported as shifted is then a claim
about that feature, not a share of discoveries. statsmodels (which has Holm) is not installed; the few lines here are
checked against a hand computation in the tests. `shifted` is `p_adjusted < alpha` (0.05).

`embedding_shift(a, b)` asks whether two sets of embeddings (a layer's activations over two splits) come from one
distribution, two ways:
- a domain classifier: logistic regression (scikit-learn, L2, C = 1, balanced class weights) on the embeddings
  standardised inside each training fold (a `StandardScaler` in the pipeline, so no fold sees the statistics of the
  rows it scores), trained to tell side b from side a; `folds`-fold stratified cross-validation (shuffled with
  `seed`) gives every row an out-of-fold probability of being from b, and their ROC AUC is `domain_auc`: 0.5 the
  splits cannot be told apart linearly, 1.0 they are separate. The rows of each side the classifier separates best
  (the highest out-of-fold probability of their own side, `top_k` of each) show what the shift is made of. A mean
  shift of delta standard deviations along one direction has a Bayes-optimal AUC of Phi(delta / sqrt(2)) (0.86 at
  1.5, 0.92 at 2): an AUC near that is the most any classifier can reach.
- the maximum mean discrepancy (Gretton et al., 2012, "A Kernel Two-Sample Test"): the unbiased estimate MMD^2_u
  with the RBF kernel k(x, y) = exp(-|x - y|^2 / (2 sigma^2)) on the raw embeddings (their own geometry), sigma by
  the median heuristic: the median of the pairwise Euclidean distances of the pooled rows (over a seeded subsample
  of at most `MEDIAN_SAMPLE` = 1000 of them: half a million distances; the positive distances' median if more than
  half are 0). Its p-value is a permutation test: `permutations` random relabellings of the pooled rows (seeded),
  p = (1 + #{permuted MMD^2_u >= observed}) / (1 + permutations), never 0 (Phipson and Smyth, 2010); 0 permutations
  skip it (p is NaN). All the permuted statistics come from one pass over the kernel matrix: with u the indicator of
  side a, MMD^2_u needs only u'Ku and u'K1, and the kernel is computed `batch_size` rows at a time and multiplied
  by the (n x (permutations + 1)) matrix of indicators, so at most `batch_size` x n kernel entries exist at once
  (n = the pooled rows, at most 2 x `max_samples`: 512 x 4000 float64s, 16 MB, by default) and never n x n.
Each side is first subsampled to `max_samples` (2000) rows, seeded (without replacement, kept in row order), for both
tests; `rows_a` / `rows_b` say which rows were used and the top rows are rows of the given arrays.

Measured (tests/test_data_health_shift.py, 16-dimensional Gaussians, 500 rows a side, seed 0): two random halves of
one sample give an AUC of 0.54 and an MMD p-value of 0.16 (over 20 such null draws of 200 rows a side in 8
dimensions, 100 permutations: AUCs 0.46 to 0.57, p-values 0.04 to 0.95, one below 0.05); one dimension shifted by
1.5 standard deviations gives an AUC of 0.856 (Bayes optimum 0.856); three dimensions shifted by 1.5 give 0.968
(optimum 0.967); both have MMD p = 1/201, the smallest a 200-permutation test can give. A tenth of one side moved
far away (a new cluster) gives an AUC of only 0.55, the other nine tenths being alike, but MMD p = 1/201, and the
best-separated rows of that side are all in the cluster.

`shift_pair(a_name, b_name, features=..., embedding=...)` is one split pair's entry of a run's shift.json:
`a`, `b`, `domain_auc`, `mmd`, `mmd_p` and the per-feature tests, plain JSON values.

`run_shift(run_a, run_b)` is the same pair between two runs of one model over different data (their stored
embeddings, and the data columns of their samples tables, the label among them), for a dataset that arrives after
the model's runs were made.

`slice_shift(slices, samples, split_a=, split_b=)` asks which of a run's error slices grew or shrank between two of
its splits: per slice its share of each split and its error rate there, each change tested with Fisher's exact
test (exact for the small counts of a slice) and Holm-corrected over the slices (see its docstring).

Bad input (an empty side, different feature counts or columns, NaN or infinite values, a 1-D array) raises a
one-line `AnalyzerError` that names the fix; bad options raise `InvalidOption` before any computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError, InvalidOption, whole_number

ALPHA = 0.05  # significance level of the Holm-corrected per-feature tests
CORRECTION = "holm"
MEDIAN_SAMPLE = 1000  # pooled rows whose pairwise distances give the median-heuristic bandwidth
KINDS = ("numeric", "categorical")
TESTS = {"numeric": "ks", "categorical": "chi2"}
FEATURE_COLUMNS = ("feature", "kind", "test", "statistic", "p_value", "p_adjusted", "effect", "mean_difference",
                   "shifted")
SEPARATED_COLUMNS = ("side", "rank", "row", "probability")


def json_value(value):
    """A JSON value of what a data-health result stores: numpy scalars as Python ones, a float that is not finite as
    None, an array or a tuple as a list of the same; text and None as they are, anything else as its text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return [json_value(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value if value is None or isinstance(value, str) else str(value)




def _level(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 < float(value) < 1:
        raise InvalidOption(f"alpha must be a number between 0 and 1 (such as 0.05), got {value!r}")
    return float(value)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m times (m - i + 1), made
    non-decreasing in that order by a running maximum, capped at 1. NaN p-values are not allowed."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise AnalyzerError("p-values must lie between 0 and 1 for Holm's correction: drop the NaN ones first")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


# ---------------------------------------------------------------------------------------------------- features

@dataclass(frozen=True)
class FeatureShift:
    """Per-feature shift tests of side b against side a (arrays in feature order); see the module's docstring."""

    features: tuple  # feature names
    kinds: tuple  # "numeric" or "categorical" per feature
    statistic: np.ndarray  # KS D (numeric) or chi-square (categorical)
    p_value: np.ndarray
    p_adjusted: np.ndarray  # Holm over all the features
    effect: np.ndarray  # KS D or Cramér's V, 0 to 1
    mean_difference: np.ndarray  # (mean_b - mean_a) / pooled std, NaN for categorical features
    n_a: int
    n_b: int
    alpha: float = ALPHA
    correction: str = CORRECTION

    def __post_init__(self):
        features = tuple(str(f) for f in self.features)
        kinds = tuple(str(k) for k in self.kinds)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "kinds", kinds)
        for name in ("statistic", "p_value", "p_adjusted", "effect", "mean_difference"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        count = len(features)
        if len(kinds) != count or any(k not in KINDS for k in kinds) or any(
                getattr(self, n).shape != (count,) for n in ("statistic", "p_value", "p_adjusted", "effect",
                                                               "mean_difference")):
            raise AnalyzerError("the feature shift came back malformed (arrays that do not match the features): "
                                "run the test again")

    @property
    def tests(self) -> tuple:
        return tuple(TESTS[k] for k in self.kinds)

    @property
    def shifted(self) -> np.ndarray:
        return self.p_adjusted < self.alpha

    def table(self):
        """One row per feature, in feature order: FEATURE_COLUMNS."""
        import pandas as pd

        return pd.DataFrame({"feature": list(self.features), "kind": list(self.kinds), "test": list(self.tests),
                             "statistic": self.statistic, "p_value": self.p_value, "p_adjusted": self.p_adjusted,
                             "effect": self.effect, "mean_difference": self.mean_difference,
                             "shifted": self.shifted}, columns=list(FEATURE_COLUMNS))

    def to_json(self) -> dict:
        rows = [dict(zip(FEATURE_COLUMNS, (f, k, t, *map(json_value, values))))
                for f, k, t, *values in zip(self.features, self.kinds, self.tests, self.statistic, self.p_value,
                                            self.p_adjusted, self.effect, self.mean_difference, self.shifted)]
        return {"n_a": int(self.n_a), "n_b": int(self.n_b), "alpha": float(self.alpha),
                "correction": self.correction, "features": rows}


def _sides(a, b, feature_names):
    """(names, columns of a, columns of b, default categorical flags): one 1-D array per feature and side."""
    import pandas as pd

    frames = [isinstance(s, pd.DataFrame) for s in (a, b)]
    if any(frames):
        columns = list((a if frames[0] else b).columns)
        sides = []
        for side, name in ((a, "a"), (b, "b")):
            if not isinstance(side, pd.DataFrame):
                side = np.asarray(side)
                if side.ndim != 2 or side.shape[1] != len(columns):
                    raise AnalyzerError(f"{name} has shape {side.shape} but the other side has {len(columns)} "
                                        f"columns: pass two tables with the same features")
                side = pd.DataFrame(side, columns=columns)
            missing = [c for c in columns if c not in side.columns]
            extra = [c for c in side.columns if c not in columns]
            if missing or extra:
                only = ", ".join(map(str, (missing or extra)[:5]))
                raise AnalyzerError(f"the two sides have different columns ({only} on one side only): pass two "
                                    f"tables with the same features")
            sides.append(side[columns])
        fa, fb = sides
        default = []
        for c in columns:
            kind = fa[c].dtype.kind
            if isinstance(fa[c].dtype, pd.CategoricalDtype) or kind in "ObUS" or \
                    pd.api.types.is_string_dtype(fa[c].dtype):
                default.append(True)
            elif kind in "iuf":
                default.append(False)
            else:
                raise AnalyzerError(f"column {c!r} has dtype {fa[c].dtype}: convert it to numbers or categories "
                                    f"before testing shift")
        def column(frame, c, flag):
            if flag:
                return frame[c].to_numpy(dtype=object)
            try:  # numeric columns as floats, a nullable column's missing values as NaN (refused below)
                return frame[c].to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError):
                raise AnalyzerError(f"column {c!r} holds numbers on one side and text on the other: pass the same "
                                    f"types on both sides (or name it in categorical=)") from None

        cols_a, cols_b = ([column(frame, c, flag) for c, flag in zip(columns, default)] for frame in (fa, fb))
        names = [str(c) for c in columns]
    else:
        arrays = []
        for side, name in ((a, "a"), (b, "b")):
            side = np.asarray(side)
            if side.ndim != 2:
                raise AnalyzerError(f"{name} must be a 2-D array (rows, features), got shape {side.shape}: reshape "
                                    f"one feature with .reshape(-1, 1)")
            arrays.append(side)
        xa, xb = arrays
        if xa.shape[1] != xb.shape[1]:
            raise AnalyzerError(f"a has {xa.shape[1]} features and b {xb.shape[1]}: pass the same features on both "
                                f"sides")
        if xa.dtype.kind not in "iufbOUS" or xb.dtype.kind not in "iufbOUS":
            raise AnalyzerError(f"arrays of dtype {xa.dtype} / {xb.dtype} cannot be tested: pass numbers, "
                                f"categories or a DataFrame")
        categorical = xa.dtype.kind in "bOUS" or xb.dtype.kind in "bOUS"
        default = [categorical] * xa.shape[1]
        cols_a = list(xa.T)
        cols_b = list(xb.T)
        names = [str(i) for i in range(xa.shape[1])]
    if feature_names is not None:
        given = [str(n) for n in feature_names]
        if len(given) != len(names):
            raise InvalidOption(f"{len(given)} feature names for {len(names)} features: give one name per column")
        if len(set(given)) != len(given):
            raise InvalidOption("feature_names has repeated names: give each column its own name")
        names = given
    if not names:
        raise AnalyzerError("no features to test: pass arrays with at least one column")
    for side, cols in (("a", cols_a), ("b", cols_b)):
        if len(cols[0]) < 2:
            raise AnalyzerError(f"side {side} has {len(cols[0])} rows: a shift test needs at least 2 rows on each "
                                f"side")
    return names, cols_a, cols_b, default


def _categorical_flags(categorical, names: list, default: list) -> list:
    flags = list(default)
    if categorical is None:
        return flags
    chosen = [categorical] if isinstance(categorical, (str, int, np.integer)) else list(categorical)
    for item in chosen:
        if isinstance(item, (bool, np.bool_)):
            raise InvalidOption(f"categorical holds {item!r}: give column names or indices")
        if isinstance(item, (int, np.integer)):
            if not -len(names) <= item < len(names):
                raise InvalidOption(f"categorical column {item} is outside the {len(names)} features: give an "
                                    f"index from 0 to {len(names) - 1} or a name")
            flags[int(item)] = True
        elif str(item) in names:
            flags[names.index(str(item))] = True
        else:
            raise InvalidOption(f"categorical names {item!r}, which is not a feature: choose from "
                                f"{', '.join(names[:10])}")
    return flags


def _numeric(name: str, ca, cb):
    from scipy.stats import ks_2samp

    try:
        va, vb = np.asarray(ca, dtype=np.float64), np.asarray(cb, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnalyzerError(f"feature {name!r} is not numeric: name it in categorical=") from None
    for side, v in (("a", va), ("b", vb)):
        if not np.isfinite(v).all():
            raise AnalyzerError(f"feature {name!r} holds NaN or infinite values in {side}: fill or drop them "
                                f"before testing shift")
    result = ks_2samp(va, vb)
    na, nb = len(va), len(vb)
    pooled = math.sqrt(((na - 1) * va.var(ddof=1) + (nb - 1) * vb.var(ddof=1)) / (na + nb - 2))
    gap = float(vb.mean() - va.mean())
    d = gap / pooled if pooled > 0 else (0.0 if gap == 0 else math.copysign(math.inf, gap))
    return float(result.statistic), float(result.pvalue), float(result.statistic), d


def _categorical(name: str, ca, cb):
    import pandas as pd
    from scipy.stats import chi2_contingency

    values = pd.Series(np.concatenate([np.asarray(ca, dtype=object), np.asarray(cb, dtype=object)]), dtype=object)
    if values.isna().any():
        side = "a" if values[:len(ca)].isna().any() else "b"
        raise AnalyzerError(f"feature {name!r} holds missing values in {side}: fill or drop them before testing "
                            f"shift")
    codes, uniques = pd.factorize(values)
    c = len(uniques)
    if c < 2:
        return 0.0, 1.0, 0.0, math.nan
    table = np.stack([np.bincount(codes[:len(ca)], minlength=c), np.bincount(codes[len(ca):], minlength=c)])
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    return float(chi2), float(p), v, math.nan


def feature_shift(a, b, *, feature_names=None, categorical=None, alpha: float = ALPHA) -> FeatureShift:
    """Per-feature tests of b against a (2-D arrays (N, F) or DataFrames with the same columns): KS for numeric
    features, chi-square for categorical ones, Holm-corrected; see the module's docstring."""
    alpha = _level(alpha)
    names, cols_a, cols_b, default = _sides(a, b, feature_names)
    flags = _categorical_flags(categorical, names, default)
    results = [(_categorical if flag else _numeric)(name, ca, cb)
               for name, ca, cb, flag in zip(names, cols_a, cols_b, flags)]
    statistic, p, effect, d = (np.array(v, dtype=np.float64) for v in zip(*results))
    return FeatureShift(features=tuple(names), kinds=tuple("categorical" if f else "numeric" for f in flags),
                        statistic=statistic, p_value=p, p_adjusted=holm(p), effect=effect, mean_difference=d,
                        n_a=len(cols_a[0]), n_b=len(cols_b[0]), alpha=alpha)


# -------------------------------------------------------------------------------------------------- embeddings

@dataclass(frozen=True)
class EmbeddingShift:
    """The domain classifier's AUC and the MMD test of side b against side a; see the module's docstring."""

    domain_auc: float
    mmd: float  # unbiased MMD^2 estimate (can be slightly negative when the sides do not differ)
    mmd_p: float  # permutation p-value, NaN with 0 permutations
    bandwidth: float  # the RBF kernel's sigma (median heuristic)
    rows_a: np.ndarray  # rows of a used (ascending): all of them, or a seeded subsample of max_samples
    rows_b: np.ndarray
    probability_a: np.ndarray  # out-of-fold probability of being from b, per row of rows_a
    probability_b: np.ndarray  # the same per row of rows_b
    null_mmd: np.ndarray  # (permutations,) MMD^2_u of the relabelled rows
    top_k: int
    seed: int
    folds: int
    permutations: int
    max_samples: int

    def __post_init__(self):
        for name in ("domain_auc", "mmd", "mmd_p", "bandwidth"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("rows_a", "rows_b"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        for name in ("probability_a", "probability_b", "null_mmd"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if self.probability_a.shape != self.rows_a.shape or self.probability_b.shape != self.rows_b.shape \
                or self.null_mmd.shape != (int(self.permutations),):
            raise AnalyzerError("the embedding shift came back malformed (probabilities that do not match the rows "
                                "used): run the test again")

    def separated(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, probability of their own side): the `top_k` rows of side "a" or "b" the classifier separates
        best, most separated first (ties by row)."""
        if side not in ("a", "b"):
            raise InvalidOption(f"side must be 'a' or 'b', got {side!r}")
        rows, p = (self.rows_a, 1.0 - self.probability_a) if side == "a" else (self.rows_b, self.probability_b)
        order = np.lexsort((rows, -p))[:self.top_k]
        return rows[order], p[order]

    @property
    def top_a(self) -> np.ndarray:
        return self.separated("a")[0]

    @property
    def top_b(self) -> np.ndarray:
        return self.separated("b")[0]

    def table(self):
        """The best-separated rows of each side (SEPARATED_COLUMNS): side, rank (0 first), row of that side's
        array, out-of-fold probability of its own side."""
        import pandas as pd

        parts = []
        for side in ("a", "b"):
            rows, p = self.separated(side)
            parts.append(pd.DataFrame({"side": side, "rank": np.arange(len(rows)), "row": rows, "probability": p}))
        return pd.concat(parts, ignore_index=True)[list(SEPARATED_COLUMNS)]

    def to_json(self) -> dict:
        top = {}
        for side in ("a", "b"):
            rows, p = self.separated(side)
            top[f"top_{side}"] = [{"row": int(r), "probability": json_value(q)} for r, q in zip(rows, p)]
        return {"domain_auc": json_value(self.domain_auc), "mmd": json_value(self.mmd), "mmd_p": json_value(self.mmd_p),
                "bandwidth": json_value(self.bandwidth), "n_a": int(len(self.rows_a)), "n_b": int(len(self.rows_b)),
                "seed": int(self.seed), "folds": int(self.folds), "permutations": int(self.permutations),
                "max_samples": int(self.max_samples), **top}


def _embeddings(x, name: str) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnalyzerError(f"{name} must be a numeric array of embeddings (rows, dimensions)") from None
    if x.ndim != 2:
        raise AnalyzerError(f"{name} must be a 2-D array of embeddings (rows, dimensions), got shape {x.shape}: "
                            f"flatten each row's activations first")
    if len(x) == 0 or x.shape[1] == 0:
        raise AnalyzerError(f"{name} is empty (shape {x.shape}): pass at least one row of embeddings per side")
    if not np.isfinite(x).all():
        raise AnalyzerError(f"{name} holds NaN or infinite values: drop those rows (or fix the layer) before testing "
                            f"shift")
    return x


def median_bandwidth(z: np.ndarray, rng) -> float:
    """The median heuristic's sigma: the median pairwise Euclidean distance over at most MEDIAN_SAMPLE rows of `z`
    (a seeded subsample from `rng`), the median of the positive ones if more than half are 0; 0 if all are."""
    from scipy.spatial.distance import pdist

    rows = np.sort(rng.choice(len(z), MEDIAN_SAMPLE, replace=False)) if len(z) > MEDIAN_SAMPLE else slice(None)
    distances = pdist(z[rows])
    median = float(np.median(distances))
    if median == 0:
        positive = distances[distances > 0]
        median = float(np.median(positive)) if len(positive) else 0.0
    return median


def mmd_statistics(z: np.ndarray, sides: np.ndarray, bandwidth: float, *, batch_size: int = 512) -> np.ndarray:
    """MMD^2_u (RBF kernel of width `bandwidth`) of the pooled rows `z` (n, D) for each labelling in `sides`
    (n, P) of 0/1 (1 = side a), in one pass over the kernel, `batch_size` rows of it at a time (module docstring)."""
    n = len(z)
    u = np.asarray(sides, dtype=np.float64)
    m = u.sum(0)
    k = n - m
    if (m < 2).any() or (k < 2).any():
        raise AnalyzerError("MMD needs at least 2 rows on each side")
    gamma = 1.0 / (2.0 * bandwidth ** 2)
    sq = np.einsum("ij,ij->i", z, z)
    row_sums = np.empty(n)
    quad = np.zeros(u.shape[1])
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (z[start:stop] @ z.T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(stop - start), np.arange(start, stop)] = 0.0  # k(x, x) = 1 exactly
        kernel = np.exp(-gamma * d2, out=d2)
        row_sums[start:stop] = kernel.sum(1)
        quad += np.einsum("ij,ij->j", kernel @ u, u[start:stop])
    total = row_sums.sum()
    cross = row_sums @ u  # u'K1
    aa = (quad - m) / (m * (m - 1))  # the diagonal, k(x, x) = 1, left out
    bb = (total - 2.0 * cross + quad - k) / (k * (k - 1))
    ab = (cross - quad) / (m * k)
    return aa + bb - 2.0 * ab


def embedding_shift(a, b, *, seed: int = 0, folds: int = 5, permutations: int = 200, max_samples: int = 2000,
                    batch_size: int = 512, top_k: int = 10) -> EmbeddingShift:
    """A domain classifier's out-of-fold ROC AUC and the RBF-kernel MMD with its permutation p-value, of the
    embeddings `b` against `a` (2-D arrays with the same number of dimensions); see the module's docstring."""
    seed = whole_number(seed, "seed", 0)
    folds = whole_number(folds, "folds", 2)
    permutations = whole_number(permutations, "permutations", 0)
    max_samples = whole_number(max_samples, "max_samples", folds)
    batch_size = whole_number(batch_size, "batch_size", 1)
    top_k = whole_number(top_k, "top_k", 0)
    a, b = _embeddings(a, "a"), _embeddings(b, "b")
    if a.shape[1] != b.shape[1]:
        raise AnalyzerError(f"a has {a.shape[1]} dimensions and b {b.shape[1]}: pass embeddings of the same layer")
    for name, side in (("a", a), ("b", b)):
        if len(side) < folds:
            raise AnalyzerError(f"{name} has {len(side)} rows, fewer than the {folds} folds: pass more rows or "
                                f"lower folds")

    rng = np.random.default_rng(seed)
    rows = []
    for side in (a, b):
        rows.append(np.sort(rng.choice(len(side), max_samples, replace=False)) if len(side) > max_samples
                    else np.arange(len(side)))
    rows_a, rows_b = rows
    z = np.concatenate([a[rows_a], b[rows_b]])
    na, nb = len(rows_a), len(rows_b)
    y = np.r_[np.zeros(na, dtype=np.int64), np.ones(nb, dtype=np.int64)]

    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged fit still ranks the rows
        probability = cross_val_predict(classifier, z, y, method="predict_proba",
                                        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed))[:, 1]
    auc = float(roc_auc_score(y, probability))

    bandwidth = median_bandwidth(z, rng)
    if bandwidth == 0:  # every pooled row is the same: nothing to tell apart
        mmd, null = 0.0, np.zeros(permutations)
        mmd_p = 1.0 if permutations else math.nan
    else:
        sides = np.empty((na + nb, permutations + 1))
        sides[:, 0] = y == 0
        for p in range(permutations):
            sides[:, p + 1] = rng.permutation(na + nb) < na
        stats = mmd_statistics(z, sides, bandwidth, batch_size=batch_size)
        mmd, null = float(stats[0]), stats[1:]
        mmd_p = float((1 + np.sum(null >= mmd)) / (1 + permutations)) if permutations else math.nan
    return EmbeddingShift(domain_auc=auc, mmd=mmd, mmd_p=mmd_p, bandwidth=bandwidth, rows_a=rows_a, rows_b=rows_b,
                          probability_a=probability[:na], probability_b=probability[na:], null_mmd=null,
                          top_k=top_k, seed=seed, folds=folds, permutations=permutations, max_samples=max_samples)


def shift_pair(a_name: str, b_name: str, *, features: FeatureShift | None = None,
               embedding: EmbeddingShift | None = None) -> dict:
    """One split pair's entry of a run's shift.json, plain JSON values: the split names `a` and `b`,
    `domain_auc`, `mmd`, `mmd_p` (None without `embedding`), `embedding` (its full `to_json()`), and `features` (the
    per-feature tests, [] without `features`, with their `correction` and `alpha`)."""
    if features is not None and not isinstance(features, FeatureShift):
        raise InvalidOption("features must be the FeatureShift that feature_shift returns")
    if embedding is not None and not isinstance(embedding, EmbeddingShift):
        raise InvalidOption("embedding must be the EmbeddingShift that embedding_shift returns")
    record = {"a": str(a_name), "b": str(b_name), "domain_auc": None, "mmd": None, "mmd_p": None, "embedding": None,
              "features": [], "correction": CORRECTION, "alpha": ALPHA}
    if embedding is not None:
        emb = embedding.to_json()
        record.update(domain_auc=emb["domain_auc"], mmd=emb["mmd"], mmd_p=emb["mmd_p"], embedding=emb)
    if features is not None:
        feat = features.to_json()
        record.update(features=feat["features"], correction=feat["correction"], alpha=feat["alpha"],
                      n_a=feat["n_a"], n_b=feat["n_b"])
    return record


def name_top_rows(record: dict, ids_a, ids_b) -> dict:
    """`record` (a `shift_pair`) with the `id` of each best-separated row added, from each side's ids in row order:
    what a page's "samples that separate the splits" shows."""
    for side, ids in (("a", np.asarray(ids_a)), ("b", np.asarray(ids_b))):
        for entry in (record.get("embedding") or {}).get(f"top_{side}", []):
            entry["id"] = json_value(ids[entry["row"]])
    return record


def run_features(run):
    """The per-sample columns of a run's samples table that describe its data, not its model: table features and
    metadata (not the model's outputs, the task's columns, ground truth, the split, or lists), and the label as a
    category for a classifier (a label shift)."""
    import pandas as pd

    from ..loading.run_checks import CORE_COLUMNS, TASK_COLUMNS

    samples = run.sample_table
    skip = set(CORE_COLUMNS) | set(TASK_COLUMNS.get(run.task, ())) | {"split"} | \
        set(run.info["dataset"].get("ground_truth_columns") or ())
    columns = {}
    for column in samples.columns:
        values = samples[column]
        if column in skip or values.map(lambda v: isinstance(v, (list, tuple, np.ndarray, dict))).any():
            continue
        columns[str(column)] = values.to_numpy()
    if run.task in ("classification", "binary") and "label" in samples.columns:
        names = run.class_names
        columns["label (class)"] = np.asarray([names[int(v)] if 0 <= int(v) < len(names) else str(v)
                                               for v in samples["label"]], dtype=object)
    return pd.DataFrame(columns)


def run_shift(run_a, run_b, *, seed: int = 0, permutations: int = 200, max_samples: int = 2000,
              alpha: float = ALPHA) -> dict:
    """Shift between two runs of one model over different data (this month's inputs against the test set): the
    `shift_pair` of the runs' stored embeddings (the same layer of the same model: another model's embedding space
    is another space) and of the data columns both samples tables hold (`run_features`), named after the runs'
    directories, with the best-separated rows' ids. Raises AnalyzerError when the runs do not share their model,
    do share their data, or store no common embedding layer."""
    if run_a.info["model"]["sha256"] != run_b.info["model"]["sha256"]:
        raise AnalyzerError("the two runs were made with different models, whose embeddings are different spaces: "
                            "analyse both datasets with one model to compare the data")
    if run_a.info["dataset"]["sha256"] == run_b.info["dataset"]["sha256"]:
        raise AnalyzerError("the two runs hold the same data: there is no shift to measure")
    layer = run_a.info.get("embedding_layer")
    if not layer or layer != run_b.info.get("embedding_layer") or not run_a.has(f"embeddings/{layer}.npy") \
            or not run_b.has(f"embeddings/{layer}.npy"):
        raise AnalyzerError("the runs do not both store embeddings of one layer: run them again with the same "
                            "--layer")
    embedding = embedding_shift(np.asarray(run_a.read_npy(f"embeddings/{layer}.npy")),
                                np.asarray(run_b.read_npy(f"embeddings/{layer}.npy")), seed=seed,
                                permutations=permutations, max_samples=max_samples)
    fa, fb = run_features(run_a), run_features(run_b)
    common = [c for c in fa.columns if c in fb.columns]
    tests = feature_shift(fa[common], fb[common], alpha=alpha) if common else None
    record = shift_pair(run_a.path.name, run_b.path.name, features=tests, embedding=embedding)
    record["layer"] = layer
    return name_top_rows(record, run_a.sample_table["id"].to_numpy(), run_b.sample_table["id"].to_numpy())


# ------------------------------------------------------------------------------------------------------ slices

SLICE_SHIFT_COLUMNS = ("description", "source", "size_a", "size_b", "share_a", "share_b", "share_p",
                       "share_p_adjusted", "errors_a", "errors_b", "error_rate_a", "error_rate_b", "error_rate_change",
                       "error_p", "error_p_adjusted", "change")


def slice_shift(slices, samples, *, split_a: str, split_b: str, split_column: str = "split",
                alpha: float = ALPHA):
    """Which error slices grew or shrank between two splits of one run: a DataFrame, one row per slice of
    `slices` (slices.parquet: its `ids` and `description`) over `samples` (samples.parquet, with `id`, `correct`
    and `split_column`), in the slices' order.

    For each slice and each split: its size, its share of the split, its errors and error rate. Two questions get
    Fisher's exact test (`scipy.stats.fisher_exact`, two-sided: exact on the 2 x 2 table, right for the small
    counts a slice of an evaluation split has, where a chi-square's approximation is not): did the slice's share
    of the split change (in the slice or not x split a or b), and did its error rate change (wrong or right x split
    a or b, the slice's rows only). Each family is Holm-corrected over the slices (`holm`); `change` is "grew"
    (the error rate is higher in b, p_adjusted < alpha), "shrank" (lower), "same", or "absent" (the slice has
    no rows in one split). A slice found on the whole run may hold rows of both splits; one that exists only in
    the evaluation split (a new background) shows as a share near 0 in a."""
    import pandas as pd
    from scipy.stats import fisher_exact

    level = _level(alpha)
    for column in ("id", "correct", split_column):
        if column not in samples.columns:
            raise AnalyzerError(f"the samples table has no {column!r} column: slice shift needs the run's samples "
                                f"with their split")
    if "ids" not in slices.columns:
        raise AnalyzerError("the slices table has no 'ids' column: give slices.parquet as the run wrote it")
    split = samples[split_column].astype(str).to_numpy()
    in_a, in_b = split == str(split_a), split == str(split_b)
    for name, mask in ((split_a, in_a), (split_b, in_b)):
        if not mask.any():
            raise AnalyzerError(f"no samples of split {name!r}: choose from {', '.join(sorted(set(split)))}")
    wrong = ~samples["correct"].to_numpy(dtype=bool)
    ids = samples["id"].to_numpy()
    rows = []
    for record in slices.to_dict("records"):
        inside = np.isin(ids, np.asarray(list(record["ids"])))
        size_a, size_b = int((inside & in_a).sum()), int((inside & in_b).sum())
        errors_a, errors_b = int((inside & in_a & wrong).sum()), int((inside & in_b & wrong).sum())
        share_p = fisher_exact([[size_a, int(in_a.sum()) - size_a], [size_b, int(in_b.sum()) - size_b]])[1]
        error_p = fisher_exact([[errors_a, size_a - errors_a], [errors_b, size_b - errors_b]])[1] \
            if size_a and size_b else np.nan
        rows.append({"description": str(record.get("description", "")), "source": str(record.get("source", "")),
                     "size_a": size_a, "size_b": size_b, "share_a": size_a / in_a.sum(),
                     "share_b": size_b / in_b.sum(), "share_p": float(share_p), "errors_a": errors_a,
                     "errors_b": errors_b, "error_rate_a": errors_a / size_a if size_a else np.nan,
                     "error_rate_b": errors_b / size_b if size_b else np.nan, "error_p": float(error_p)})
    table = pd.DataFrame(rows, columns=[c for c in SLICE_SHIFT_COLUMNS if c not in (
        "share_p_adjusted", "error_rate_change", "error_p_adjusted", "change")])
    table["share_p_adjusted"] = holm(table["share_p"]) if len(table) else []
    table["error_rate_change"] = table["error_rate_b"] - table["error_rate_a"]
    tested = table["error_p"].notna().to_numpy()
    adjusted = np.full(len(table), np.nan)
    if tested.any():
        adjusted[tested] = holm(table.loc[tested, "error_p"])
    table["error_p_adjusted"] = adjusted
    table["change"] = np.where(~tested, "absent", np.where(
        adjusted < level, np.where(table["error_rate_change"] > 0, "grew", "shrank"), "same"))
    return table[list(SLICE_SHIFT_COLUMNS)]
