"""Error slices: groups of samples where the model fails far more than on average, described in words.

Two sources:
- `features`: a shallow decision tree fitted to predict errors from features, metadata and the label (or the
  prediction, when the label is not among the columns: never both, see `_rule_features`); every node of the tree is a
  candidate slice, its path turned into a rule (`label == "circle" and background == "green"`), with bounds on one
  column merged (`0.3 < x <= 0.5`).
- `embeddings`: k-means clusters of a layer's activations (after PCA), so data without metadata also gets slices.

Slices are ranked by SliceLine's score (Sagadeeva and Boehm, 2021), which weighs the error rate against the size:
`alpha * (error_rate / overall_error_rate - 1) - (1 - alpha) * (N / size - 1)`. Samples are sorted by id before any
fitting, so the slices do not depend on the order of the rows.

A slice that mostly lies inside a better-ranked one is that slice again, narrowed ("age > 60 and bmi > 30" under
"age > 60", or a cluster of activations inside a rule): it is merged into the better one, which lists it in its
`merged` column, unless it fails significantly more than the rest of the better one. The other way round, a slice that
holds most of a better-ranked one ("age > 60" below "age > 60 and smoker == yes", its usual place: the narrower rule
has the higher error rate) is merged into it unless its other samples fail significantly more than the data outside
both: failing at the overall rate without them, it is bad only because it holds the better slice. Near-copies (Jaccard
above `max_overlap`) are merged whatever their error rate.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..errors import AnalyzerError

SOURCES = ("features", "embeddings")
# Columns that describe the model's output on a sample rather than the sample: never used in a rule.
OUTCOME_COLUMNS = ("id", "correct", "confidence", "loss", "margin", "prediction", "residual", "abs_error",
                   "labels_wrong", "hamming_error", "missed", "false_alarms")
MAX_CATEGORIES = 30  # one-hot the most frequent values of a categorical column; rarer ones are left out
MAX_DISTINCT = 200  # a text column with more distinct values (file names, free text) is not a category
# A condition added to a group must mean something: a tree node is a slice only if its errors exceed its sibling's at
# this significance, a slice inside a better-ranked one is shown only if its errors exceed the rest of that one's, and
# a slice holding a better-ranked one only if its other samples' errors exceed those of the data outside both.
SPLIT_P_VALUE = 0.01
# A slice with at least this share of its samples inside a better-ranked slice is shown by it already: a refinement
# (the better one plus a condition) or a cluster that a rule explains. At 0.8 what the smaller slice adds, at most a
# fifth of its samples, is too little to be a finding of its own; a near-copy threshold (Jaccard 0.9) missed these,
# as a refinement half the size of its parent has Jaccard 0.5 with it. The same share of a better-ranked slice inside
# a lower-ranked one makes the lower one its broader version (the parent of a refinement that ranks above it).
MIN_CONTAINMENT = 0.8
MAX_OVERLAP = 0.9  # default near-copy threshold: a slice whose members have this Jaccard with a better one is merged
MAX_FIT_ROWS = 10_000  # PCA and k-means are fitted on at most this many samples, then applied to all
# The tree is fitted on at most this many samples, drawn with the overall error rate kept (stratified), and every
# node's size and errors are then counted over all rows: a 10M-row run fits in the memory and time of a 1M-row one
MAX_TREE_ROWS = 1_000_000
ASSIGN_CHUNK_ROWS = 1 << 16  # rows projected and assigned to a cluster at a time
N_COMPONENTS = 20  # embeddings are projected on this many principal components before k-means
SLICE_COLUMNS = ("source", "description", "size", "errors", "error_rate", "lift", "score", "ids", "conditions",
                 "merged")
TEXT_COLUMNS = ("source", "description", "ids", "conditions", "merged")  # stored as objects (text, or lists of ids)


def default_min_size(n: int) -> int:
    """The smallest slice worth reporting: the larger of 20 samples and 1% of the data."""
    return max(20, int(np.ceil(0.01 * n)))


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise AnalyzerError(f"{name} must be an integer of at least {low}, got {value!r}")


def _check_samples(samples: pd.DataFrame) -> None:
    if not isinstance(samples, pd.DataFrame):
        raise AnalyzerError(f"samples must be a DataFrame (a run's samples.parquet), got {type(samples).__name__}")
    missing = [c for c in ("id", "label", "pred", "correct") if c not in samples.columns]
    if missing:
        raise AnalyzerError(f"the samples table lacks {', '.join(missing)}: pass a run's samples.parquet")
    if len(samples) == 0:
        raise AnalyzerError("no samples to slice: select at least one sample")


def _id_order(ids: np.ndarray) -> np.ndarray:
    try:
        return np.argsort(ids, kind="stable")
    except TypeError:  # mixed id types: order by their text
        return np.argsort(ids.astype(str), kind="stable")


def slice_score(error_rate, size, *, overall_error: float, n: int, alpha: float = 0.95):
    """SliceLine's score: positive when a slice's error rate is far enough above the overall rate for its size."""
    error_rate = np.asarray(error_rate, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    if overall_error <= 0:
        return np.full(error_rate.shape, np.nan)
    return alpha * (error_rate / overall_error - 1) - (1 - alpha) * (n / size - 1)


# ------------------------------------------------------------------------------------------------ feature encoding

def _fmt(value: float) -> str:
    return format(float(value), ".4g")


def _quote(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    return json.dumps(str(value))


def rule_columns(samples: pd.DataFrame) -> list:
    """Columns a rule may use: features, metadata, label and prediction (not the id nor the model's scores; the tree
    leaves the prediction out when the label is among them, see `_rule_features`)."""
    return [c for c in samples.columns if c not in OUTCOME_COLUMNS]


def _rule_features(columns: list) -> list:
    """The columns the tree may split on: all of `columns` but the prediction when the label is among them.

    Given the label, the prediction tells exactly whether a sample is wrong (and so does the label given the
    prediction), so a tree offered both splits on the pair ("label == cat and pred == dog": a cell of the confusion
    matrix, wrong by definition) ahead of any feature that explains the errors. Pruning such rules afterwards would
    lose the subtree below that split too, with the feature conditions the tree would have found there; without the
    prediction the tree finds them ('background == "green" and label != "square"'). The label is kept rather than the
    prediction as it describes the sample and not the model's output on it."""
    columns = list(columns)
    return [c for c in columns if c != "pred"] if "label" in columns else columns


