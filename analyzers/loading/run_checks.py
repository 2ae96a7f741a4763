"""What each file of a run must hold, checked whenever the file is read.

A run directory is data like any other: a sandboxed worker wrote part of it, a disk can truncate it, a person can edit
it. Every page and analysis reads a run through `analyzers.loading.runs.Run`, which applies these rules, so a damaged
file is refused with one line naming the file and the rule, and no page computes on half-valid data (a `KeyError`
three calls later would take the whole page down, and through a shared listing, other runs' pages too).

Each rule is here because something relies on it; the reason is beside it.
"""
from __future__ import annotations

import fnmatch
from numbers import Integral, Real

import numpy as np
import pandas as pd

from ..errors import AnalyzerError

REBUILD = "run python -m analyzers run --overwrite to rebuild it"
ROWS_PER_CHECK = 65536  # probabilities are checked in chunks, so a 1M x 1000 run is never copied whole


class RunDamaged(AnalyzerError):
    """A file of a run breaks a rule of this module. The message names the file, the rule and the fix; `relpath`
    and `why` are kept for callers that word it their own way."""

    def __init__(self, message: str, relpath: str | None = None, why: str | None = None):
        super().__init__(message)
        self.relpath, self.why = relpath, why


def damaged(relpath: str, where, why: str) -> RunDamaged:
    return RunDamaged(f"{relpath} in the run at {where} is damaged ({why}): {REBUILD}", relpath, why)


# ------------------------------------------------------------------------------------------------------ run.json
# (key, kind, required). Kinds: text, int, number, texts (a list of strings), ints, mapping; "?" allows None.
# The pages print every one of these fields; the loaders re-open the model and data from the specs and hashes.
_INFO = (
    ("format_version", "int", True),
    ("class_names", "texts", True),  # every page names classes by index into this list
    ("num_samples", "int", True),  # the row count that samples.parquet and probs.npy must match
    ("model", "mapping", True),
    ("dataset", "mapping", True),
    ("created", "text", False),
    ("accuracy", "number?", False),
    ("parameters", "mapping", False),
    ("preprocessing", "mapping?", False),
    ("sandbox", "mapping?", False),
    ("embedding_layer", "text?", False),
    ("analyses", "mapping", False),
    ("task", "text", False),  # what the model does (analyzers.evaluation.tasks); older runs: classification
    ("owner", "mapping?", False),  # who may replace or delete the run on a dashboard with sign-in; None: the operator
)
_MODEL = (("spec", "text", True), ("sha256", "text", True), ("input_shape", "ints", True), ("arch", "text?", False),
          ("arch_kwargs", "mapping?", False), ("inputs", "mapping?", False),
          ("layers", "texts", False), ("layer_kinds", "mapping", False), ("attention_layers", "texts?", False))
_DATASET = (("spec", "text", True), ("sha256", "text", True), ("modality", "text", True),
            ("feature_names", "texts?", False), ("metadata_columns", "texts?", False),
            ("ground_truth_columns", "texts?", False))
_OWNER = (("id", "text", True), ("name", "text", False))
# preprocessing.spectrogram: an input that is a (mel) spectrogram, which the Explain page draws with a time axis
# (frames x hop_length / sample_rate seconds) and a frequency axis (each bin's centre in Hz), and plays from the
# dataset's extras array named by `waveform`
_SPECTROGRAM = (("sample_rate", "int", True), ("hop_length", "int", True), ("n_fft", "int", False),
                ("mel_frequencies_hz", "numbers", True), ("waveform", "text?", False))


def _kind_ok(value, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _kind_ok(value, kind[:-1])
    if kind == "text":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, Integral) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, Real) and not isinstance(value, bool)
    if kind == "mapping":
        return isinstance(value, dict)
    if kind == "texts":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "ints":
        return isinstance(value, list) and all(_kind_ok(v, "int") for v in value)
    if kind == "list":  # of ids, of any type the run's ids have
        return isinstance(value, list)
    if kind == "records":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if "|" in kind:
        return any(_kind_ok(value, k) for k in kind.split("|"))
    if kind == "numbers":
        return isinstance(value, list) and all(_kind_ok(v, "number") for v in value)
    if kind == "matrix":  # a list of equal-length lists of numbers
        return isinstance(value, list) and all(_kind_ok(row, "numbers") for row in value) and \
            len({len(row) for row in value}) <= 1
    raise ValueError(kind)


