"""Mergeable partial aggregates: the run's headline numbers as sums over rows, so that parts add up to the whole.

A scaled-out run (`engines.ray_engine`) sees its samples batch by batch, from many actors, in one pass. Each batch
gives a `PartialAggregates` (`of`), and any two partials over disjoint rows `merge` into the partial over both:
counts and sums only, so the order of merging does not matter. The totals give
- the row count, the mean loss and the mean error (the task's: 0/1 for a class, |residual|, the Hamming fraction);
- for a task of one class per sample: the confusion counts (K x K) and the top-label calibration bins (uniform
  edges, as `metrics.calibration_bins`), hence the accuracy and the ECE;
- per group of each categorical column given (a metadata column, a split): its count and its error sum.

Nothing here needs the rows again: a partial is a few arrays, whatever the number of rows it covers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import AnalyzerError
from .metrics import DEFAULT_BINS, CalibrationBins

# a column with more distinct values than this is not a grouping: its per-group counts are not kept
MAX_GROUPS = 64


@dataclass(frozen=True)
class PartialAggregates:
    """Sums over some rows (see the module's docstring). `confusion` and the bin sums are None for a task without
    single-label classes."""

    count: int
    loss_sum: float
    error_sum: float
    confusion: np.ndarray | None = None  # (K, K) int64, rows the label, columns the prediction
    bin_count: np.ndarray | None = None  # (n_bins,) int64
    bin_confidence_sum: np.ndarray | None = None  # (n_bins,) float64
    bin_correct_sum: np.ndarray | None = None  # (n_bins,) float64
    # {column: {group value as text: [count, error sum]}}; a column whose groups passed MAX_GROUPS maps to None
    groups: dict = field(default_factory=dict)

    @classmethod
    def of(cls, task, labels, outputs, loss, *, groups: dict | None = None,
           n_bins: int = DEFAULT_BINS) -> "PartialAggregates":
        """The partial over these rows: `labels` and `outputs` as the task reads them, `loss` (N,) per sample,
        `groups` {column: (N,) values} to count per value."""
        errors = np.asarray(task.errors(labels, outputs), dtype=np.float64)
        loss = np.asarray(loss, dtype=np.float64)
        if loss.shape != errors.shape:
            raise AnalyzerError(f"loss has shape {loss.shape} for {len(errors)} samples")
        parts = dict(count=len(errors), loss_sum=float(loss.sum()), error_sum=float(errors.sum()))
        single_label = task.has_classes and np.asarray(labels).ndim == 1
        if single_label:
            probs = np.asarray(outputs, dtype=np.float64)
            k = probs.shape[1]
            y = np.asarray(labels, dtype=np.int64)
            pred = task.predictions(probs)
            parts["confusion"] = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)
            confidence = probs.max(1)
            # the bins of metrics.calibration_bins (uniform edges, a value on an inner edge in the lower bin)
            which = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)
            parts["bin_count"] = np.bincount(which, minlength=n_bins).astype(np.int64)
            parts["bin_confidence_sum"] = np.bincount(which, weights=confidence, minlength=n_bins)
            parts["bin_correct_sum"] = np.bincount(which, weights=(pred == y).astype(np.float64), minlength=n_bins)
        counted = {}
        for column, values in (groups or {}).items():
            values = np.asarray(values)
            if len(values) != len(errors):
                raise AnalyzerError(f"group column {column!r} has {len(values)} values for {len(errors)} samples")
            text = values.astype(str)
            keys, codes = np.unique(text, return_inverse=True)
            if len(keys) > MAX_GROUPS:
                counted[column] = None
                continue
            n = np.bincount(codes, minlength=len(keys))
            err = np.bincount(codes, weights=errors, minlength=len(keys))
            counted[column] = {str(key): [int(c), float(e)] for key, c, e in zip(keys, n, err)}
        return cls(**parts, groups=counted)

    def merge(self, other: "PartialAggregates") -> "PartialAggregates":
        """The partial over the rows of both (disjoint rows: a sample counted twice is counted twice)."""
        def add(a, b):
            if a is None or b is None:
                if a is not None or b is not None:
                    raise AnalyzerError("cannot merge partial aggregates of different tasks")
                return None
            if a.shape != b.shape:
                raise AnalyzerError(f"cannot merge partial aggregates of {a.shape} and {b.shape}: different classes")
            return a + b

        groups = {}
        for column in dict.fromkeys([*self.groups, *other.groups]):
            mine, theirs = self.groups.get(column, {}), other.groups.get(column, {})
            if mine is None or theirs is None:
                groups[column] = None
                continue
            merged = {key: list(value) for key, value in mine.items()}
            for key, (count, error) in theirs.items():
                entry = merged.setdefault(key, [0, 0.0])
                entry[0] += count
                entry[1] += error
            groups[column] = None if len(merged) > MAX_GROUPS else merged
        return PartialAggregates(count=self.count + other.count, loss_sum=self.loss_sum + other.loss_sum,
                                 error_sum=self.error_sum + other.error_sum,
                                 confusion=add(self.confusion, other.confusion),
                                 bin_count=add(self.bin_count, other.bin_count),
                                 bin_confidence_sum=add(self.bin_confidence_sum, other.bin_confidence_sum),
                                 bin_correct_sum=add(self.bin_correct_sum, other.bin_correct_sum), groups=groups)

    @property
    def calibration(self) -> CalibrationBins | None:
        """The top-label reliability bins of every row counted (None without single-label classes)."""
        if self.bin_count is None:
            return None
        n_bins = len(self.bin_count)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_predicted = np.where(self.bin_count > 0, self.bin_confidence_sum / self.bin_count, np.nan)
            observed = np.where(self.bin_count > 0, self.bin_correct_sum / self.bin_count, np.nan)
        return CalibrationBins(strategy="uniform", edges=np.linspace(0.0, 1.0, n_bins + 1), count=self.bin_count,
                               mean_predicted=mean_predicted, observed=observed)

    def to_json(self) -> dict:
        """What the run stores (`aggregates.json`): the sums, and the headline numbers they give."""
        mean = (lambda total: total / self.count if self.count else None)
        out = {"count": self.count, "loss_sum": self.loss_sum, "error_sum": self.error_sum,
               "mean_loss": mean(self.loss_sum), "mean_error": mean(self.error_sum),
               "groups": {column: (None if g is None else {k: {"count": c, "error_sum": e, "mean_error": e / c}
                                                           for k, (c, e) in g.items()})
                          for column, g in self.groups.items()}}
        if self.confusion is not None:
            out["confusion"] = self.confusion.tolist()
            out["accuracy"] = float(np.trace(self.confusion) / self.count) if self.count else None
            out["calibration"] = self.calibration.to_dict()
        return out


def group_columns(metadata, *, limit: int = MAX_GROUPS) -> list:
    """The columns of a metadata table worth counting per value: text, booleans or integers with at most `limit`
    distinct values (a split, a site, a device), not ids or measurements."""
    chosen = []
    for column in metadata.columns:
        values = metadata[column]
        if values.dtype.kind in "OUSbiu" or str(values.dtype) in ("category", "string"):
            if values.nunique(dropna=False) <= limit:
                chosen.append(str(column))
    return chosen
