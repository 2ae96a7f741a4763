"""Decision thresholds for one class against the rest: a binary model's positive class, or any class of a
multi-class model (one-vs-rest). Imbalanced classes make argmax (0.5 for two classes) a poor cut: the curve of
every threshold shows what each one costs.

- `threshold_curve(labels, probs, positive=k)`: at every distinct score, the confusion counts of "class k when
  p(k) >= t", with precision, recall, F1, the false-positive rate, and the class's prevalence; ROC AUC and average
  precision are scikit-learn's.
- `ThresholdCurve.at(t)`: the counts and metrics at any threshold (the slider's), and its cost at a user's prices of
  a false positive and a false negative.
- `ThresholdCurve.best_f1()` and `.best_cost(cost_fp, cost_fn)`: the thresholds to mark.
- `slice_metrics_at(...)`: precision, recall and F1 inside each error slice at a chosen threshold.
- `save_threshold` / `save_label_thresholds`: the chosen cut, stored in the run (thresholds.json); `task_at` and
  `samples_at` apply it, so the rankings and their exports use it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import AnalyzerError
from .tasks import check_probability_cut


def _check(labels, probs, positive):
    labels, probs = _checked_shapes(labels, probs, positive)
    # the one column, not every class's (a run's memory-mapped probs: 160 MB copied per call at 10M rows)
    return labels.astype(np.int64) == int(positive), np.asarray(probs[:, int(positive)], dtype=np.float64)


def _checked_shapes(labels, probs, positive):
    """`labels` and `probs` as arrays (a memory map stays mapped), their shapes and `positive` checked."""
    labels = np.asarray(labels)
    probs = probs if isinstance(probs, np.ndarray) else np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or len(labels) != len(probs) or labels.ndim != 1:
        raise AnalyzerError(f"thresholds need labels (N,) and class probabilities (N, K >= 2), got {labels.shape} "
                            f"and {probs.shape}")
    if isinstance(positive, bool) or not isinstance(positive, (int, np.integer)) or \
            not 0 <= positive < probs.shape[1]:
        raise AnalyzerError(f"the positive class must be a class index 0..{probs.shape[1] - 1}, got {positive!r}")
    if len(labels) == 0:
        raise AnalyzerError("no samples: select at least one")
    return labels, probs


def _f1(precision, recall):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)


@dataclass(frozen=True)
class ThresholdCurve:
    """Every distinct threshold of one class's score, highest first: at `thresholds[i]` a sample is predicted
    positive when its score is at least that. The first threshold, +inf, predicts no sample positive; the last, the
    lowest score, predicts every one."""

    positive: int
    thresholds: np.ndarray  # (T,) descending: +inf (nothing positive), then each distinct score
    tp: np.ndarray
    fp: np.ndarray
    positives: int  # samples of the class
    total: int
    roc_auc: float | None
    average_precision: float | None

    @property
    def fn(self) -> np.ndarray:
        return self.positives - self.tp

    @property
    def tn(self) -> np.ndarray:
        return (self.total - self.positives) - self.fp

    @property
    def prevalence(self) -> float:
        return self.positives / self.total

    @property
    def precision(self) -> np.ndarray:
        """tp / (tp + fp); 1 where nothing is predicted positive, as scikit-learn's precision_recall_curve ends."""
        predicted = self.tp + self.fp
        return np.where(predicted > 0, self.tp / np.maximum(predicted, 1), 1.0)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.positives if self.positives else np.zeros(len(self.tp))

    @property
    def fpr(self) -> np.ndarray:
        negatives = self.total - self.positives
        return self.fp / negatives if negatives else np.zeros(len(self.fp))

    @property
    def f1(self) -> np.ndarray:
        return _f1(np.where(self.tp + self.fp > 0, self.precision, 0.0), self.recall)

    def cost(self, cost_fp: float = 1.0, cost_fn: float = 1.0) -> np.ndarray:
        """The total cost at each threshold: cost_fp per false positive plus cost_fn per false negative."""
        _check_costs(cost_fp, cost_fn)
        return cost_fp * self.fp + cost_fn * self.fn

    def _index(self, threshold: float) -> int:
        # the last threshold still >= the given one predicts exactly the samples with score >= threshold; searched
        # in the ascending view of the thresholds (negating them made a copy of up to 10M per call: 12 ms)
        return int(len(self.thresholds) - np.searchsorted(self.thresholds[::-1], float(threshold), side="left") - 1)

    def at(self, threshold: float, *, cost_fp: float = 1.0, cost_fn: float = 1.0) -> dict:
        """Counts and metrics when the class is predicted for scores >= `threshold`."""
        if not np.isfinite(threshold):
            raise AnalyzerError(f"a threshold is a finite number, got {threshold!r}")
        i = max(self._index(threshold), 0)
        tp, fp = int(self.tp[i]), int(self.fp[i])
        fn, tn = self.positives - tp, (self.total - self.positives) - fp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / self.positives if self.positives else 0.0
        return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision,
                "recall": recall, "f1": float(_f1(np.float64(precision), np.float64(recall))),
                "accuracy": (tp + tn) / self.total, "cost": float(cost_fp * fp + cost_fn * fn),
                "prevalence": self.prevalence, "predicted_positive": (tp + fp) / self.total}

    def best_f1(self) -> float:
        """The threshold of the highest F1 (the highest such threshold on ties), a real score of the data."""
        def compute():
            f1 = self.f1[1:]  # +inf predicts nothing: F1 0
            return float(self.thresholds[1:][int(np.argmax(f1))]) if len(f1) else 0.5

        return self._remembered(("best_f1",), compute)

    def best_cost(self, cost_fp: float = 1.0, cost_fn: float = 1.0) -> float:
        """The threshold of the lowest total cost (the highest such threshold on ties)."""
        def compute():
            cost = self.cost(cost_fp, cost_fn)
            i = int(np.argmin(cost))
            return float(self.thresholds[i]) if np.isfinite(self.thresholds[i]) else float(
                np.nextafter(self.thresholds[1], np.inf)) if len(self.thresholds) > 1 else 1.0

        return self._remembered(("best_cost", float(cost_fp), float(cost_fn)), compute)

    def _remembered(self, key: tuple, compute):
        """A value of the curve computed once: a page asks for the best thresholds on every rerun, each a pass over
        up to one threshold per sample (0.3 s at 10M rows). The curve is read-only, so its values never change."""
        memo = self.__dict__.setdefault("_memo", {})  # not a field: a frozen dataclass's equality ignores it
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def thinned(self, max_points: int) -> "ThresholdCurve":
        """The curve through at most `max_points` of its finite thresholds, evenly spread over them, the first and
        the last kept (and +inf): what a chart draws (a million distinct scores draw the same line through 2,000)."""
        finite = len(self.thresholds) - 1
        if finite <= max_points:
            return self
        keep = np.r_[0, 1 + np.unique(np.linspace(0, finite - 1, max_points).round().astype(np.int64))]
        return replace(self, thresholds=self.thresholds[keep], tp=self.tp[keep], fp=self.fp[keep])


