"""Classification metrics, calibration, the confusion matrix with its cells' samples, error rankings, group metrics.

Every function takes arrays (labels `(N,)` int, probabilities `(N, K)`) or the samples table, so the dashboard can call
it on any selected subset. Values are scikit-learn's where scikit-learn defines them (tests check they are equal).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, first_line

STRATEGIES = ("uniform", "quantile")
RANKINGS = {
    # name -> (what it is, column sorted by, ascending, which samples)
    "confident_wrong": ("wrong predictions, most confident first", "confidence", False, "wrong"),
    "unsure_right": ("right predictions, least confident first", "confidence", True, "right"),
    "loss": ("highest loss first", "loss", False, "all"),
    "margin": ("smallest margin between the top two classes first", "margin", True, "all"),
    # a regression's (tasks.Regression.rankings): by its error and by the sign of its residual
    "abs_error": ("largest absolute error first", "abs_error", False, "all"),
    "over_predicted": ("predicted most above the target first", "residual", False, "all"),
    "under_predicted": ("predicted most below the target first", "residual", True, "all"),
    # a multi-label model's (tasks.MultiLabel.rankings): by the share of its labels it gets wrong
    "labels_wrong": ("most labels wrong first", "hamming_error", False, "all"),
}
DEFAULT_BINS = 10
MAX_GROUPS = 100


# ----------------------------------------------------------------------------------------------------------- checks

def check_predictions(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 (N,) in [0, K) and probabilities as float64 (N, K), or an AnalyzerError naming the problem."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise AnalyzerError(f"probabilities must be a 2-D array (samples, classes) with at least 2 classes, "
                            f"got shape {probs.shape}")
    if labels.ndim != 1 or len(labels) != len(probs):
        raise AnalyzerError(f"labels must be one integer per sample ({len(probs)}), got shape {labels.shape}")
    if len(labels) == 0:
        raise AnalyzerError("no samples to evaluate: select at least one sample")
    if labels.dtype.kind not in "iub":
        raise AnalyzerError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    k = probs.shape[1]
    if labels.min() < 0 or labels.max() >= k:
        raise AnalyzerError(f"labels must lie in 0..{k - 1} (one column of probabilities per class), "
                            f"found {int(labels.min())}..{int(labels.max())}")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + 1e-6:
        raise AnalyzerError("probabilities must be finite numbers in [0, 1]: pass softmax outputs, not logits")
    return labels, probs


def _check_names(class_names, k: int) -> list:
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise AnalyzerError(f"{len(names)} class names for {k} classes: give one name per probability column")
    if len(set(names)) != k:
        raise AnalyzerError(f"class names repeat ({names}): give every class its own name")
    return names


def _check_bins(n_bins, strategy) -> None:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise AnalyzerError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy not in STRATEGIES:
        raise AnalyzerError(f"unknown calibration strategy {strategy!r}: choose {' or '.join(STRATEGIES)}")


# ---------------------------------------------------------------------------------------------------------- metrics

def top_k_values(num_classes: int) -> tuple:
    """The k reported for top-k accuracy: 1, 2, 3 and 5 where smaller than the number of classes (k=1 always)."""
    return tuple(k for k in (1, 2, 3, 5) if k == 1 or k < num_classes)


def classification_metrics(labels, probs, *, class_names=None, top_k=None) -> dict:
    """Accuracy, balanced accuracy, log loss, macro one-vs-rest ROC AUC, top-k accuracy and the per-class report.

    `classification_report` is scikit-learn's `classification_report(output_dict=True)` (keys: class names,
    "accuracy", "macro avg", "weighted avg"). `roc_auc_ovr` is None when some class has no sample (AUC undefined).
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, log_loss,
                                 roc_auc_score, top_k_accuracy_score)

    labels, probs = check_predictions(labels, probs)
    k = probs.shape[1]
    names = _check_names(class_names, k)
    ks = top_k_values(k) if top_k is None else tuple(top_k)
    if any(not isinstance(v, (int, np.integer)) or v < 1 or v > k for v in ks):
        raise AnalyzerError(f"top_k must be integers in 1..{k}, got {ks}")
    pred = probs.argmax(axis=1)
    classes = np.arange(k)
    present = np.bincount(labels, minlength=k) > 0
    roc_auc = None
    if present.all():
        roc_auc = float(roc_auc_score(labels, probs[:, 1]) if k == 2 else
                        roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes))
    import warnings

    with warnings.catch_warnings():  # balanced accuracy warns when a selection lacks some predicted class
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(labels, pred))
    top = {}
    for kk in ks:
        if kk == 1:
            top[1] = float(accuracy_score(labels, pred))
        elif kk >= k:
            top[int(kk)] = 1.0
        else:
            top[int(kk)] = float(top_k_accuracy_score(labels, probs, k=int(kk), labels=classes))
    report = classification_report(labels, pred, labels=classes, target_names=names, output_dict=True,
                                   zero_division=0)
    return {
        "num_samples": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": balanced,
        # float32 softmax outputs sum to 1 only within ~1e-7, which scikit-learn warns about: renormalise first.
        "log_loss": float(log_loss(labels, probs / probs.sum(axis=1, keepdims=True), labels=classes)),
        "roc_auc_ovr": roc_auc,
        "top_k_accuracy": top,
        "classification_report": report,
    }