def _encode(samples: pd.DataFrame, columns: list, class_names: list):
    """A float matrix for the tree and, per matrix column, what it means: ("num", col), ("cat", col, value,
    the column's other value if it has exactly two) or ("missing", col)."""
    blocks, specs = [], []
    for col in columns:
        series = samples[col]
        if col in ("label", "pred") and series.dtype.kind in "iu":  # class indices; label sets are categories
            codes = series.to_numpy()
            for k, name in enumerate(class_names):
                blocks.append(codes == k)
                specs.append(("cat", col, name))
            continue
        values = series.to_numpy()
        if series.dtype.kind in "fiu":
            values = values.astype(np.float64)
            missing = ~np.isfinite(values)
            if missing.all() or np.nanmin(values[~missing]) == np.nanmax(values[~missing]):
                continue
            if missing.any():
                blocks.append(missing)
                specs.append(("missing", col))
                values = np.where(missing, np.nanmedian(values[~missing]), values)
            blocks.append(values)
            specs.append(("num", col))
            continue
        if series.dtype.kind == "O" and not all(np.isscalar(v) or v is None for v in series.head(100)):
            continue  # arrays or lists per sample (e.g. masks) are no category
        text = series.astype("object").where(series.notna(), None)
        counts = text.value_counts()
        if len(counts) < 2 or (series.dtype.kind in "OSU" and len(counts) > MAX_DISTINCT):
            continue
        # With two values, "!= a" reads better as "== b": the spec carries the other value when there is one.
        for value in counts.index[:MAX_CATEGORIES]:
            blocks.append((text == value).to_numpy())
            other = counts.index[1 - list(counts.index).index(value)] if len(counts) == 2 and text.notna().all() \
                else None
            specs.append(("cat", col, value, other))
        if text.isna().any():
            blocks.append(text.isna().to_numpy())
            specs.append(("missing", col))
    if not blocks:
        return np.zeros((len(samples), 0), dtype=np.float32), specs
    return np.column_stack(blocks).astype(np.float32), specs