def _check_costs(cost_fp, cost_fn) -> None:
    for name, value in (("cost of a false positive", cost_fp), ("cost of a false negative", cost_fn)):
        if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not np.isfinite(value) \
                or value < 0:
            raise AnalyzerError(f"the {name} must be a number of 0 or more, got {value!r}")


def threshold_curve(labels, probs, *, positive: int = 1) -> ThresholdCurve:
    """The curve of class `positive` against the rest (see `ThresholdCurve`). Its ROC AUC and average precision are
    scikit-learn's (`roc_auc_score`, `average_precision_score`), computed from the curve's own counts: one sort,
    which at a million samples is most of the cost."""
    is_positive, score = _check(labels, probs, positive)
    if isinstance(probs, np.ndarray) and probs.dtype == np.float32:
        score = np.asarray(probs[:, int(positive)])  # sorted in its own type, the same distinct values: 0.6 s, not 1 s
    # Each class's scores sorted, not the samples argsorted (2.3 s at 10M rows, against 1.3 s): the samples of a
    # class at or above a threshold are those past its binary search in that class's sorted scores.
    positive_scores, negative_scores = np.sort(score[is_positive]), np.sort(score[~is_positive])
    # the two sorted runs merged (timsort merges runs in one pass), then each distinct score once, highest first
    merged = np.sort(np.concatenate([positive_scores, negative_scores]), kind="stable")
    distinct = merged[np.r_[True, merged[1:] != merged[:-1]]][::-1]
    tp = len(positive_scores) - np.searchsorted(positive_scores, distinct, side="left")
    fp = len(negative_scores) - np.searchsorted(negative_scores, distinct, side="left")
    positives = len(positive_scores)
    negatives = len(score) - positives
    both = 0 < positives < len(score)
    tp, fp = np.r_[0, tp].astype(np.int64), np.r_[0, fp].astype(np.int64)
    sorted_score = distinct.astype(np.float64)
    roc_auc = average_precision = None
    if both:
        tpr, fpr = tp / positives, fp / negatives
        roc_auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # the trapezoids under the ROC points
        # the step sum of precision over each rise in recall (sklearn's average_precision_score)
        average_precision = float(np.sum(np.diff(tpr) * tp[1:] / (tp[1:] + fp[1:])))
    return ThresholdCurve(positive=int(positive), thresholds=np.r_[np.inf, sorted_score], tp=tp, fp=fp,
                          positives=positives, total=int(len(score)), roc_auc=roc_auc,
                          average_precision=average_precision)