# ------------------------------------------------------------------------------------------------------ calibration

@dataclass(frozen=True)
class CalibrationBins:
    """A reliability diagram: for each bin the mean predicted probability and the observed frequency.

    Bins follow `sklearn.calibration.calibration_curve` (a value on an inner edge falls in the lower bin); empty bins
    keep count 0 and NaN means. `ece` is the count-weighted mean of |observed - predicted| over the bins.
    """

    strategy: str
    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) int
    mean_predicted: np.ndarray  # (n_bins,) NaN where empty
    observed: np.ndarray  # (n_bins,) fraction of positives (for top-label bins: accuracy), NaN where empty

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        filled = self.count > 0
        gaps = np.abs(self.observed[filled] - self.mean_predicted[filled])
        return float((self.count[filled] * gaps).sum() / total)

    def without(self, part: "CalibrationBins") -> "CalibrationBins":
        """The bins of this one's rows less `part`'s, whose rows must be among them (the same edges): counts and sums
        subtract, so the bins outside a slice cost the slice's rows, not the run's (0.3 s a click at 10M rows)."""
        if self.strategy != "uniform" or part.strategy != "uniform" or not np.array_equal(self.edges, part.edges):
            raise AnalyzerError("only bins with the same uniform edges subtract: the quantile edges depend on the rows")
        count = self.count - part.count
        if (count < 0).any():
            raise AnalyzerError("the part has more samples in a bin than the whole: its rows are not among the whole's")

        def sums(bins, means):
            return np.where(bins.count > 0, means * bins.count, 0.0)

        # sums rebuilt from means differ from the rows' own in the last bits: a mean stays in [0, 1] all the same
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_predicted = np.where(count > 0, np.clip((sums(self, self.mean_predicted)
                                                          - sums(part, part.mean_predicted)) / count, 0.0, 1.0), np.nan)
            observed = np.where(count > 0, np.clip((sums(self, self.observed) - sums(part, part.observed)) / count,
                                                   0.0, 1.0), np.nan)
        return CalibrationBins(strategy=self.strategy, edges=self.edges, count=count, mean_predicted=mean_predicted,
                               observed=observed)

    @classmethod
    def from_dict(cls, stored) -> "CalibrationBins":
        """The bins `to_dict` wrote (a run's metrics.json), checked: one line naming what is wrong with them
        (AnalyzerError), never bins that would draw or subtract wrongly."""
        def bad(what):
            return AnalyzerError(f"stored calibration bins {what}")

        if not isinstance(stored, dict) or stored.get("strategy") not in STRATEGIES:
            raise bad("have no known strategy")
        try:
            edges = np.asarray(stored["edges"], dtype=np.float64)
            raw = np.asarray(stored["count"])
            # whole numbers only (a text, a fraction, a number past int64 are refused, never truncated or wrapped)
            if raw.ndim != 1 or raw.dtype.kind not in "iu" or (raw.dtype.kind == "u" and len(raw) and
                                                                raw.max() > np.iinfo(np.int64).max):
                raise bad("have counts that are not a list of whole numbers")
            count = raw.astype(np.int64)
            means = [np.asarray([np.nan if v is None else v for v in stored[k]], dtype=np.float64)
                     for k in ("mean_predicted", "observed")]
        except AnalyzerError:
            raise
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # ArithmeticError: 1e400 as an integer
            raise bad(f"are not lists of numbers ({first_line(exc)})") from exc
        n = len(count)
        if n < 1 or edges.shape != (n + 1,) or any(m.shape != (n,) for m in means):
            raise bad("do not have one count and two means per bin and one edge more")
        if (count < 0).any():
            raise bad("have counts that are not whole numbers of 0 or more")
        if not np.isfinite(edges).all() or edges[0] < 0 or edges[-1] > 1 + 1e-6 or (np.diff(edges) < 0).any():
            raise bad("have edges outside [0, 1] or out of order")
        for m in means:
            if (np.isnan(m) != (count == 0)).any() or (m[count > 0] < 0).any() or (m[count > 0] > 1 + 1e-6).any():
                raise bad("have means outside [0, 1], or a mean for an empty bin")
        return cls(strategy=stored["strategy"], edges=edges, count=count, mean_predicted=means[0], observed=means[1])

    def to_dict(self) -> dict:
        def _list(a):
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {"strategy": self.strategy, "edges": _list(self.edges), "count": [int(c) for c in self.count],
                "mean_predicted": _list(self.mean_predicted), "observed": _list(self.observed), "ece": self.ece}