def _rule(path: list, specs: list) -> tuple[str, list]:
    """Merge a tree path [(matrix column, goes_right, threshold)] into conditions per data column and words."""
    merged = {}  # data column -> condition dict, in order of first use
    for feature, right, threshold in path:
        spec = specs[feature]
        col = spec[1]
        cond = merged.setdefault(col, {"column": col})
        if spec[0] == "num":
            if right:
                cond["low"] = max(threshold, cond.get("low", -np.inf))
            else:
                cond["high"] = min(threshold, cond.get("high", np.inf))
        elif spec[0] == "missing":
            cond["missing"] = bool(right)
        elif right:
            cond["equals"] = spec[2]
        elif len(spec) > 3 and spec[3] is not None:
            cond["equals"] = spec[3]
        else:
            cond.setdefault("excludes", []).append(spec[2])
    words, conditions = [], []
    for col, cond in merged.items():
        if cond.get("missing") is True:
            cond = {"column": col, "missing": True}
            words.append(f"{col} is missing")
        elif "equals" in cond:
            cond = {"column": col, "equals": cond["equals"]}
            words.append(f"{col} == {_quote(cond['equals'])}")
        else:
            if "excludes" in cond:
                ex = cond["excludes"]
                words.append(f"{col} != {_quote(ex[0])}" if len(ex) == 1
                             else f"{col} not in ({', '.join(_quote(v) for v in ex)})")
            low, high = cond.get("low"), cond.get("high")
            if low is not None and high is not None:
                words.append(f"{_fmt(low)} < {col} <= {_fmt(high)}")
            elif low is not None:
                words.append(f"{col} > {_fmt(low)}")
            elif high is not None:
                words.append(f"{col} <= {_fmt(high)}")
            if cond.get("missing") is False and "low" not in cond and "high" not in cond:
                words.append(f"{col} is not missing")
        conditions.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in cond.items()})
    return " and ".join(words), conditions


# --------------------------------------------------------------------------------------------------- feature slices

def feature_slices(samples: pd.DataFrame, *, class_names=None, columns=None, min_size: int | None = None,
                   max_depth: int = 3, alpha: float = 0.95, max_slices: int = 20, max_overlap: float = MAX_OVERLAP,
                   merge_refinements: bool = True, seed: int = 0) -> pd.DataFrame:
    """Slices from a decision tree fitted to predict errors; each tree node (but the root) is a candidate.

    Kept: nodes with at least `min_size` samples, an error rate above the overall one and significantly above their
    sibling's (so no condition in a rule follows noise), best score first. Merged into a better one (and listed in its
    `merged` column): a slice whose members overlap a better one's by more than `max_overlap` (Jaccard) and, with
    `merge_refinements`, one that lies inside a better one (see `MIN_CONTAINMENT`) without failing significantly more
    than the rest of it, or holds most of a better one while its other samples fail no more than the data outside
    both. The tree never sees the prediction when it sees the label (see `_rule_features`).
    """
    _check_samples(samples)
    _check_ranking(alpha=alpha, max_slices=max_slices, max_overlap=max_overlap, merge_refinements=merge_refinements)
    _, table = _by_id(samples)
    rows = _feature_candidates(table, class_names=class_names, columns=columns, min_size=min_size,
                               max_depth=max_depth, seed=seed)
    return _finish(rows, table, alpha=alpha, max_slices=max_slices, max_overlap=max_overlap,
                   merge_refinements=merge_refinements)