def slice_metrics_at(labels, probs, slices, samples, *, positive: int, threshold: float, rows=None) -> list:
    """Per error slice (rows of slices.parquet), the class's precision, recall and F1 inside it at `threshold`,
    with the slice's prevalence: where the chosen threshold works and where it does not. `rows` (each slice's
    member positions, in the order of `slices`) spares finding the members again: a threshold is a slider."""
    from .slices import slice_mask

    labels, probs = _checked_shapes(labels, probs, positive)
    out = []
    for k, (_, row) in enumerate(slices.iterrows()):
        inside = np.flatnonzero(slice_mask(samples, row["ids"])) if rows is None else np.asarray(rows[k])
        # the slice's rows only: every row's labels and scores were converted per call (0.3 s a click at 10M)
        predicted = np.asarray(probs[inside, int(positive)], dtype=np.float64) >= float(threshold)
        positive_inside = labels[inside].astype(np.int64) == int(positive)
        tp = int((predicted & positive_inside).sum())
        fp = int((predicted & ~positive_inside).sum())
        fn = int((~predicted & positive_inside).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.append({"slice": row["description"], "samples": int(len(inside)),
                    "prevalence": float(positive_inside.mean()) if len(inside) else 0.0,
                    "precision": precision, "recall": recall,
                    "f1": float(_f1(np.float64(precision), np.float64(recall)))})
    return out


# In a run: the threshold a person chose, which rankings and exports then use. A classifier's is one class against
# the rest ({"positive", "threshold"}); a multi-label run's is one per label ({"per_label": [...], "labels": [...]}).
THRESHOLDS = "thresholds.json"


def predictions_at(probs, *, positive: int, threshold: float) -> np.ndarray:
    """The predicted class when class `positive` is predicted for p(positive) >= `threshold`, and otherwise the most
    probable of the other classes (for two classes: the other one)."""
    probs = np.asarray(probs, dtype=np.float64)
    _check(np.zeros(len(probs), dtype=np.int64), probs, positive)
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= float(threshold), positive, others.argmax(axis=1)).astype(np.int64)


def save_threshold(run_dir, *, positive: int, threshold: float, num_classes: int, cost_fp: float = 1.0,
                   cost_fn: float = 1.0) -> dict:
    """Store the chosen threshold in the run (thresholds.json, written atomically); returns what was written."""
    from ..loading.runs import write_json
    from pathlib import Path

    check_probability_cut(threshold)
    if isinstance(positive, bool) or not isinstance(positive, (int, np.integer)) or not 0 <= positive < num_classes:
        raise AnalyzerError(f"the positive class must be a class index 0..{num_classes - 1}, got {positive!r}")
    _check_costs(cost_fp, cost_fn)
    record = {"positive": int(positive), "threshold": float(threshold), "cost_fp": float(cost_fp),
              "cost_fn": float(cost_fn)}
    write_json(Path(run_dir) / THRESHOLDS, record)
    return record


def save_label_thresholds(run_dir, thresholds, *, names, cost_fp: float = 1.0, cost_fn: float = 1.0) -> dict:
    """Store a multi-label run's per-label thresholds (thresholds.json, written atomically): `thresholds` holds one
    cut per label, in the order of `names`; returns what was written."""
    from ..loading.runs import write_json
    from pathlib import Path

    names = [str(n) for n in names]
    cuts = list(thresholds)
    if len(cuts) != len(names):
        raise AnalyzerError(f"{len(cuts)} thresholds for {len(names)} labels: give one threshold per label")
    for name, cut in zip(names, cuts):
        check_probability_cut(cut, f"the threshold of label {name!r}")
    _check_costs(cost_fp, cost_fn)
    record = {"per_label": [float(c) for c in cuts], "labels": names, "cost_fp": float(cost_fp),
              "cost_fn": float(cost_fn)}
    write_json(Path(run_dir) / THRESHOLDS, record)
    return record


def task_at(task, stored: dict | None):
    """The run's task as its stored thresholds.json decides: a multi-label task with each label's cut; any other
    task as it is (a classifier's stored class is applied by `samples_at`)."""
    import dataclasses

    if not stored or not task.per_label or "per_label" not in stored:
        return task
    return dataclasses.replace(task, threshold=tuple(float(c) for c in stored["per_label"]))


def samples_at(samples, probs, *, task, stored: dict | None, labels=None, names=None):
    """samples.parquet's table with every prediction taken at the stored threshold (thresholds.json), so the
    rankings and their exports use it: a classifier's class `positive` when p(positive) >= threshold (else the most
    probable other class); a multi-label run's label sets, labels wrong and Hamming error at each label's cut
    (`labels` the (N, K) matrix, `names` the label names). Without a stored threshold the table is as stored."""
    if not stored:
        return samples
    if task.per_label:
        if "per_label" not in stored:
            return samples
        decided = task_at(task, stored)
        return samples.assign(**decided.sample_columns(labels, probs, names=names))
    if not task.has_classes or "positive" not in stored or not 0 <= int(stored["positive"]) < task.num_outputs:
        return samples
    pred = predictions_at(probs, positive=int(stored["positive"]), threshold=float(stored["threshold"]))
    return samples.assign(pred=pred, correct=pred == samples["label"].to_numpy())