def _check_fields(obj: dict, fields, relpath: str, where, prefix: str = "") -> None:
    for key, kind, required in fields:
        if key not in obj:
            if required:
                raise damaged(relpath, where, f"it has no {prefix}{key!r}")
            continue
        if not _kind_ok(obj[key], kind):
            raise damaged(relpath, where, f"{prefix}{key!r} is not {_KIND_WORDS[kind.rstrip('?')]}")


_KIND_WORDS = {"text": "a string", "int": "an integer", "number": "a number", "mapping": "an object",
               "texts": "a list of strings", "ints": "a list of integers", "records": "a list of objects", "list": "a list",
               "numbers": "a list of numbers", "matrix": "a matrix of numbers",
               "number|numbers": "a number or a list of numbers", "text|int|number": "an id (a string or a number)"}


def check_info(info, where) -> None:
    """run.json: every field a page prints or a loader uses, with its type."""
    if not isinstance(info, dict):
        raise damaged("run.json", where, "it is not a JSON object")
    _check_fields(info, _INFO, "run.json", where)
    _check_fields(info["model"], _MODEL, "run.json", where, "model.")
    _check_fields(info["dataset"], _DATASET, "run.json", where, "dataset.")
    if info["dataset"].get("split_sources") is not None:  # what reloads a run over a file per split
        from .splits import checked_split_sources

        if checked_split_sources(info["dataset"]["split_sources"]) is None:
            raise damaged("run.json", where, "dataset.split_sources is not a list of {name, spec, sha256, "
                          "num_samples}")
    if info.get("owner") is not None:
        _check_fields(info["owner"], _OWNER, "run.json", where, "owner.")
    spectrogram = (info.get("preprocessing") or {}).get("spectrogram")
    if spectrogram is not None:
        _check_spectrogram(spectrogram, where)
    if not info["class_names"]:
        raise damaged("run.json", where, "it names no class")
    if info["num_samples"] < 0:
        raise damaged("run.json", where, "num_samples is negative")


def _check_spectrogram(spectrogram, where) -> None:
    """preprocessing.spectrogram: positive whole rates and lengths, and at least one finite, non-negative, increasing
    bin frequency (the page labels the frequency axis with them and divides by the sample rate)."""
    prefix = "preprocessing.spectrogram."
    if not isinstance(spectrogram, dict):
        raise damaged("run.json", where, "preprocessing.spectrogram is not an object")
    _check_fields(spectrogram, _SPECTROGRAM, "run.json", where, prefix)
    for key in ("sample_rate", "hop_length", "n_fft"):
        if key in spectrogram and spectrogram[key] <= 0:
            raise damaged("run.json", where, f"{prefix}{key} is not positive")
    frequencies = np.asarray(spectrogram["mel_frequencies_hz"], dtype=np.float64)
    if frequencies.size == 0 or not np.isfinite(frequencies).all() or (frequencies < 0).any() or \
            (np.diff(frequencies) <= 0).any():
        raise damaged("run.json", where, f"{prefix}mel_frequencies_hz is not a list of finite, non-negative, "
                                         f"increasing frequencies")


# --------------------------------------------------------------------------------------- samples.parquet, probs.npy

CORE_COLUMNS = ("id", "label", "pred", "confidence", "loss", "correct")


REGRESSION_COLUMNS = ("target", "prediction", "residual", "abs_error")
MULTILABEL_COLUMNS = ("labels_wrong", "hamming_error", "missed", "false_alarms")
# each task's own columns beside the core ones (tasks.Task.sample_columns)
TASK_COLUMNS = {"regression": REGRESSION_COLUMNS, "multilabel": MULTILABEL_COLUMNS}