def _feature_candidates(table: pd.DataFrame, *, class_names, columns, min_size, max_depth: int, seed: int) -> list:
    """The tree's candidate slices of `table` (sorted by id): dicts with their members' row numbers in it."""
    from sklearn.tree import DecisionTreeClassifier

    _check_int("max_depth", max_depth, 1)
    n = len(table)
    min_size = default_min_size(n) if min_size is None else min_size
    _check_int("min_size", min_size, 1)
    names = _class_names(table, class_names) if table["label"].dtype.kind in "iu" else []
    if columns is None:
        columns = rule_columns(table)
    else:
        unknown = [c for c in columns if c not in table.columns]
        if unknown:
            raise AnalyzerError(f"no column {', '.join(map(str, unknown))} in the samples table: choose from "
                                f"{', '.join(map(str, rule_columns(table)))}")
    errors = ~table["correct"].to_numpy(dtype=bool)
    overall = errors.mean()
    x, specs = _encode(table, _rule_features(columns), names)
    if x.shape[1] == 0 or errors.all() or not errors.any() or n < 2 * min_size:
        return []
    fit_rows = stratified_rows(errors, MAX_TREE_ROWS, seed=seed)
    # a leaf of the sample holds min_size samples of all rows in proportion
    leaf = max(1, int(np.ceil(min_size * len(fit_rows) / n)))
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=leaf, random_state=seed)
    tree.fit(x[fit_rows], errors[fit_rows])
    paths = tree.decision_path(x).tocsc()  # every row: the slices' sizes and errors are counts over all of them
    size = np.diff(paths.indptr)
    err = np.asarray(paths.T @ errors.astype(np.float64)).ravel()
    t = tree.tree_
    parent = np.full(t.node_count, -1)
    went_right = np.zeros(t.node_count, dtype=bool)
    for node in range(t.node_count):
        for child, right in ((t.children_left[node], False), (t.children_right[node], True)):
            if child >= 0:
                parent[child] = node
                went_right[child] = right
    sibling = np.full(t.node_count, -1)
    for node in range(t.node_count):
        left, right = t.children_left[node], t.children_right[node]
        if left >= 0:
            sibling[left], sibling[right] = right, left
    candidates = [j for j in range(1, t.node_count) if size[j] >= min_size and err[j] / size[j] > overall
                  and _worse_than(err[j], size[j], err[sibling[j]], size[sibling[j]], tests=x.shape[1])]
    rows = []
    for j in candidates:
        path, node = [], j
        while parent[node] >= 0:
            p = parent[node]
            path.append((int(t.feature[p]), bool(went_right[node]), float(t.threshold[p])))
            node = p
        description, conditions = _rule(path[::-1], specs)
        used = {c["column"] for c in conditions}
        if used <= {"label", "pred"}:
            # the label or the prediction alone is a row or column of the confusion matrix (both together, a cell of
            # it, never come: see _rule_features): no feature. They narrow a feature's slice ("label == circle and
            # background == green")
            continue
        members = paths.indices[paths.indptr[j]:paths.indptr[j + 1]]
        rows.append({"source": "features", "description": description, "conditions": json.dumps(conditions),
                     "members": members, "size": int(size[j]), "errors": int(err[j])})
    return rows


def stratified_rows(labels: np.ndarray, limit: int, *, seed: int = 0) -> np.ndarray:
    """Row numbers of at most `limit` rows, each value of `labels` (errors: True/False) kept at its share, in row
    order; all rows when there are no more than `limit`."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        chosen.append(rng.choice(rows, size=max(1, int(round(len(rows) * limit / n))), replace=False))
    return np.sort(np.concatenate(chosen))


def _worse_than(errors: float, size: float, other_errors: float, other_size: float, *, tests: int) -> bool:
    """Whether a group's error rate is significantly above another's (one-sided Fisher exact test at SPLIT_P_VALUE,
    Bonferroni over `tests`): a tree node against its sibling, over the columns the tree chose the split from; a
    slice against the rest of a better slice holding it, and the rest of a slice holding a better one against the data
    outside both, over the candidate slices. A group that passes only by chance would add a condition that means
    nothing (a split that follows noise, a refinement that fails no more, a broader slice bad only where it holds the
    better one)."""
    from scipy.stats import fisher_exact

    table = [[int(errors), int(size - errors)], [int(other_errors), int(other_size - other_errors)]]
    return fisher_exact(table, alternative="greater").pvalue < SPLIT_P_VALUE / max(tests, 1)


def _class_names(samples: pd.DataFrame, class_names) -> list:
    k = int(max(samples["label"].max(), samples["pred"].max())) + 1
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) < k:
        raise AnalyzerError(f"{len(names)} class names but labels or predictions reach class {k - 1}: "
                            f"give one name per class")
    return names


def _check_ranking(*, alpha, max_slices, max_overlap, merge_refinements) -> None:
    """The options of the ranking and merging that every source shares: checked before any fitting."""
    if not isinstance(alpha, (int, float, np.floating)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        raise AnalyzerError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    _check_int("max_slices", max_slices, 1)
    if not isinstance(max_overlap, (int, float, np.floating)) or isinstance(max_overlap, bool) \
            or not 0 < max_overlap <= 1:
        raise AnalyzerError(f"max_overlap (a Jaccard index) must lie in (0, 1], got {max_overlap!r}")
    if not isinstance(merge_refinements, (bool, np.bool_)):
        raise AnalyzerError(f"merge_refinements must be True or False, got {merge_refinements!r}")


def _by_id(samples: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """The sorting of the samples by id, and the sorted table: every source fits on this order (so the slices do not
    depend on the order of the rows), and their members' row numbers in it agree."""
    order = _id_order(samples["id"].to_numpy())
    return order, samples.iloc[order].reset_index(drop=True)


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in TEXT_COLUMNS else np.float64) for c in SLICE_COLUMNS})