def calibration_bins(y_true, y_prob, *, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> CalibrationBins:
    """Reliability bins of predicted probabilities `y_prob` against binary outcomes `y_true` (both (N,))."""
    _check_bins(n_bins, strategy)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.float64)
    if y_prob.ndim != 1 or y_true.shape != y_prob.shape:
        raise AnalyzerError(f"y_true and y_prob must be 1-D and of one length, got {y_true.shape} and {y_prob.shape}")
    if len(y_prob) and (y_prob.min() < 0 or y_prob.max() > 1 + 1e-6):
        raise AnalyzerError("y_prob must be probabilities in [0, 1]")
    if strategy == "uniform" or len(y_prob) == 0:
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.percentile(y_prob, np.linspace(0, 1, n_bins + 1) * 100)
    which = np.searchsorted(edges[1:-1], y_prob)
    count = np.bincount(which, minlength=n_bins)
    sum_prob = np.bincount(which, weights=y_prob, minlength=n_bins)
    sum_true = np.bincount(which, weights=y_true, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(count > 0, sum_prob / count, np.nan)
        observed = np.where(count > 0, sum_true / count, np.nan)
    return CalibrationBins(strategy=strategy, edges=edges, count=count, mean_predicted=mean_predicted,
                           observed=observed)


def top_label_bins(labels, probs, *, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> CalibrationBins:
    """Reliability bins of the confidence (top probability) against whether the top class is the label."""
    labels, probs = check_predictions(labels, probs)
    return calibration_bins(probs.argmax(1) == labels, probs.max(1), n_bins=n_bins, strategy=strategy)


def expected_calibration_error(labels, probs, *, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> float:
    """Top-label ECE: sum over confidence bins of (bin share) * |accuracy - mean confidence|."""
    return top_label_bins(labels, probs, n_bins=n_bins, strategy=strategy).ece


def class_bins(labels, probs, *, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> list:
    """One-vs-rest reliability bins for each class: probability of class k against label == k."""
    labels, probs = check_predictions(labels, probs)
    return [calibration_bins(labels == k, probs[:, k], n_bins=n_bins, strategy=strategy)
            for k in range(probs.shape[1])]


def calibration_report(labels, probs, *, class_names=None, n_bins: int = DEFAULT_BINS) -> dict:
    """Top-label and per-class reliability bins for both strategies, as JSON-ready dicts."""
    labels, probs = check_predictions(labels, probs)
    names = _check_names(class_names, probs.shape[1])
    out = {}
    for strategy in STRATEGIES:
        per_class = class_bins(labels, probs, n_bins=n_bins, strategy=strategy)
        out[strategy] = {"top_label": top_label_bins(labels, probs, n_bins=n_bins, strategy=strategy).to_dict(),
                         "per_class": {name: b.to_dict() for name, b in zip(names, per_class)}}
    return out


def subset_calibration(labels, probs, member, *, n_bins: int = DEFAULT_BINS, strategy: str = "uniform") -> tuple:
    """(ECE inside the subset, ECE outside it) for a boolean `member` mask (N,); NaN for an empty side.

    With masks of shape (S, N), one per subset, returns two arrays of S values (checks the inputs once).
    """
    labels, probs = check_predictions(labels, probs)
    member = np.asarray(member, dtype=bool)
    if member.shape[-1:] != labels.shape or member.ndim > 2:
        raise AnalyzerError(f"the member mask must have one entry per sample ({len(labels)}), got {member.shape}")
    correct = probs.argmax(1) == labels
    confidence = probs.max(1)
    pairs = [(calibration_bins(correct[m], confidence[m], n_bins=n_bins, strategy=strategy).ece,
              calibration_bins(correct[~m], confidence[~m], n_bins=n_bins, strategy=strategy).ece)
             for m in np.atleast_2d(member)]
    if member.ndim == 1:
        return pairs[0]
    inside, outside = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
    return inside, outside


# -------------------------------------------------------------------------------------------------------- confusion

# Ids listed per cell in confusion.json: every id of a 10M-row run made a 162 MB file that took 2.6 s to parse each
# time the run was opened; samples.parquet holds every cell's samples (label == true and pred == pred)
CELL_IDS_LISTED = 10_000


@dataclass(frozen=True, eq=False)
class Confusion:
    """Confusion matrix (rows: true class, columns: predicted) and the ids of the samples in every cell.

    The cells' ids (`cell_ids`) are grouped when first asked for: the counts alone take a pass over the samples,
    the grouping a sort of them (0.9 s at 10M rows, which the Confusion page's matrix, its rarest class and its
    most confused pairs do not need; a click on a cell does)."""

    counts: np.ndarray  # (K, K) int64
    class_names: tuple
    codes: np.ndarray | None = field(repr=False)  # (N,) each sample's cell, true * K + pred (uint16 where K * K
    # fits); None once the cells are grouped
    sample_ids: np.ndarray | None = field(repr=False)  # (N,) each sample's id; None once the cells are grouped

    def __post_init__(self):
        # its own lock: a matrix shared by a dashboard's sessions is grouped once, and grouping one run's matrix
        # keeps no other run's waiting (functools.cached_property in Python 3.11 locks every instance at once)
        object.__setattr__(self, "_cells", None)
        object.__setattr__(self, "_grouping", threading.Lock())

    @property
    def cell_ids(self) -> dict:
        """(true, pred) -> the ids of the samples in that cell, in ascending order of position; non-empty cells."""
        if self._cells is None:
            with self._grouping:
                if self._cells is None:
                    object.__setattr__(self, "_cells", self._grouped())
                    object.__setattr__(self, "codes", None)  # not kept beside the cells
                    object.__setattr__(self, "sample_ids", None)
        return self._cells

    def _grouped(self) -> dict:
        k, code, ids = len(self.counts), self.codes, self.sample_ids
        # Sort by (cell, id) once and cut at cell boundaries: no per-sample Python loop. Ids that increase already
        # (positions, the default) need only a stable sort by cell, a radix sort on 16-bit cells: 0.1 s at 10M rows,
        # against 0.75 s for the lexsort.
        increasing = ids.dtype.kind in "iu" and len(ids) > 1 and bool((ids[1:] > ids[:-1]).all())
        if increasing and code.dtype == np.uint16:
            order = np.argsort(code, kind="stable")
        else:
            order = np.lexsort((ids, code))
        sorted_code = code[order]
        starts = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1]]) if len(code) else \
            np.array([], int)
        cells = {}
        for start, chunk in zip(starts, np.split(ids[order], starts[1:])):
            c = int(sorted_code[start])
            cells[(c // k, c % k)] = chunk
        return cells

    def normalized(self, over: str) -> np.ndarray:
        """Counts divided by row sums ("true"), column sums ("pred") or the total ("all"), as scikit-learn does."""
        c = self.counts.astype(np.float64)
        if over == "true":
            d = c.sum(axis=1, keepdims=True)
        elif over == "pred":
            d = c.sum(axis=0, keepdims=True)
        elif over == "all":
            d = c.sum()
        else:
            raise AnalyzerError(f"normalise over 'true', 'pred' or 'all', got {over!r}")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(c / d)

    def ids(self, true: int, pred: int) -> np.ndarray:
        return self.cell_ids.get((int(true), int(pred)), np.array([], dtype=object))

    def most_confused(self, top: int = 10) -> pd.DataFrame:
        """Off-diagonal cells by count: true class, predicted class, count and share of the true class."""
        if not isinstance(top, (int, np.integer)) or top < 1:
            raise AnalyzerError(f"top must be a positive integer, got {top!r}")
        k = len(self.counts)
        t, p = np.nonzero(self.counts * (1 - np.eye(k, dtype=np.int64)))
        counts = self.counts[t, p]
        row = self.counts.sum(axis=1)[t]
        order = np.lexsort((p, t, -counts))[:top]
        names = np.asarray(self.class_names, dtype=object)
        return pd.DataFrame({"true": t[order], "pred": p[order], "true_name": names[t[order]],
                             "pred_name": names[p[order]], "count": counts[order],
                             "share_of_true": counts[order] / row[order]})

    def most_confused_pairs(self, top: int = 10) -> pd.DataFrame:
        """Unordered class pairs by mistakes either way (a taken for b plus b taken for a)."""
        sym = self.counts + self.counts.T
        a, b = np.triu_indices(len(sym), k=1)
        counts = sym[a, b]
        keep = counts > 0
        a, b, counts = a[keep], b[keep], counts[keep]
        order = np.lexsort((b, a, -counts))[:top]
        names = np.asarray(self.class_names, dtype=object)
        return pd.DataFrame({"a": a[order], "b": b[order], "a_name": names[a[order]], "b_name": names[b[order]],
                             "count": counts[order], "a_as_b": self.counts[a[order], b[order]],
                             "b_as_a": self.counts[b[order], a[order]]})

    def to_dict(self, *, top: int = 10, ids_per_cell: int = CELL_IDS_LISTED) -> dict:
        """What confusion.json holds: each cell lists its first `ids_per_cell` ids (ascending) beside its count."""
        cells = [{"true": t, "pred": p, "count": len(ids), "ids": ids[:ids_per_cell].tolist()}
                 for (t, p), ids in sorted(self.cell_ids.items())]
        return {"class_names": list(self.class_names), "counts": self.counts.tolist(), "ids_per_cell": ids_per_cell,
                "normalized": {over: self.normalized(over).tolist() for over in ("true", "pred", "all")},
                "cells": cells, "most_confused": self.most_confused(top).to_dict(orient="records"),
                "most_confused_pairs": self.most_confused_pairs(top).to_dict(orient="records")}


def confusion(labels, pred, *, num_classes: int, ids=None, class_names=None) -> Confusion:
    """Confusion counts and per-cell ids (default ids: positions 0..N-1). Cells list their ids in ascending order."""
    labels = np.asarray(labels)
    pred = np.asarray(pred)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise AnalyzerError(f"num_classes must be a positive integer, got {num_classes!r}")
    if labels.shape != pred.shape or labels.ndim != 1:
        raise AnalyzerError(f"labels and predictions must be 1-D and of one length, got {labels.shape} and {pred.shape}")
    for name, a in (("labels", labels), ("predictions", pred)):
        if len(a) and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= num_classes):
            raise AnalyzerError(f"{name} must be class indices in 0..{num_classes - 1}")
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    if ids.shape != labels.shape:
        raise AnalyzerError(f"ids must have one entry per sample ({len(labels)}), got {ids.shape}")
    names = tuple(_check_names(class_names, num_classes))
    code = labels.astype(np.int64) * num_classes + pred.astype(np.int64)
    counts = np.bincount(code, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    if num_classes * num_classes <= np.iinfo(np.uint16).max:  # kept until the cells are asked for: 20 MB at 10M rows
        code = code.astype(np.uint16)
    return Confusion(counts=counts, class_names=names, codes=code, sample_ids=ids)


# --------------------------------------------------------------------------------------------------- error rankings

def margins(probs) -> np.ndarray:
    """Top probability minus the second: small means the model hesitated between two classes."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise AnalyzerError(f"probabilities must be (samples, classes) with at least 2 classes, got {probs.shape}")
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def rank_errors(samples, probs=None, *, by: str, limit: int | None = None) -> pd.DataFrame:
    """A sorted view of the samples table (`RANKINGS` names the orders); ties are broken by id.

    `samples` is a DataFrame or a run's `SampleTable` (read column by column). With a `limit`, only the rows that
    can reach it are read and sorted: those at least as far up as the limit-th value, which holds every row of the
    top `limit` by (value, id). A 10M-row ranking reads four columns and a page of rows.

    "margin" needs `probs` (rows aligned with `samples`) and adds a `margin` column.
    """
    if by not in RANKINGS:
        raise AnalyzerError(f"unknown ranking {by!r}: choose from {', '.join(RANKINGS)}")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise AnalyzerError(f"limit must be a positive integer or None, got {limit!r}")
    missing = [c for c in ("id", "correct", "confidence", "loss") if c not in samples.columns]
    if missing:
        raise AnalyzerError(f"the samples table lacks {', '.join(missing)}: pass a run's samples.parquet")
    _, column, ascending, which = RANKINGS[by]
    if column not in samples.columns and column != "margin":
        raise AnalyzerError(f"ranking by {by} needs the samples table's {column} column, which a regression run has")
    if by == "margin":
        if probs is None or len(probs) != len(samples):
            raise AnalyzerError("ranking by margin needs probs with one row per sample (run.probs)")
        values = margins(probs)
    else:
        values = samples[column].to_numpy(np.float64)
    eligible = np.ones(len(values), dtype=bool) if which == "all" else \
        samples["correct"].to_numpy(dtype=bool) == (which == "right")
    rows = np.flatnonzero(eligible & _within_reach(values, eligible, ascending, limit))
    table = samples.rows(rows) if hasattr(samples, "rows") else samples.iloc[rows]
    if by == "margin":
        table = table.assign(margin=values[rows])
    table = table.sort_values([column, "id"], ascending=[ascending, True], kind="stable")
    return table.head(limit) if limit else table


def _within_reach(values: np.ndarray, eligible: np.ndarray, ascending: bool, limit: int | None) -> np.ndarray:
    """Rows whose value is at least as far up as the `limit`-th eligible one (sorting puts missing values last,
    so they can reach the limit only when fewer than `limit` values are known): every row, without a limit."""
    known = eligible & ~np.isnan(values)
    if limit is None or known.sum() <= limit:
        return np.ones(len(values), dtype=bool)
    ranked = values[known] if ascending else -values[known]
    cut = np.partition(ranked, limit - 1)[limit - 1]
    return known & ((values <= cut) if ascending else (-values <= cut))


# ---------------------------------------------------------------------------------------------------- group metrics

def group_values(values, *, bins: int = 5) -> pd.Series:
    """Groups of a metadata column: its values, or for a numeric column with more than `bins` values, quantile bins."""
    if not isinstance(bins, (int, np.integer)) or bins < 2:
        raise AnalyzerError(f"bins must be an integer of at least 2, got {bins!r}")
    series = pd.Series(np.asarray(values))
    if series.dtype.kind in "fiu" and series.nunique() > bins:
        binned = pd.qcut(series, q=bins, duplicates="drop")
        return binned.astype(str).where(series.notna(), "missing")
    return series.astype(str).where(series.notna(), "missing")


def group_metrics(samples: pd.DataFrame, probs, column: str, *, bins: int = 5, n_bins: int = DEFAULT_BINS,
                  positive_class: int = 1) -> pd.DataFrame:
    """Per-group metrics for a metadata column (numeric columns are cut into `bins` quantile groups).

    Columns: group, size, share, accuracy, error_rate, balanced_accuracy (mean recall over the classes present in the
    group), mean_confidence, ece, and for two classes positive_rate, true_positive_rate, false_positive_rate
    (`positive_class` is the positive one). A numeric column's groups are in value order (its bins read left to
    right, "missing" last); other groups by accuracy, worst first.
    """
    if column not in samples.columns:
        raise AnalyzerError(f"no column {column!r} in the samples table: choose one of {', '.join(map(str, samples.columns))}")
    labels, probs = check_predictions(samples["label"].to_numpy(), probs)
    groups = group_values(samples[column].to_numpy(), bins=bins)
    codes, uniques = pd.factorize(groups, sort=True)
    if len(uniques) > MAX_GROUPS:
        raise AnalyzerError(f"column {column!r} has {len(uniques)} distinct values: choose a column with at most "
                            f"{MAX_GROUPS} groups (numeric columns are binned)")
    k = probs.shape[1]
    pred = probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    g = len(uniques)
    size = np.bincount(codes, minlength=g)
    accuracy = np.bincount(codes, weights=correct, minlength=g) / size
    conf = np.bincount(codes, weights=probs.max(1), minlength=g) / size
    # Mean recall over classes present in each group, from (group, class) counts.
    per_gc = np.bincount(codes * k + labels, minlength=g * k).reshape(g, k)
    hit_gc = np.bincount(codes * k + labels, weights=correct, minlength=g * k).reshape(g, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = np.nanmean(np.where(per_gc > 0, hit_gc / per_gc, np.nan), axis=1)
    ece = np.array([calibration_bins(correct[codes == i], probs.max(1)[codes == i], n_bins=n_bins).ece
                    for i in range(g)])
    table = pd.DataFrame({"group": [str(u) for u in uniques], "size": size, "share": size / len(labels),
                          "accuracy": accuracy, "error_rate": 1 - accuracy, "balanced_accuracy": balanced,
                          "mean_confidence": conf, "ece": ece})
    if k == 2:
        if positive_class not in (0, 1):
            raise AnalyzerError(f"positive_class must be 0 or 1, got {positive_class!r}")
        pos_pred = (pred == positive_class).astype(np.float64)
        pos_true = labels == positive_class
        n_pos = np.bincount(codes, weights=pos_true, minlength=g)
        n_neg = size - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            table["positive_rate"] = np.bincount(codes, weights=pos_pred, minlength=g) / size
            table["true_positive_rate"] = np.bincount(codes, weights=pos_pred * pos_true, minlength=g) / n_pos
            table["false_positive_rate"] = np.bincount(codes, weights=pos_pred * ~pos_true, minlength=g) / n_neg
    if samples[column].dtype.kind in "fiu":
        return table.iloc[np.argsort([_group_position(u) for u in table["group"]], kind="stable")].reset_index(drop=True)
    return table.sort_values(["accuracy", "group"], kind="stable").reset_index(drop=True)


def _group_position(group: str) -> float:
    """Where a numeric group sits: its value, or its bin's left edge ("(0.5, 1.2]" -> 0.5); "missing" last."""
    try:
        return float(group.strip("([").split(",")[0])
    except ValueError:
        return np.inf


@dataclass(frozen=True)
class GroupGap:
    metric: str
    best_group: str
    best_value: float
    worst_group: str
    worst_value: float

    @property
    def gap(self) -> float:
        return abs(self.best_value - self.worst_value)


def largest_gap(groups: pd.DataFrame, *, metric: str = "accuracy", min_size: int = 1) -> GroupGap:
    """Best and worst group on `metric` among groups of at least `min_size` samples (higher is better, except for
    error_rate and ece where lower is better)."""
    if metric not in groups.columns or metric in ("group", "size"):
        raise AnalyzerError(f"unknown group metric {metric!r}: choose one of "
                            f"{', '.join(c for c in groups.columns if c not in ('group', 'size'))}")
    table = groups[(groups["size"] >= min_size) & groups[metric].notna()]
    if table.empty:
        raise AnalyzerError(f"no group has at least {min_size} samples and a value for {metric}: lower min_size")
    lower_better = metric in ("error_rate", "ece")
    values = table[metric].to_numpy(dtype=np.float64)
    best, worst = (np.argmin(values), np.argmax(values)) if lower_better else (np.argmax(values), np.argmin(values))
    return GroupGap(metric=metric, best_group=str(table["group"].iloc[best]), best_value=float(values[best]),
                    worst_group=str(table["group"].iloc[worst]), worst_value=float(values[worst]))
