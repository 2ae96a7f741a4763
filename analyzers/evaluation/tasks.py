"""What a model is asked to do, in one place: a `Task` turns model outputs into predictions, gives each sample's
loss and error, computes the metrics, and says what "wrong" means. Evaluation, slices, rankings and the pages ask
the task; none of them branches on its name.

- `Classification`: one class per sample out of K (K >= 2), outputs are class probabilities (N, K); wrong is a
  predicted class other than the label; the error is 0 or 1. A binary model is the case K = 2 (`name` "binary").
- `Regression`: a real target per sample, outputs are the predicted values (N, 1); the error is |residual|; a sample
  is wrong when its error is among the largest (`Regression.wrong_quantile` of the errors, 0.9 by default), since a
  real-valued prediction is never exactly right. A model of two outputs predicts a Gaussian: its mean and its
  log-variance (the stored outputs are the mean and the variance, (N, 2)), and the metrics add how often the
  central intervals of its predicted spread hold the target (`interval_coverage`) and the Gaussian NLL.
- `MultiLabel`: K independent yes/no labels per sample (multi-hot (N, K)), outputs are per-label probabilities
  (N, K) thresholded at `threshold` per label; the error is the Hamming fraction (labels wrong / K); wrong is any
  label wrong (subset accuracy's complement).

`infer_task(labels, output_shape)` reads the task from the labels and the model's output, and refuses to guess when
the two allow more than one reading (`--task` then says which).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError

TASK_NAMES = ("classification", "binary", "multilabel", "regression")
# The model output kind that a regression model is read with: its raw output, one value per sample
VALUE_OUTPUT = "value"
# The output kind a multi-label model is read with: one logit per label, each label's probability its sigmoid
MULTILABEL_OUTPUT = "multilabel_logits"


def _one_line_names(values, limit: int = 5) -> str:
    shown = [str(v) for v in values[:limit]]
    return ", ".join(shown) + (", ..." if len(values) > limit else "")


def _finite_float(values, what: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(out), -1).any(axis=1))[0])
        raise AnalyzerError(f"{int(bad.reshape(len(out), -1).any(axis=1).sum())} {what} are NaN or infinite, the "
                            f"first in row {first}: give every sample a finite {what[:-1]}, or drop those rows")
    return out


@dataclass(frozen=True)
class Task:
    """The interface every task gives (see the module's docstring); `num_outputs` is the model's output width."""

    num_outputs: int

    name = "task"
    what_is_wrong = ""  # a sentence for the pages: what a wrong prediction is
    error_name = "error"  # what the per-sample error measure is called
    error_column = None  # samples.parquet's column holding it, where it is more than right or wrong
    # the model's outputs are class probabilities: a confusion matrix, calibration and label noise apply
    has_classes = True
    # each sample's columns (`sample_columns`) depend on its own row alone, so a table built in parts is the whole's
    rows_independent = True
    label_dtype = np.int64  # how labels are stored in a Dataset and samples.parquet
    label_form = "int64"  # what one sample's label is, in words for a refusal
    rankings = ()  # the error rankings (metrics.RANKINGS) that apply to the task
    per_label = False  # K independent labels: per-label matrices, calibration and thresholds apply
    rules_on_labels = True  # slices' rules may name the label and the prediction (classes, label sets)
    exactly_right = True  # an error of 0 is a right answer (a regression's prediction is never exactly right)
    # why the class analyses (confusion matrix, top-label calibration, label noise) are skipped where they do not apply
    no_classes_reason = ""
    # the output kind the task reads a model's raw output as (engines.inference); None keeps the model's own
    # (a classifier's logits, probabilities or binary logit, as loaded)
    output_kind = None
    # the raw output column every map explains, where it is one for every sample (a regression's predicted value,
    # or its mean); None: a class or label chosen per map
    value_column = None

    def outputs_from_raw(self, raw, output_kind: str):
        """What a run stores per sample (probs.npy) from the model's raw output batch (a torch tensor)."""
        raise NotImplementedError

    def loss_from_raw(self, raw, labels, output_kind: str):
        """Per-sample training loss (a torch tensor) of a raw output batch against labels (a torch tensor)."""
        raise NotImplementedError

    def sample_columns(self, labels, outputs, names=None) -> dict:
        """The core columns of samples.parquet besides id and loss: label, pred, confidence, correct, and the
        task's own (regression: target, prediction, residual, abs_error; multi-label: labels_wrong, hamming_error,
        missed, false_alarms). `names` are the class or label names."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> dict:
        """The metrics a run's summary and the Load page show."""
        raise NotImplementedError

    def check_labels(self, labels) -> np.ndarray:
        raise NotImplementedError

    def predictions(self, outputs) -> np.ndarray:
        raise NotImplementedError

    def errors(self, labels, outputs) -> np.ndarray:
        """Per sample, how wrong the prediction is (float64, 0 is right; larger is worse)."""
        raise NotImplementedError

    def wrong(self, labels, outputs) -> np.ndarray:
        """Per sample, whether the prediction counts as wrong (bool)."""
        raise NotImplementedError

    def metrics(self, labels, outputs, *, names=None) -> dict:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"name": self.name, "num_outputs": int(self.num_outputs)}