def _covering_slice(candidate: np.ndarray, shown: list, masks: np.ndarray, errors: np.ndarray, *, max_overlap: float,
                    merge_refinements: bool, tests: int) -> tuple[int | None, dict]:
    """The first of the `shown` slices (rows of `masks`, best first) that already shows the `candidate` slice (a
    mask), and how (the `merged` entry's keys but the candidate's own description, source, size and error rate); (None,
    {}) if none does. The candidate is a near-copy of it (`relation` "copy"), lies mostly inside it ("inside", failing
    no more than the rest of it) or holds most of it ("broader", its other samples failing no more than the data
    outside both). `inside` is the share of the candidate's samples in the shown slice; a broader one also has
    `holds` (the share of the shown slice in it) and the size and error rate of its other samples (`rest_size`,
    `rest_error_rate`) and of the samples outside both (`outside_error_rate`)."""
    size = int(candidate.sum())
    candidate_errors = int(errors[candidate].sum())
    for row in shown:
        better = masks[row]
        inside = int((candidate & better).sum())
        if inside / int((candidate | better).sum()) > max_overlap:
            return row, {"relation": "copy", "inside": inside / size}  # whatever its error rate
        if not merge_refinements:
            continue
        if inside / size >= MIN_CONTAINMENT:
            rest = better & ~candidate
            if not _worse_than(candidate_errors, size, int(errors[rest].sum()), int(rest.sum()), tests=tests):
                return row, {"relation": "inside", "inside": inside / size}
        elif inside / int(better.sum()) >= MIN_CONTAINMENT:
            rest, outside = candidate & ~better, ~(candidate | better)
            rest_errors, outside_errors = int(errors[rest].sum()), int(errors[outside].sum())
            rest_size, outside_size = int(rest.sum()), int(outside.sum())
            if not _worse_than(rest_errors, rest_size, outside_errors, outside_size, tests=tests):
                return row, {"relation": "broader", "inside": inside / size, "holds": inside / int(better.sum()),
                             "rest_size": rest_size, "rest_error_rate": rest_errors / max(rest_size, 1),
                             "outside_error_rate": outside_errors / max(outside_size, 1)}
    return None, {}


def _finish(rows: list, table: pd.DataFrame, *, alpha: float, max_slices: int, max_overlap: float,
            merge_refinements: bool) -> pd.DataFrame:
    """Rank candidate `rows` (of any sources, members as row numbers in `table`) by score, merge those a better one
    shows already (see `_covering_slice`: a near-copy, a narrower or a broader version of it), and keep the best
    `max_slices` of each source."""
    errors = ~table["correct"].to_numpy(dtype=bool)
    n, overall = len(errors), errors.mean()
    if not rows or overall <= 0:  # an error-free model has no slice where it fails more than elsewhere
        return _empty()
    size = np.array([r["size"] for r in rows], dtype=np.float64)
    errs = np.array([r["errors"] for r in rows], dtype=np.float64)
    rate = errs / size
    score = slice_score(rate, size, overall_error=overall, n=n, alpha=alpha)
    source_rank = np.array([SOURCES.index(r["source"]) for r in rows])
    order = np.lexsort((np.arange(len(rows)), source_rank, -size, -np.nan_to_num(score, nan=-np.inf)))
    masks = np.zeros((len(rows), n), dtype=bool)
    for i, r in enumerate(rows):
        masks[i, r["members"]] = True
    kept, merged, per_source = [], {}, dict.fromkeys(SOURCES, 0)
    for i in order:
        into, how = _covering_slice(masks[i], kept, masks, errors, max_overlap=max_overlap,
                                    merge_refinements=merge_refinements, tests=len(rows))
        if into is not None:
            merged[into].append({"description": rows[i]["description"], "source": rows[i]["source"],
                                 "size": int(size[i]), "error_rate": float(rate[i]), **how})
        elif per_source[rows[i]["source"]] < max_slices:
            per_source[rows[i]["source"]] += 1
            kept.append(i)
            merged[i] = []
    ids = table["id"].to_numpy()
    out = pd.DataFrame({
        "source": [rows[i]["source"] for i in kept],
        "description": [rows[i]["description"] for i in kept],
        "size": size[kept].astype(np.int64),
        "errors": errs[kept].astype(np.int64),
        "error_rate": rate[kept],
        "lift": rate[kept] / overall,
        "score": score[kept],
        "ids": [np.sort(ids[rows[i]["members"]]).tolist() for i in kept],
        "conditions": [rows[i].get("conditions", "[]") for i in kept],
        "merged": [json.dumps(merged[i]) for i in kept],
    })
    base = ("source", "description", "conditions", "members", "size", "errors")
    for key in dict.fromkeys(k for r in rows for k in r if k not in base):  # e.g. a cluster's k-means index
        out[key] = [rows[i].get(key, np.nan) for i in kept]
    return out