def check_samples(samples: pd.DataFrame, *, num_samples: int, num_classes: int, where,
                  task: str = "classification") -> None:
    """One row per sample with the core columns; classes index class_names; `correct` is pred == label; ids are
    unique (links and selections name samples by id). A regression's label and pred are real numbers, beside its
    target, prediction, residual and abs_error columns, which agree with them."""
    rel = "samples.parquet"
    missing = [c for c in CORE_COLUMNS + TASK_COLUMNS.get(task, ()) if c not in samples]
    if missing:
        raise damaged(rel, where, f"it lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    if len(samples) != num_samples:
        raise damaged(rel, where, f"it has {len(samples)} rows for {num_samples} samples")
    if not _unique(samples["id"]):
        raise damaged(rel, where, "two samples share an id")
    if task == "regression":
        _check_regression_samples(samples, rel, where)
        return
    if task == "multilabel":
        _check_multilabel_samples(samples, rel, where, num_classes)
        what = "the predicted labels equal the true ones"
    else:
        for column in ("label", "pred"):
            _check_classes(samples[column], rel, column, where, num_classes)
        _check_finite_numbers(samples, ("confidence", "loss"), rel, where)
        confidence = samples["confidence"].to_numpy()
        if num_samples and (confidence.min() < 0 or confidence.max() > 1.0001):
            raise damaged(rel, where, "'confidence' lies outside [0, 1]")
        what = "pred equals label"
    correct = samples["correct"]
    if not pd.api.types.is_bool_dtype(correct) or not np.array_equal(
            correct.to_numpy(dtype=bool), samples["label"].to_numpy() == samples["pred"].to_numpy()):
        raise damaged(rel, where, f"'correct' does not say whether {what}")


def _unique(ids: pd.Series) -> bool:
    from .sample_table import ids_unique

    return ids_unique(ids.to_numpy()) if pd.api.types.is_integer_dtype(ids) else not ids.duplicated().any()


def _check_finite_numbers(samples: pd.DataFrame, columns, rel: str, where) -> None:
    for column in columns:
        values = samples[column]
        if not _is_number(values):
            raise damaged(rel, where, f"{column!r} is not a finite number for every sample")
        # in the column's own type where numpy's: a float32 column is not copied to float64
        array = values.to_numpy() if isinstance(values.dtype, np.dtype) else \
            values.to_numpy(np.float64, na_value=np.nan)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise damaged(rel, where, f"{column!r} is not a finite number for every sample")


def _check_regression_samples(samples: pd.DataFrame, rel: str, where) -> None:
    _check_finite_numbers(samples, ("label", "pred", "loss", "residual", "abs_error"), rel, where)
    label, pred = samples["label"].to_numpy(np.float64), samples["pred"].to_numpy(np.float64)
    if not (np.array_equal(label, samples["target"].to_numpy(np.float64))
            and np.array_equal(pred, samples["prediction"].to_numpy(np.float64))
            and np.allclose(samples["residual"].to_numpy(np.float64), pred - label)
            and np.allclose(samples["abs_error"].to_numpy(np.float64), np.abs(pred - label))):
        raise damaged(rel, where, "its target, prediction, residual and abs_error disagree with label and pred")
    if not pd.api.types.is_bool_dtype(samples["correct"]):
        raise damaged(rel, where, "'correct' is not true or false for every sample")


def _check_multilabel_samples(samples: pd.DataFrame, rel: str, where, num_labels: int) -> None:
    for column in ("label", "pred", "missed", "false_alarms"):
        if not all(isinstance(v, str) for v in samples[column]):
            raise damaged(rel, where, f"{column!r} is not text (a set of labels) for every sample")
    _check_finite_numbers(samples, ("confidence", "loss", "hamming_error"), rel, where)
    wrong = samples["labels_wrong"]
    if not pd.api.types.is_integer_dtype(wrong) or len(wrong) and (wrong.min() < 0 or wrong.max() > num_labels):
        raise damaged(rel, where, f"'labels_wrong' is not a count of 0..{num_labels} labels for every sample")


def check_label_matrix(labels: np.ndarray, samples: pd.DataFrame, *, num_labels: int, probs: np.ndarray,
                       threshold: float, where) -> None:
    """A multi-label run's labels.npy: (N, K) 0/1, whose disagreements with the thresholded probabilities are
    samples.parquet's labels_wrong."""
    rel = "labels.npy"
    if labels.shape != (len(samples), num_labels) or labels.dtype.kind not in "iub":
        raise damaged(rel, where, f"its shape is {labels.shape} {labels.dtype}, not {len(samples)} samples x "
                                  f"{num_labels} labels of 0 or 1")
    wrong = samples["labels_wrong"].to_numpy()
    for start in range(0, len(labels), ROWS_PER_CHECK):
        chunk = np.asarray(labels[start:start + ROWS_PER_CHECK])
        if not np.isin(chunk, (0, 1)).all():
            raise damaged(rel, where, "it holds values other than 0 and 1")
        pred = np.asarray(probs[start:start + ROWS_PER_CHECK]) >= threshold
        if not np.array_equal((pred != chunk.astype(bool)).sum(axis=1), wrong[start:start + ROWS_PER_CHECK]):
            raise damaged(rel, where, "its labels disagree with samples.parquet's labels_wrong")


def check_probs(probs: np.ndarray, samples: pd.DataFrame, *, num_classes: int, where,
                task: str = "classification") -> None:
    """(N, K) probabilities, finite, in [0, 1], rows summing to 1, whose argmax is samples.parquet's `pred`; for a
    regression, (N, 1) predicted values equal to its `pred`, or (N, 2) means equal to `pred` and positive variances."""
    rel = "probs.npy"
    if task == "regression":  # (N, 1) values, or (N, 2) a Gaussian's mean and variance
        width = num_classes if num_classes in (1, 2) else 1
        if probs.shape != (len(samples), width) or probs.dtype.kind != "f":
            raise damaged(rel, where, f"its shape is {probs.shape}, not {len(samples)} samples x "
                                      f"{'a mean and a variance' if width == 2 else '1 predicted value'}")
        if not np.allclose(np.asarray(probs[:, 0], np.float64), samples["pred"].to_numpy(np.float64), rtol=1e-6,
                           atol=1e-6):
            raise damaged(rel, where, "its predicted values disagree with samples.parquet's pred")
        if width == 2:
            variance = np.asarray(probs[:, 1], np.float64)
            if not (np.isfinite(variance).all() and (variance > 0).all()):
                raise damaged(rel, where, "its predicted variances are not all positive finite numbers")
        return
    if probs.ndim != 2 or probs.shape != (len(samples), num_classes):
        raise damaged(rel, where, f"its shape is {probs.shape}, not {len(samples)} samples x {num_classes} classes")
    if probs.dtype.kind != "f":
        raise damaged(rel, where, f"it holds {probs.dtype}, not floating-point probabilities")
    if task == "multilabel":  # each label's own probability: in [0, 1], rows need not sum to 1
        for start in range(0, len(probs), ROWS_PER_CHECK):
            chunk = np.asarray(probs[start:start + ROWS_PER_CHECK], dtype=np.float64)
            if not np.isfinite(chunk).all() or (chunk < 0).any() or (chunk > 1.0001).any():
                raise damaged(rel, where, "it holds values that are not probabilities")
        return
    pred, confidence = samples["pred"].to_numpy(), samples["confidence"].to_numpy()
    ones = np.ones(num_classes, dtype=np.float64)
    # in the file's own type (a float32 run is not copied to float64), a few passes per chunk: 10M x 2 in 0.15 s
    for start in range(0, len(probs), ROWS_PER_CHECK):
        chunk = np.asarray(probs[start:start + ROWS_PER_CHECK])
        stop = start + len(chunk)
        # min and max are NaN where any value is, and infinite where any is: both fail the bounds
        if not (chunk.min() >= 0 and chunk.max() <= 1.0001 and np.abs(chunk @ ones - 1.0).max() <= 1e-3):
            raise damaged(rel, where, "it holds values that are not probabilities")
        if not np.array_equal(chunk.argmax(axis=1), pred[start:stop]):
            raise damaged(rel, where, "its most likely classes disagree with samples.parquet's pred")
        # `confidence` is the top probability: what the dashboard's calibration and findings read in its place
        top = np.take_along_axis(chunk, pred[start:stop, None].astype(np.intp), axis=1)[:, 0]
        if not np.abs(top - confidence[start:stop]).max() <= 1e-6:
            raise damaged(rel, where, "its top probabilities disagree with samples.parquet's confidence")


def _is_number(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _check_classes(values: pd.Series, rel: str, column: str, where, num_classes: int) -> None:
    if not pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise damaged(rel, where, f"{column!r} holds {values.dtype}, not class indices")
    if len(values) and (values.min() < 0 or values.max() >= num_classes):
        raise damaged(rel, where, f"{column!r} holds classes outside 0..{num_classes - 1}")


# ------------------------------------------------------------------------------------------- the analyses' files
# Column kinds: text (strings), number, class (an index into class_names), list (of sample ids), any.
# Tables with `per_sample` have one row per sample (the embedding page places every sample).
_TABLES = {
    "slices.parquet": ({"source": "text", "description": "text", "size": "number", "error_rate": "number",
                        "lift": "number", "ids": "list"}, False),
    "label_noise.parquet": ({"id": "any", "label": "class", "suggested_label": "class", "score": "number"}, False),
    "gradients/traces.parquet": ({"kind": "text", "batch": "number", "layer": "text", "grad_norm": "number"}, False),
    "gradients/dead_units.parquet": ({"layer": "text", "dead_fraction": "number"}, False),
    "projections/*.parquet": ({"id": "any", "x": "number", "y": "number"}, True),
    "explanations/faithfulness.parquet": ({"id": "any", "method": "text", "target": "any"}, False),
    # data health (analyzers.data_health.stage): the Data health page and the Overview's problems read these
    "duplicates.parquet": ({"id_a": "any", "id_b": "any", "kind": "text", "distance": "number"}, False),
    "outliers.parquet": ({"id": "any", "score": "number"}, True),
}
# a run over splits: per-split metrics and the train-test gap (stage.split_metrics), which the Overview prints
_SPLIT_FIELDS = (("splits", "mapping", False), ("split_gap", "mapping", False))
# JSON files: the fields a page reads, each optional unless marked required (older runs lack some).
_JSON = {
    "metrics.json": (("accuracy", "number", True), ("balanced_accuracy", "number", True), ("log_loss", "number", True),
                     ("ece", "number", True), ("roc_auc_ovr", "number?", False),
                     ("classification_report", "mapping", False), ("per_class", "mapping", False),
                     ("top_k_accuracy", "mapping", False), *_SPLIT_FIELDS),
    # a regression's metrics (the task's own file rules: `check_json(..., task="regression")`)
    "metrics.json#regression": (("mse", "number", True), ("rmse", "number", True), ("mae", "number", True),
                                ("r2", "number?", True), ("median_absolute_error", "number", True),
                                ("mape", "number?", False), ("interval_coverage", "mapping", False),
                                ("gaussian_nll", "number", False), *_SPLIT_FIELDS),
    # a multi-label run's metrics (tasks.MultiLabel.metrics)
    "metrics.json#multilabel": (("subset_accuracy", "number", True), ("hamming_loss", "number", True),
                                ("roc_auc_macro", "number?", False), ("average_precision_macro", "number?", False),
                                ("classification_report", "mapping", True), ("prevalence", "mapping", True),
                                *_SPLIT_FIELDS),
    # per label: its 2x2 matrix, calibration and threshold metrics, and which labels are missed together
    "multilabel.json": (("labels", "records", True), ("co_missed", "records", True),
                        ("threshold", "number|numbers", True), ("co_missed_matrix", "matrix", False)),
    # a multi-label run's chosen threshold per label (thresholds.save_label_thresholds), in the labels' order
    "thresholds.json#multilabel": (("per_label", "numbers", True), ("labels", "texts", False),
                                   ("cost_fp", "number", False), ("cost_fn", "number", False)),
    # the decision threshold a person chose (thresholds.save_threshold): class `positive` when p >= `threshold`
    "thresholds.json": (("positive", "int", True), ("threshold", "number", True), ("cost_fp", "number", False),
                        ("cost_fn", "number", False)),
    "gradients/flags.json": (("vanishing", "texts", False), ("exploding", "texts", False),
                             ("dead_relu_layers", "mapping", False), ("inplace_activations", "texts", False),
                             ("thresholds", "mapping", False), ("params", "mapping", False),
                             ("timings_s", "mapping", False)),
    "confusion.json": (),
    "gradients/overfit_check.json": (),
    "projections/*.json": (("method", "text", False), ("options", "mapping", False)),
    "shift.json": (("train", "text", True), ("pairs", "records", True)),
    "outliers.json": (("method", "text", True), ("regions", "records", True)),
    "inputs.json": (("grid_ids", "mapping", True), ("corrupted_ids", "records", True), ("flags", "records", True)),
    "data_health.json": (("problems", "records", True), ("skipped", "mapping", False)),
    "findings.json": (("findings", "records", True),),
}
# What each kind of finding holds (analyzers.evaluation.findings): the Overview and the report word them from these
# and link to their samples by the class indices and slice numbers (checked in range: _check_findings).
_FINDING_DETAILS = {
    "slice": (("index", "int", True), ("description", "text", True), ("size", "int", True), ("errors", "int", True),
              ("error_rate", "number", True), ("lift", "number", True), ("source", "text", True)),
    "confusion": (("true", "int", True), ("pred", "int", True), ("count", "int", True),
                  ("share_of_true", "number", True)),
    "imbalance": (("rare", "ints", True), ("recall", "mapping", True), ("support", "mapping", True),
                  ("ratio", "number", True), ("overall_recall", "number", True)),
    "calibration": (("ece", "number", True), ("noise_floor", "number", True), ("mean_confidence", "number", True),
                    ("accuracy", "number", True), ("direction", "text", True)),
    "label_noise": (("count", "int", True), ("errors", "int", True), ("top_id", "text|int|number", True),
                    ("top_label", "int", True), ("top_suggested", "int", True)),
}
# Arrays with one row per sample.
_ARRAYS = ("embeddings/*.npy",)


def _rule(rules: dict, relpath: str):
    for pattern, rule in rules.items():
        if fnmatch.fnmatchcase(relpath, pattern):
            return rule
    return None


def check_table(relpath: str, table: pd.DataFrame, *, num_samples: int, num_classes: int, where,
                rows: int | None = None) -> None:
    """A run's table by its file's rule: its columns, their kinds and values, and one row per sample where the rule
    says so. With `rows`, `table` is the file's schema only (no rows: `Run.check_every_file`'s footer check of a
    large table) and `rows` its row count; its values are checked when it is read."""
    rule = _rule(_TABLES, relpath)
    if rule is None:
        return
    columns, per_sample = rule
    for column, kind in columns.items():
        if column not in table.columns:
            raise damaged(relpath, where, f"it has no {column!r} column")
        values = table[column]
        if kind == "number" and not _is_number(values):
            raise damaged(relpath, where, f"{column!r} holds {values.dtype}, not numbers")
        if kind == "class":
            _check_classes(values, relpath, column, where, num_classes)
        if kind == "text" and not values.map(lambda v: isinstance(v, str)).all():
            raise damaged(relpath, where, f"{column!r} holds values that are not strings")
        if kind == "list" and not values.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).all():
            raise damaged(relpath, where, f"{column!r} holds values that are not lists of sample ids")
    rows = len(table) if rows is None else rows
    if per_sample and rows != num_samples:
        raise damaged(relpath, where, f"it has {rows} rows for {num_samples} samples")


# What each record of a JSON list holds, where a page reads its fields: multilabel.json's per-label rows
# (multilabel.per_label_report) and its pairs (multilabel.co_missed).
_RECORDS = {
    "shift.json": {"pairs": (("a", "text", True), ("b", "text", True), ("domain_auc", "number?", True),
                             ("mmd", "number?", True), ("mmd_p", "number?", True), ("features", "records", True),
                             ("embedding", "mapping?", True), ("slices", "records", False))},
    "outliers.json": {"regions": (("size", "int", True), ("error_rate", "number?", True), ("ids", "list", True))},
    "inputs.json": {"corrupted_ids": (("reason", "text", True),),
                    "flags": (("code", "text", True), ("message", "text", True))},
    "data_health.json": {"problems": (("kind", "text", True), ("title", "text", True), ("detail", "text", True),
                                      ("ids", "list", True), ("page", "text", True), ("section", "text", False))},
    "multilabel.json": {
        "labels": (("label", "text", True), ("support", "int", True), ("prevalence", "number", True),
                   ("tn", "int", True), ("fp", "int", True), ("fn", "int", True), ("tp", "int", True),
                   ("precision", "number", True), ("recall", "number", True), ("f1", "number", True),
                   ("roc_auc", "number?", True), ("average_precision", "number?", True), ("ece", "number", True),
                   ("calibration", "mapping", True), ("best_f1_threshold", "number", True),
                   ("best_f1", "number", True)),
        "co_missed": (("label_a", "text", True), ("label_b", "text", True), ("together", "int", True),
                      ("both_missed", "int", True), ("rate", "number", True), ("expected", "number", True),
                      ("lift", "number?", True)),
    },
}


def _check_per_label_lengths(relpath: str, obj: dict, where, num_labels: int) -> None:
    """A multi-label file's per-label lists hold one entry per label (their order is the labels')."""
    lists = {"multilabel.json": ("labels", "threshold", "co_missed_matrix"),
             "thresholds.json": ("per_label", "labels")}.get(relpath, ())
    for key in lists:
        value = obj.get(key)
        if isinstance(value, list) and len(value) != num_labels:
            raise damaged(relpath, where, f"{key!r} holds {len(value)} entries for {num_labels} labels")
    matrix = obj.get("co_missed_matrix") if relpath == "multilabel.json" else None
    if matrix and any(len(row) != num_labels for row in matrix):
        raise damaged(relpath, where, f"'co_missed_matrix' is not {num_labels} x {num_labels}")
    cuts = obj.get("per_label" if relpath == "thresholds.json" else "threshold") if lists else None
    if cuts is not None and not all(0 <= c <= 1 for c in np.atleast_1d(np.asarray(cuts, dtype=np.float64))):
        raise damaged(relpath, where, "a threshold lies outside [0, 1]")


def check_json(relpath: str, obj, *, where, task: str = "classification", num_classes: int | None = None) -> None:
    fields = _JSON.get(f"{relpath}#{task}") or _rule(_JSON, relpath)
    if fields is None:
        return
    if not isinstance(obj, dict):
        raise damaged(relpath, where, "it is not a JSON object")
    _check_fields(obj, fields, relpath, where)
    for key, record_fields in _RECORDS.get(relpath, {}).items():
        for i, record in enumerate(obj.get(key, ())):
            _check_fields(record, record_fields, relpath, where, prefix=f"{key}[{i}].")
    if task == "multilabel" and num_classes is not None:
        _check_per_label_lengths(relpath, obj, where, num_classes)
    if relpath == "findings.json":
        _check_findings(obj["findings"], where, num_classes)


def _check_findings(records: list, where, num_classes: int | None) -> None:
    relpath = "findings.json"
    for i, record in enumerate(records):
        prefix = f"findings[{i}]."
        _check_fields(record, (("kind", "text", True), ("impact", "number", True), ("details", "mapping", True)),
                      relpath, where, prefix)
        fields = _FINDING_DETAILS.get(record["kind"])
        if fields is None:
            raise damaged(relpath, where, f"{prefix}kind {record['kind']!r} is not a kind of finding")
        details = record["details"]
        _check_fields(details, fields, relpath, where, prefix + "details.")
        classes = [details[k] for k in ("true", "pred", "top_label", "top_suggested") if k in details]
        if record["kind"] == "imbalance":
            for key in ("recall", "support"):
                if not all(k.lstrip("-").isdigit() and _kind_ok(v, "number" if key == "recall" else "int")
                           for k, v in details[key].items()):
                    raise damaged(relpath, where, f"{prefix}details.{key!r} is not class indices to "
                                  f"{'numbers' if key == 'recall' else 'integers'}")
            if any(str(c) not in details["recall"] or str(c) not in details["support"] for c in details["rare"]):
                raise damaged(relpath, where, f"{prefix}details names a rare class without its recall and support")
            classes += details["rare"] + [int(k) for k in details["recall"]] + [int(k) for k in details["support"]]
        if num_classes is not None and any(not 0 <= c < num_classes for c in classes):
            raise damaged(relpath, where, f"{prefix}details names a class outside 0..{num_classes - 1}")
        if record["kind"] == "slice" and details["index"] < 0:
            raise damaged(relpath, where, f"{prefix}details.'index' is negative")
        if record["kind"] == "calibration" and details["direction"] not in ("under", "over"):
            raise damaged(relpath, where, f"{prefix}details.'direction' is neither 'under' nor 'over'")


def check_array(relpath: str, array: np.ndarray, *, num_samples: int, where) -> None:
    """Checked from the header (shape and type), so a memory-mapped array is not read whole."""
    if not any(fnmatch.fnmatchcase(relpath, pattern) for pattern in _ARRAYS):
        return
    if array.ndim != 2 or array.shape[0] != num_samples:
        raise damaged(relpath, where, f"its shape is {array.shape}, not {num_samples} samples x features")
    if array.dtype.kind not in "fiu":
        raise damaged(relpath, where, f"it holds {array.dtype}, not numbers")