@dataclass(frozen=True)
class Classification(Task):
    """Single-label classification over `num_outputs` classes; outputs are probabilities (N, K)."""

    what_is_wrong = "the predicted class (the most probable one) is not the label"
    error_name = "misclassified"
    rankings = ("confident_wrong", "unsure_right", "loss", "margin")  # metrics.RANKINGS that apply

    @property
    def name(self) -> str:  # a two-class model is the binary task: thresholds and PR curves apply to it
        return "binary" if self.num_outputs == 2 else "classification"

    def check_labels(self, labels) -> np.ndarray:
        y = np.asarray(labels)
        if y.ndim != 1:
            raise AnalyzerError(f"{self.name} needs one class index per sample, got labels of shape {y.shape}: "
                                f"for several yes/no labels per sample use --task multilabel")
        if y.dtype.kind == "f":
            y = _finite_float(y, "labels")
            if not np.all(y == np.round(y)):
                raise AnalyzerError(f"labels are real numbers ({_one_line_names(np.unique(y[y != np.round(y)]))}) "
                                    f"but the task is {self.name}: use class indices 0..{self.num_outputs - 1}, or "
                                    f"--task regression for a real-valued target")
        elif y.dtype.kind not in "iub":
            raise AnalyzerError(f"labels have type {y.dtype}: use integer class indices 0..{self.num_outputs - 1}")
        y = y.astype(np.int64)
        if len(y) and (y.min() < 0 or y.max() >= self.num_outputs):
            raise AnalyzerError(f"labels range over {int(y.min())}..{int(y.max())} but the model has "
                                f"{self.num_outputs} classes (0..{self.num_outputs - 1}): check the labels or the "
                                f"model (a real-valued target is --task regression)")
        return y

    def predictions(self, outputs) -> np.ndarray:
        return np.asarray(outputs).argmax(axis=1)

    def errors(self, labels, outputs) -> np.ndarray:
        return self.wrong(labels, outputs).astype(np.float64)

    def wrong(self, labels, outputs) -> np.ndarray:
        return self.predictions(outputs) != np.asarray(labels)

    def metrics(self, labels, outputs, *, names=None) -> dict:
        from .metrics import classification_metrics

        return classification_metrics(labels, outputs, class_names=names)

    def outputs_from_raw(self, raw, output_kind: str):
        from ..engines.inference import class_log_probs

        return class_log_probs(raw, output_kind).exp()

    def loss_from_raw(self, raw, labels, output_kind: str):
        import torch.nn.functional as F

        from ..engines.inference import class_log_probs

        return F.nll_loss(class_log_probs(raw, output_kind), labels.long(), reduction="none")

    def sample_columns(self, labels, outputs, names=None) -> dict:
        probs = np.asarray(outputs)
        pred = self.predictions(probs).astype(np.int64)
        return {"label": np.asarray(labels), "pred": pred, "confidence": probs.max(axis=1).astype(np.float32),
                "correct": pred == np.asarray(labels)}

    def headline(self, metrics: dict) -> dict:
        return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"]}