def merged_slices(merged) -> list:
    """The slices merged into one (a cell of slices.parquet's `merged` column): dicts with their description,
    source, size, error_rate, `inside` (the share of their samples in the slice that absorbed them) and `relation` to
    it: "copy" (a near-copy), "inside" (mostly inside it) or "broader" (holding most of it, with `holds`, the share
    of it inside the merged one, and `rest_size`, `rest_error_rate` and `outside_error_rate`: the merged one without
    the slice's samples, and the data outside both). Runs stored before broader slices were merged have no
    `relation` (their entries are copies or inside); those stored before any merging have no `merged` column: pass
    None or NaN for an empty list."""
    if merged is None or (isinstance(merged, float) and np.isnan(merged)):
        return []
    return json.loads(merged) if isinstance(merged, str) else list(merged)


# ------------------------------------------------------------------------------------------------- embedding slices

def embedding_slices(samples: pd.DataFrame, embeddings, *, class_names=None, layer: str | None = None,
                     n_clusters: int | None = None, n_components: int = N_COMPONENTS, min_size: int | None = None,
                     alpha: float = 0.95, max_slices: int = 20, seed: int = 0) -> pd.DataFrame:
    """Clusters of activations (k-means on a PCA projection) with their error rates, best score first.

    `embeddings` is (N, D), rows aligned with `samples`. Default `n_clusters`: N // (3 * min_size), between 2 and 30.
    Each cluster is described by its commonest label and prediction; its `cluster` column is the k-means index.
    """
    _check_samples(samples)
    # k-means clusters are disjoint: none is a near-copy of another, nor lies inside one
    _check_ranking(alpha=alpha, max_slices=max_slices, max_overlap=1.0, merge_refinements=False)
    order, table = _by_id(samples)
    rows = _embedding_candidates(table, embeddings, order, class_names=class_names, layer=layer,
                                 n_clusters=n_clusters, n_components=n_components, min_size=min_size, seed=seed)
    return _finish(rows, table, alpha=alpha, max_slices=max_slices, max_overlap=1.0, merge_refinements=False)


