"""A multi-label model's own evaluation: each label as its own yes/no question, and which labels fail together.

- `per_label_report(labels, probs, names=...)`: per label, its 2x2 confusion matrix (scikit-learn's
  `multilabel_confusion_matrix`), prevalence, precision, recall and F1 at the run's threshold, ROC AUC and average
  precision, calibration (reliability bins and ECE of that label's probability), and its best-F1 threshold.
- `co_missed(labels, probs, names=...)`: every pair of labels that occur together, with how often both are missed
  (false negatives in the same sample), against what independent misses would give; the pairs missed together most
  often first. A pair the model misses as a pair (an annotation rule that dropped both, a confusion between them)
  stands out from the labels' own miss rates.
- `multilabel_report(...)`: both, as multilabel.json holds them.

Labels are a multi-hot (N, K) 0/1 array; probabilities (N, K), one per label; `threshold` one cut for every label
or one per label ((K,), a run's stored thresholds.json).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AnalyzerError

MULTILABEL = "multilabel.json"


def _check(labels, probs, names):
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise AnalyzerError(f"multi-label evaluation needs labels and probabilities of the same shape (samples, "
                            f"labels), got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise AnalyzerError("no samples to evaluate: select at least one sample")
    if not np.isin(y, (0, 1)).all():
        raise AnalyzerError("multi-label labels must be 0 or 1")
    names = [str(n) for n in names] if names is not None else [str(k) for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise AnalyzerError(f"{len(names)} label names for {y.shape[1]} labels: give one name per label")
    return y.astype(np.int64), p, names


def _cuts(threshold, num_labels: int) -> np.ndarray:
    """(K,) per-label cuts from one threshold or one per label (tasks.MultiLabel checks and keeps them)."""
    from .tasks import MultiLabel

    return MultiLabel(num_labels, threshold=threshold).thresholds


def _missed(y: np.ndarray, p: np.ndarray, threshold) -> np.ndarray:
    """(N, K) 0/1: the label is present and its probability below the label's cut (a false negative)."""
    return ((y == 1) & (p < _cuts(threshold, y.shape[1]))).astype(np.float64)


def per_label_report(labels, probs, *, names=None, threshold: float = 0.5, n_bins: int = 10) -> list:
    """One dict per label (see the module's docstring); `tn`, `fp`, `fn`, `tp` are the 2x2 matrix's cells."""
    from sklearn.metrics import average_precision_score, multilabel_confusion_matrix, roc_auc_score

    from .metrics import calibration_bins
    from .thresholds import _f1, threshold_curve

    y, p, names = _check(labels, probs, names)
    pred = (p >= _cuts(threshold, y.shape[1])).astype(np.int64)
    matrices = multilabel_confusion_matrix(y, pred)  # (K, 2, 2): [[tn, fp], [fn, tp]]
    rows = []
    for k, name in enumerate(names):
        (tn, fp), (fn, tp) = matrices[k]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        both = 0 < y[:, k].sum() < len(y)  # AUC and AP need the label both present and absent
        curve = threshold_curve(y[:, k], np.column_stack([1 - p[:, k], p[:, k]]), positive=1)
        best = curve.best_f1()
        bins = calibration_bins(y[:, k], p[:, k], n_bins=n_bins)
        rows.append({
            "label": name, "support": int(tp + fn), "prevalence": float(y[:, k].mean()),
            "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
            "precision": float(precision), "recall": float(recall), "f1": float(_f1(precision, recall)),
            "roc_auc": float(roc_auc_score(y[:, k], p[:, k])) if both else None,
            "average_precision": float(average_precision_score(y[:, k], p[:, k])) if both else None,
            "ece": float(bins.ece), "calibration": bins.to_dict(),
            "best_f1_threshold": float(best), "best_f1": float(curve.at(best)["f1"]),
        })
    return rows


def co_missed(labels, probs, *, names=None, threshold: float = 0.5) -> pd.DataFrame:
    """Pairs of labels present together in at least one sample: `together` (samples with both), `both_missed`
    (samples where both are false negatives), `rate` (both_missed / together), `expected` (both_missed if the two
    were missed independently, each at its own miss rate over the samples holding it) and `lift`
    (both_missed / expected). Sorted by both_missed, then rate, highest first."""
    y, p, names = _check(labels, probs, names)
    missed = _missed(y, p, threshold)
    present = y.astype(np.float64)
    together = present.T @ present  # (K, K) samples holding both labels
    both_missed = missed.T @ missed
    # each label's own miss rate, where it is present: what the pair would be missed at if misses were independent
    with np.errstate(invalid="ignore", divide="ignore"):
        miss_rate = np.where(present.sum(0) > 0, missed.sum(0) / present.sum(0), 0.0)
    rows = []
    k = y.shape[1]
    for a in range(k):
        for b in range(a + 1, k):
            if together[a, b] == 0:
                continue
            n_ab = together[a, b]
            expected = miss_rate[a] * miss_rate[b] * n_ab
            rows.append({"label_a": names[a], "label_b": names[b], "together": int(n_ab),
                         "both_missed": int(both_missed[a, b]), "rate": float(both_missed[a, b] / n_ab),
                         "expected": float(expected),
                         "lift": float(both_missed[a, b] / expected) if expected > 0 else None})
    table = pd.DataFrame(rows, columns=["label_a", "label_b", "together", "both_missed", "rate", "expected", "lift"])
    return table.sort_values(["both_missed", "rate"], ascending=False, kind="stable").reset_index(drop=True)


def co_missed_matrix(labels, probs, *, threshold: float = 0.5) -> np.ndarray:
    """(K, K): samples in which both labels are missed (the diagonal: each label's misses)."""
    y, p, _ = _check(labels, probs, None)
    missed = _missed(y, p, threshold).astype(np.int64)
    return missed.T @ missed


def multilabel_report(labels, probs, *, names=None, threshold: float = 0.5, n_bins: int = 10) -> dict:
    """What multilabel.json holds: the threshold (one number, or one per label), `labels` (per_label_report),
    `co_missed` (its rows) and `co_missed_matrix`."""
    cuts = np.asarray(threshold, dtype=np.float64)
    pairs = co_missed(labels, probs, names=names, threshold=threshold)
    return {"threshold": cuts.tolist() if cuts.ndim else float(cuts),
            "labels": per_label_report(labels, probs, names=names, threshold=threshold, n_bins=n_bins),
            "co_missed": pairs.astype(object).where(pairs.notna(), None).to_dict("records"),
            "co_missed_matrix": co_missed_matrix(labels, probs, threshold=threshold).tolist()}