# The central intervals whose coverage a mean-and-variance regression is scored on: a calibrated spread holds the
# target in each about as often as its level says.
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
# The output names of a mean-and-variance regression model: its raw outputs are the mean and the log-variance
MEAN_VARIANCE_NAMES = ("mean", "log_variance")


@dataclass(frozen=True)
class Regression(Task):
    """A real-valued target; outputs are the predicted values (N, 1), or a Gaussian's mean and variance (N, 2) for a
    model of two raw outputs (the mean and the log-variance)."""

    wrong_quantile: float = 0.9

    name = "regression"
    error_name = "absolute error"
    error_column = "abs_error"
    has_classes = False
    label_dtype = np.float64
    label_form = "finite float64"
    rankings = ("abs_error", "over_predicted", "under_predicted")
    no_classes_reason = "a regression model predicts values, not classes"
    rules_on_labels = False  # its label and pred are numbers: rules name the target column instead
    output_kind = VALUE_OUTPUT
    exactly_right = False
    value_column = 0  # the predicted value, or a mean-and-variance model's mean
    rows_independent = False  # wrong is a quantile of every row's error

    @property
    def what_is_wrong(self) -> str:
        return (f"the absolute error is among the largest {1 - self.wrong_quantile:.0%} (above its "
                f"{self.wrong_quantile:.0%} quantile): a real-valued prediction is never exactly right")

    def check_labels(self, labels) -> np.ndarray:
        y = np.asarray(labels)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise AnalyzerError(f"regression needs one target per sample, got targets of shape {y.shape}")
        if y.dtype.kind not in "iufb":
            raise AnalyzerError(f"regression targets must be numbers, got type {y.dtype}: convert the target "
                                f"column to numbers, or choose --task classification for class names")
        return _finite_float(y, "targets")

    @property
    def has_variance(self) -> bool:
        """The model predicts a spread as well as a value (two outputs: the mean and the log-variance)."""
        return self.num_outputs == 2

    def predictions(self, outputs) -> np.ndarray:
        out = np.asarray(outputs, dtype=np.float64)
        return out[:, 0] if out.ndim == 2 else out

    def spreads(self, outputs) -> np.ndarray | None:
        """Each sample's predicted standard deviation (a mean-and-variance model), else None."""
        if not self.has_variance:
            return None
        return np.sqrt(np.asarray(outputs, dtype=np.float64)[:, 1])

    def interval_coverage(self, labels, outputs, levels=COVERAGE_LEVELS) -> dict:
        """For each level, the share of targets inside the central interval of the predicted Gaussian
        (mean ± z·std, z the normal quantile of (1 + level) / 2); empty for a model without a spread."""
        from scipy.stats import norm

        std = self.spreads(outputs)
        if std is None:
            return {}
        z = np.abs(self.residuals(labels, outputs)) / std
        return {f"{level:g}": float((z <= norm.ppf((1 + level) / 2)).mean()) for level in levels}

    def residuals(self, labels, outputs) -> np.ndarray:
        """prediction - target: positive where the model predicts too high."""
        return self.predictions(outputs) - np.asarray(labels, dtype=np.float64)

    def errors(self, labels, outputs) -> np.ndarray:
        return np.abs(self.residuals(labels, outputs))

    def wrong(self, labels, outputs) -> np.ndarray:
        errors = self.errors(labels, outputs)
        if len(errors) == 0:
            return np.zeros(0, dtype=bool)
        return errors > np.quantile(errors, self.wrong_quantile)

    def metrics(self, labels, outputs, *, names=None) -> dict:
        """scikit-learn's mean_squared_error, its root, mean_absolute_error, r2_score, median_absolute_error, and
        mean_absolute_percentage_error where no target is 0 (None otherwise: it divides by the target)."""
        from sklearn.metrics import (mean_absolute_error, mean_absolute_percentage_error, mean_squared_error,
                                     median_absolute_error, r2_score)

        y = self.check_labels(labels)
        pred = self.predictions(outputs)
        if len(y) == 0:
            raise AnalyzerError("no samples to evaluate: select at least one sample")
        mse = float(mean_squared_error(y, pred))
        return {
            "num_samples": int(len(y)),
            "mse": mse,
            "rmse": float(np.sqrt(mse)),
            "mae": float(mean_absolute_error(y, pred)),
            # R² needs two distinct targets; a selection of one value has none
            "r2": float(r2_score(y, pred)) if len(y) > 1 and np.ptp(y) > 0 else None,
            "median_absolute_error": float(median_absolute_error(y, pred)),
            "mape": float(mean_absolute_percentage_error(y, pred)) if np.all(y != 0) else None,
            "target_mean": float(y.mean()),
            "target_std": float(y.std()),
            **self._spread_metrics(y, outputs),
        }

    def _spread_metrics(self, y, outputs) -> dict:
        """A mean-and-variance model's interval coverage and mean Gaussian negative log-likelihood."""
        if not self.has_variance:
            return {}
        variance = np.asarray(outputs, dtype=np.float64)[:, 1]
        nll = 0.5 * (np.log(2 * np.pi * variance) + (y - self.predictions(outputs)) ** 2 / variance)
        return {"interval_coverage": self.interval_coverage(y, outputs), "gaussian_nll": float(nll.mean()),
                "mean_predicted_std": float(np.sqrt(variance).mean())}

    def outputs_from_raw(self, raw, output_kind: str):
        import torch

        flat = raw.reshape(len(raw), -1)
        if not self.has_variance:
            return flat[:, :1]  # the predicted value, (N, 1)
        return torch.stack([flat[:, 0], flat[:, 1].exp()], dim=1)  # the mean and the variance, (N, 2)

    def loss_from_raw(self, raw, labels, output_kind: str):
        import torch.nn.functional as F

        flat = raw.reshape(len(raw), -1)
        target = labels.to(raw.dtype)
        if not self.has_variance:
            return (flat[:, 0] - target) ** 2  # squared error
        # the Gaussian negative log-likelihood a mean-and-variance model is trained with, per sample
        return F.gaussian_nll_loss(flat[:, 0], target, flat[:, 1].exp(), full=True, reduction="none")

    def sample_columns(self, labels, outputs, names=None) -> dict:
        y = np.asarray(labels, dtype=np.float64)
        pred = self.predictions(outputs)
        residual = pred - y
        spread = self.spreads(outputs)
        return {"label": y, "pred": pred, "confidence": np.full(len(y), np.nan, dtype=np.float32),
                "correct": ~self.wrong(y, outputs), "target": y, "prediction": pred, "residual": residual,
                "abs_error": np.abs(residual),
                # a mean-and-variance model's predicted spread, and the residual in units of it
                **({} if spread is None else {"predicted_std": spread, "z_score": residual / spread})}

    def headline(self, metrics: dict) -> dict:
        return {"mae": metrics["mae"], "rmse": metrics["rmse"], "r2": metrics["r2"]}

    def to_json(self) -> dict:
        return {**super().to_json(), "wrong_quantile": float(self.wrong_quantile)}