def _embedding_candidates(table: pd.DataFrame, embeddings, order: np.ndarray, *, class_names, layer, n_clusters,
                          n_components: int, min_size, seed: int) -> list:
    """The clusters worth a slice: `table` is the samples sorted by id, `order` the sorting of `embeddings`' rows."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    emb = np.asarray(embeddings)
    n = len(table)
    if emb.ndim != 2 or len(emb) != n:
        raise AnalyzerError(f"embeddings must be (samples, dims) with one row per sample ({n}), got {emb.shape}")
    if not np.isfinite(emb).all():
        raise AnalyzerError("embeddings hold NaN or inf: recompute them, or choose another layer")
    _check_int("n_components", n_components, 1)
    min_size = default_min_size(n) if min_size is None else min_size
    _check_int("min_size", min_size, 1)
    if n_clusters is None:
        n_clusters = int(np.clip(n // (3 * min_size), 2, 30))
    _check_int("n_clusters", n_clusters, 2)
    if n < n_clusters:
        return []
    names = _class_names(table, class_names) if table["label"].dtype.kind in "iu" else []
    k = min(n_components, emb.shape[1], n)

    def rows_of(positions):  # the embeddings of these positions of the id-sorted table, as float64
        return np.asarray(emb[order[positions]], dtype=np.float64)

    # Fit on a fixed random subset (drawn after sorting by id) and assign every sample in chunks: linear in N, and
    # no N x D float64 copy (a million 64-wide embeddings would take 512 MB). One BLAS thread: on a shared machine,
    # threads spinning for cores cost PCA and k-means ten times more than they save.
    fit_rows = np.sort(np.random.default_rng(seed).permutation(n)[:MAX_FIT_ROWS])
    chunks = [np.arange(a, min(a + ASSIGN_CHUNK_ROWS, n)) for a in range(0, n, ASSIGN_CHUNK_ROWS)]
    with threadpool_limits(1):
        if k < emb.shape[1]:
            pca = PCA(n_components=k, random_state=seed).fit(rows_of(fit_rows))
            reduce = pca.transform
        else:
            mean = sum(rows_of(c).sum(0) for c in chunks) / n
            reduce = (lambda block: block - mean)
        kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(reduce(rows_of(fit_rows)))
        assign = np.concatenate([kmeans.predict(reduce(rows_of(c))) for c in chunks])
    errors = ~table["correct"].to_numpy(dtype=bool)
    overall = errors.mean()
    size = np.bincount(assign, minlength=n_clusters)
    err = np.bincount(assign, weights=errors, minlength=n_clusters)
    # real-valued labels (a regression's targets) are described by their mean; class indices and label sets (text)
    # by the commonest one
    valued = table["label"].dtype.kind == "f"
    if valued:
        target_mean = np.bincount(assign, weights=table["label"].to_numpy(np.float64), minlength=n_clusters)
        pred_mean = np.bincount(assign, weights=table["pred"].to_numpy(np.float64), minlength=n_clusters)
    else:
        if names:
            labels = table["label"].to_numpy().astype(np.int64)
            preds = table["pred"].to_numpy().astype(np.int64)
        else:  # label sets: each distinct text is a value
            codes, names = pd.factorize(pd.concat([table["label"], table["pred"]]).astype(str))
            names = [str(v) for v in names]
            labels, preds = codes[:n], codes[n:]
        nk = len(names)
        label_counts = np.bincount(assign * nk + labels, minlength=n_clusters * nk).reshape(n_clusters, nk)
        pred_counts = np.bincount(assign * nk + preds, minlength=n_clusters * nk).reshape(n_clusters, nk)
    by_cluster = np.argsort(assign, kind="stable")
    cuts = np.searchsorted(assign[by_cluster], np.arange(n_clusters + 1))
    rows = []
    for c in range(n_clusters):
        if size[c] < min_size or (overall > 0 and err[c] / size[c] <= overall):
            continue
        # in the user's terms, not the clustering's: what the samples are, and where they sit
        space = f"{layer}'s activations" if layer else "the model's activations"
        if valued:
            description = (f"{size[c]} samples close together in {space}: target {target_mean[c] / size[c]:.4g} "
                           f"on average, predicted {pred_mean[c] / size[c]:.4g}")
        else:
            top_label, top_pred = label_counts[c].argmax(), pred_counts[c].argmax()
            description = (f"{size[c]} samples close together in {space}: "
                           f"{label_counts[c, top_label] / size[c]:.0%} labelled {_quote(names[top_label])}, "
                           f"{pred_counts[c, top_pred] / size[c]:.0%} predicted {_quote(names[top_pred])}")
        rows.append({"source": "embeddings", "description": description,
                     "conditions": json.dumps([{"cluster": c, "layer": layer}]),
                     "members": by_cluster[cuts[c]:cuts[c + 1]], "size": int(size[c]), "errors": int(err[c]),
                     "cluster": c})
    return rows


# ----------------------------------------------------------------------------------------------------- all together

def find_slices(samples: pd.DataFrame, *, embeddings=None, probs=None, class_names=None, layer: str | None = None,
                columns=None, min_size: int | None = None, max_depth: int = 3, n_clusters: int | None = None,
                alpha: float = 0.95, max_slices: int = 20, merge_refinements: bool = True,
                seed: int = 0) -> pd.DataFrame:
    """Feature slices and (when `embeddings` are given) embedding slices, ranked together by score, at most
    `max_slices` of each source.

    Merged into a better-ranked slice of either source, and listed in its `merged` column (read it with
    `merged_slices`): near-copies of it and, with `merge_refinements`, slices lying inside it without failing
    significantly more than the rest of it (a rule narrowed by one more condition, a cluster that a rule explains), and
    slices holding most of it whose other samples fail no more than the data outside both (the rule without the
    condition that narrowed it).
    With `probs` (rows aligned with `samples`), adds each slice's calibration: `ece` inside it and `ece_rest` outside.
    """
    from .metrics import subset_calibration

    _check_samples(samples)
    _check_ranking(alpha=alpha, max_slices=max_slices, max_overlap=MAX_OVERLAP, merge_refinements=merge_refinements)
    order, table = _by_id(samples)
    rows = _feature_candidates(table, class_names=class_names, columns=columns, min_size=min_size,
                               max_depth=max_depth, seed=seed)
    if embeddings is not None:
        rows += _embedding_candidates(table, embeddings, order, class_names=class_names, layer=layer,
                                      n_clusters=n_clusters, n_components=N_COMPONENTS, min_size=min_size, seed=seed)
    # one ranking and one merge over both sources: a cluster inside a better rule is merged into it, and back
    slices = _finish(rows, table, alpha=alpha, max_slices=max_slices, max_overlap=MAX_OVERLAP,
                     merge_refinements=merge_refinements)
    if "cluster" in slices.columns:
        slices["cluster"] = slices["cluster"].fillna(-1).astype(np.int64)
    if probs is not None:
        masks = np.zeros((len(slices), len(samples)), dtype=bool)
        for row, members in enumerate(slices["ids"]):
            masks[row] = slice_mask(samples, members)
        slices["ece"], slices["ece_rest"] = subset_calibration(samples["label"].to_numpy(), probs, masks)
    return slices


def slice_mask(samples: pd.DataFrame, ids) -> np.ndarray:
    """Boolean mask over `samples` rows for the given member ids (e.g. a row of slices.parquet)."""
    values = samples["id"].to_numpy()
    members = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids))  # a stored slice's ids are an array
    if values.dtype.kind in "iu" and members.dtype.kind in "iu" and len(values) and len(members):
        from ..loading.sample_table import are_positions, positions_of

        if are_positions(values):
            # ids 0..N-1 in order (the default) are their rows: 5 ms at 10M rows against 0.14 s for isin
            mask = np.zeros(len(values), dtype=bool)
            mask[positions_of(values, members, increasing=True)] = True
            return mask
        # integer ids over a range not much wider than the rows: a lookup table, 0.07 s at 10M rows against 0.3 s
        span = int(max(values.max(), members.max())) - int(min(values.min(), members.min()))  # no wrap-around
        if span <= 4 * (len(values) + len(members)):
            return np.isin(values, members, kind="table")
    return np.isin(values, members)


def slice_error_summary(samples: pd.DataFrame, slices: pd.DataFrame, column: str, *,
                        quantile_column: str | None = None, quantiles=(0.1, 0.5, 0.9), z_column: str | None = None,
                        coverage_level: float = 0.9) -> pd.DataFrame:
    """For each slice (rows of slices.parquet), a real-valued error measure (`column`: a regression's abs_error, a
    multi-label run's hamming_error) inside it and elsewhere: the means, and the one-sided Mann-Whitney U p-value
    that it is larger inside (scipy; the slices were found by the share of the largest errors, this tests the
    measure itself). With `quantile_column` (a regression's signed residual), its `quantiles` inside each slice,
    as columns q10, q50, q90: where the slice's predictions sit against the targets. With `z_column` (a
    mean-and-variance regression's residual in units of its predicted spread), the share of the slice's targets
    inside the central `coverage_level` interval, as column `coverage`: where the predicted spread is too narrow."""
    from scipy.stats import mannwhitneyu, norm

    if column not in samples.columns:
        raise AnalyzerError(f"no column {column!r} in the samples table: choose one of "
                            f"{', '.join(map(str, samples.columns))}")
    values = samples[column].to_numpy(np.float64)
    spread = None if quantile_column is None else samples[quantile_column].to_numpy(np.float64)
    covered = None if z_column is None else np.abs(samples[z_column].to_numpy(np.float64)) <= norm.ppf(
        (1 + coverage_level) / 2)
    rows = []
    for ids in slices["ids"]:
        inside = slice_mask(samples, ids)
        row = {"mean_inside": float(values[inside].mean()) if inside.any() else float("nan"),
               "mean_elsewhere": float(values[~inside].mean()) if (~inside).any() else float("nan"),
               "p_value": float(mannwhitneyu(values[inside], values[~inside], alternative="greater").pvalue)
               if inside.any() and (~inside).any() else float("nan")}
        if spread is not None:
            for q in quantiles:
                row[f"q{round(100 * q)}"] = float(np.quantile(spread[inside], q)) if inside.any() else float("nan")
        if covered is not None:
            row["coverage"] = float(covered[inside].mean()) if inside.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, index=slices.index)