def check_probability_cut(threshold, what: str = "a threshold on a probability") -> None:
    """Refuse a cut that is not one real number in [0, 1] (a bool, text or NaN included), naming `what` it is."""
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.number)) or \
            not 0 <= float(threshold) <= 1:
        raise AnalyzerError(f"{what} must be a number in [0, 1], got {threshold!r}")


@dataclass(frozen=True)
class MultiLabel(Task):
    """`num_outputs` independent yes/no labels; outputs are per-label probabilities (N, K), one sigmoid per logit.
    `threshold` is one cut for every label (0.5 by default) or one per label (a tuple of K: thresholds.json's
    per-label choice), each in [0, 1]."""

    threshold: float | tuple = 0.5

    def __post_init__(self):
        shape = np.shape(self.threshold)
        if len(shape) > 1 or (len(shape) == 1 and shape[0] != self.num_outputs):
            raise AnalyzerError(f"a multi-label threshold is one number in [0, 1] or one per label "
                                f"({self.num_outputs}), got {self.threshold!r}")
        for cut in np.asarray(self.threshold, dtype=object).reshape(-1):  # a 0-d array's value, an array's each
            check_probability_cut(cut, "a multi-label threshold")
        if shape:  # a tuple keeps the dataclass hashable and frozen
            object.__setattr__(self, "threshold", tuple(float(c) for c in self.threshold))

    @property
    def thresholds(self) -> np.ndarray:
        """(K,): each label's cut."""
        return np.broadcast_to(np.asarray(self.threshold, dtype=np.float64), (self.num_outputs,))

    name = "multilabel"
    what_is_wrong = "at least one label is predicted wrongly (a probability on the wrong side of its threshold)"
    error_name = "Hamming error"
    error_column = "hamming_error"
    has_classes = False
    per_label = True
    label_form = "int64 row of 0 and 1"
    rankings = ("labels_wrong", "loss")
    rules_on_labels = False  # its label sets are combinations: rules combine the per-label columns instead
    output_kind = MULTILABEL_OUTPUT
    no_classes_reason = ("a multi-label model gives each label its own yes or no: see the per-label matrices, "
                         "calibration and thresholds instead")

    def check_labels(self, labels) -> np.ndarray:
        y = np.asarray(labels)
        if y.ndim != 2 or y.shape[1] != self.num_outputs:
            raise AnalyzerError(f"multi-label needs a multi-hot array (samples, {self.num_outputs}), one 0/1 column "
                                f"per model output, got labels of shape {y.shape}: save y as an (N, K) array of "
                                f"0 and 1")
        if y.dtype.kind == "f":
            y = _finite_float(y, "labels")
        elif y.dtype.kind not in "iub":
            raise AnalyzerError(f"multi-label labels have type {y.dtype}: save y as an (N, K) array of 0 and 1")
        if not np.isin(y, (0, 1)).all():
            raise AnalyzerError("multi-label labels must be 0 or 1 (is the label absent or present): found "
                                f"{_one_line_names(np.unique(y[~np.isin(y, (0, 1))]))}")
        return y.astype(np.int64)

    def predictions(self, outputs) -> np.ndarray:
        return (np.asarray(outputs) >= self.thresholds).astype(np.int64)

    def label_errors(self, labels, outputs) -> np.ndarray:
        """(N, K) bool: which labels of each sample are predicted wrongly."""
        return self.predictions(outputs) != np.asarray(labels)

    def errors(self, labels, outputs) -> np.ndarray:
        return self.label_errors(labels, outputs).mean(axis=1)

    def wrong(self, labels, outputs) -> np.ndarray:
        return self.label_errors(labels, outputs).any(axis=1)

    def metrics(self, labels, outputs, *, names=None) -> dict:
        """scikit-learn's classification_report per label (precision, recall, f1, support), accuracy_score (subset
        accuracy), hamming_loss, micro and macro roc_auc_score and average_precision_score (None where a label has
        a single value, where they are undefined), and each label's prevalence."""
        from sklearn.metrics import (accuracy_score, average_precision_score, classification_report, hamming_loss,
                                     roc_auc_score)

        y = self.check_labels(labels)
        probs = np.asarray(outputs, dtype=np.float64)
        if probs.shape != y.shape:
            raise AnalyzerError(f"per-label probabilities of shape {probs.shape} do not match labels {y.shape}")
        if len(y) == 0:
            raise AnalyzerError("no samples to evaluate: select at least one sample")
        pred = self.predictions(probs)
        names = [str(n) for n in names] if names is not None else [str(i) for i in range(self.num_outputs)]
        both = ((y == 0).any(axis=0) & (y == 1).any(axis=0)).all()
        return {
            "num_samples": int(len(y)),
            "subset_accuracy": float(accuracy_score(y, pred)),
            "hamming_loss": float(hamming_loss(y, pred)),
            "roc_auc_micro": float(roc_auc_score(y, probs, average="micro")) if both else None,
            "roc_auc_macro": float(roc_auc_score(y, probs, average="macro")) if both else None,
            "average_precision_micro": float(average_precision_score(y, probs, average="micro")) if both else None,
            "average_precision_macro": float(average_precision_score(y, probs, average="macro")) if both else None,
            "prevalence": {name: float(v) for name, v in zip(names, y.mean(axis=0))},
            "classification_report": classification_report(y, pred, target_names=names, output_dict=True,
                                                           zero_division=0),
        }

    def outputs_from_raw(self, raw, output_kind: str):
        import torch

        return torch.sigmoid(raw)

    def loss_from_raw(self, raw, labels, output_kind: str):
        import torch.nn.functional as F

        # the sum of the labels' binary cross-entropies: the loss a multi-label model is trained with, per sample
        return F.binary_cross_entropy_with_logits(raw, labels.to(raw.dtype), reduction="none").sum(dim=1)

    def sample_columns(self, labels, outputs, names=None) -> dict:
        """label and pred are the sets of labels present and predicted, as text ("circle + square", "none"), so
        `correct` is label == pred; beside them the labels wrong, missed and falsely predicted, and a yes/no
        column per label (`label_<name>`)."""
        y = np.asarray(labels, dtype=np.int64)
        probs = np.asarray(outputs, dtype=np.float64)
        pred = self.predictions(probs)
        names = np.asarray([str(n) for n in names] if names is not None else
                           [str(i) for i in range(self.num_outputs)], dtype=object)
        wrong = pred != y
        # how sure the model is of its whole answer: the mean, over labels, of the probability of what it says
        confidence = np.where(pred == 1, probs, 1 - probs).mean(axis=1).astype(np.float32)
        return {"label": label_sets(y, names), "pred": label_sets(pred, names), "confidence": confidence,
                "correct": ~wrong.any(axis=1), "labels_wrong": wrong.sum(axis=1).astype(np.int64),
                "hamming_error": wrong.mean(axis=1), "missed": label_sets(wrong & (y == 1), names, empty=""),
                "false_alarms": label_sets(wrong & (y == 0), names, empty=""),
                # one yes/no column per label, which slices' rules combine ("label_circle and label_triangle")
                **{f"label_{name}": y[:, k] == 1 for k, name in enumerate(names)}}

    def headline(self, metrics: dict) -> dict:
        return {"subset_accuracy": metrics["subset_accuracy"], "hamming_loss": metrics["hamming_loss"],
                "average_precision_macro": metrics["average_precision_macro"]}

    def to_json(self) -> dict:
        cut = self.threshold
        return {**super().to_json(), "threshold": list(cut) if isinstance(cut, tuple) else float(cut)}


LABEL_SET_JOIN = " + "


def label_sets(multi_hot, names, *, empty: str = "none") -> np.ndarray:
    """Each row's present labels as one text, in label order ("circle + square"), `empty` for none."""
    names = np.asarray(names, dtype=object)
    return np.asarray([LABEL_SET_JOIN.join(names[np.flatnonzero(row)]) or empty for row in np.asarray(multi_hot)],
                      dtype=object)


def task_named(name: str, num_outputs: int) -> Task:
    """The task called `name` (one of TASK_NAMES) for a model with `num_outputs` outputs, or an error naming what
    does not fit."""
    if name not in TASK_NAMES:
        raise AnalyzerError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")
    if name == "regression":
        if num_outputs not in (1, 2):
            raise AnalyzerError(f"regression needs one output per sample (or two: a mean and a log-variance), but "
                                f"the model has {num_outputs}: a model with one output per class is --task "
                                f"classification")
        return Regression(num_outputs)
    if name == "multilabel":
        return MultiLabel(num_outputs)
    if num_outputs == 1:  # one logit or probability: the positive class of two
        return Classification(2)
    if name == "binary" and num_outputs != 2:
        raise AnalyzerError(f"--task binary needs a model with one logit or two class outputs, but it has "
                            f"{num_outputs}: use --task classification")
    return Classification(num_outputs)


def infer_task(labels, output_width: int) -> Task:
    """The task read from the labels and the model's raw output width (1 for an (N,) or (N, 1) output):

    - a multi-hot (N, K) 0/1 label array with K outputs: multi-label;
    - integer labels with K >= 2 outputs: classification (binary when K = 2);
    - real (non-integer) labels with one output: regression;
    - integer 0/1 labels with one output: a binary logit or probability;

    anything else is refused, and an output that fits two readings (integer labels beyond 0/1 with one output:
    a count regression, or a mislabelled binary model) asks for --task rather than guess."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] > 1:
        if y.shape[1] == output_width and (np.isin(y, (0, 1)) | (y.dtype.kind == "f" and ~np.isfinite(y))).all():
            return MultiLabel(output_width)  # missing labels are refused by its check_labels, with their row
        raise AnalyzerError(f"labels of shape {y.shape} with a model of {output_width} outputs: a multi-label "
                            f"dataset needs one 0/1 column per model output")
    flat = y.reshape(len(y))
    integral = flat.dtype.kind in "iub" or (flat.dtype.kind == "f" and np.all(np.isfinite(flat))
                                            and np.all(flat == np.round(flat)))
    if output_width == 1:
        if flat.dtype.kind == "f" and not integral:
            return Regression(1)
        if integral and np.isin(flat, (0, 1)).all():
            return Classification(2)
        raise AnalyzerError(f"the model has one output and the labels are whole numbers "
                            f"({_one_line_names(np.unique(flat))}): say which task this is, --task regression for "
                            f"a numeric target or --task classification for classes")
    if flat.dtype.kind == "f" and not integral:
        raise AnalyzerError(f"labels are real numbers but the model has {output_width} outputs: a regression model "
                            f"has one output (or two, a mean and a log-variance: say --task regression); for "
                            f"classes use integer labels 0..{output_width - 1}")
    return Classification(output_width)


def output_width(model) -> int:
    """The model's raw output width: 1 for one logit, probability or value per sample, else its number of
    classes."""
    kind = getattr(model, "output_kind", "logits")
    return 1 if kind in ("binary_logit", "binary_probability") else int(model.num_classes)


def task_of(model) -> Task:
    """The task a loaded model is read for (`model_for_task` set it): regression for a value output, else
    classification over its classes."""
    kind = getattr(model, "output_kind", "logits")
    if kind == VALUE_OUTPUT:
        return Regression(int(getattr(model, "num_classes", 1)))
    if kind == MULTILABEL_OUTPUT:
        return MultiLabel(int(model.num_classes))
    return Classification(int(getattr(model, "num_classes", 2)))


def resolve_task(declared: str | None, labels, model) -> Task:
    """The task of a dataset's labels for `model`: the declared one (checked against the model's output), else
    inferred (`infer_task`). Text labels are classes. Without a model, the declared task or classification."""
    y = np.asarray(labels)
    if declared is not None:
        if model is None:  # no output to check against: the task decides only how the labels are read
            width = {"regression": 1, "multilabel": y.shape[-1] if y.ndim == 2 else 0}.get(declared, 2)
            return task_named(declared, width)
        return task_named(declared, output_width(model))
    if model is None or y.dtype.kind in "OUSb":
        return Classification(int(getattr(model, "num_classes", 2)) if model is not None else 2)
    return infer_task(y, output_width(model))


def model_for_task(model, task: Task):
    """`model` read as `task` asks: a regression model's raw output is its value (output kind "value": one output,
    or a mean and a log-variance), not a binary logit or two class logits; a multi-label model's are one logit per
    label; other tasks take the model as it was loaded."""
    import dataclasses

    if task.output_kind is None or getattr(model, "output_kind", None) == task.output_kind:
        return model
    if task.output_kind == VALUE_OUTPUT:
        names = MEAN_VARIANCE_NAMES if task.has_variance else ("value",)
        return dataclasses.replace(model, output_kind=VALUE_OUTPUT, num_classes=task.num_outputs, class_names=names)
    if task.output_kind == MULTILABEL_OUTPUT:
        if model.output_kind != "logits":
            raise AnalyzerError(f"a multi-label model must return one logit per label, but this one returns "
                                f"{model.output_kind.replace('_', ' ')}: remove its final softmax or sigmoid")
        return dataclasses.replace(model, output_kind=MULTILABEL_OUTPUT)
    return model


def read_for_task(model, task_name: str):
    """`model` read for the task named `task_name`, with as many outputs as the model has (`model_for_task`): how
    a model is read for its dataset's task, its sample's, or a run's."""
    return model_for_task(model, task_named(task_name, output_width(model)))
