"""The evaluation stage of a run, and CSV exports of its tables.

Writes into the run directory:
- `metrics.json`: accuracy, balanced_accuracy, log_loss, roc_auc_ovr (macro), top_k_accuracy {k: value}, ece (top label,
  equal-width bins), ece_quantile (equal-mass bins), classification_report (scikit-learn's dict: per class, "macro
  avg", "weighted avg"), calibration {uniform|quantile: {top_label, per_class: {name: bins}}};
- `confusion.json`: counts, normalized {true, pred, all}, cells [{true, pred, count, ids}] (at most
  `metrics.CELL_IDS_LISTED` ids a cell), most_confused (directed cells) and most_confused_pairs (either way);
- `slices.parquet`: see `analyzers.evaluation.slices.find_slices` (source, description, size, errors, error_rate, lift, score,
  ids, conditions, cluster, ece, ece_rest, merged), best first; `merged` (JSON, read it with `merged_slices`) lists the
  slices merged into each: near-copies, slices mostly inside it failing no more than its rest, and broader slices
  holding most of it whose other samples fail no more than the data outside both;
- `label_noise.parquet`: see `analyzers.evaluation.label_noise.find_label_issues` (id, label, suggested_label, score, ...);
- `findings.json` (a classifier's): `analyzers.evaluation.findings.rank_findings` on the tables above, best first.
Error rankings are views of `samples.parquet`: `analyzers.evaluation.metrics.rank_errors(samples, probs, by=...)`.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalyzerError
from ..loading.runs import write_json, write_parquet

METRICS = "metrics.json"
CONFUSION = "confusion.json"
SLICES = "slices.parquet"
LABEL_NOISE = "label_noise.parquet"
# stage_options["evaluation"] keys and what they go to
OPTIONS = {"n_bins": "calibration bins", "min_size": "smallest slice", "max_depth": "depth of the slice tree",
           "n_clusters": "embedding clusters", "alpha": "slice score weight of error rate against size",
           "max_slices": "slices kept per source", "top_confused": "confused pairs listed"}


def evaluate(samples: pd.DataFrame, probs, *, class_names=None, embeddings=None, layer: str | None = None,
             exclude_columns=(), seed: int = 0, n_bins: int = 10, min_size: int | None = None, max_depth: int = 3,
             n_clusters: int | None = None, alpha: float = 0.95, max_slices: int = 20, task=None,
             labels=None) -> dict:
    """Everything the stage writes, as objects: {"metrics": dict, "confusion": Confusion or None, "slices":
    DataFrame, "label_noise": LabelNoise or None, "skipped": {analysis: reason}, "timings": dict}. Pure: usable on
    any subset of a run's samples. `task` (`tasks.Task`) defaults to classification over the columns of `probs`;
    the confusion matrix, calibration and label noise apply to tasks with classes; the per-label report and the
    co-missed labels (`multilabel.multilabel_report`, under "multilabel") to multi-label tasks, whose `labels` are
    the (N, K) multi-hot matrix (samples.parquet holds them as text)."""
    from .label_noise import find_label_issues
    from .metrics import calibration_report, confusion, expected_calibration_error
    from .slices import find_slices, rule_columns
    from .tasks import Classification

    probs = np.asarray(probs)
    task = task or Classification(int(probs.shape[1]))
    timings, skipped = {}, {}
    t0 = time.perf_counter()
    labels = samples["label"].to_numpy() if labels is None else np.asarray(labels)
    ids = samples["id"].to_numpy()
    metrics = task.metrics(labels, probs, names=class_names)
    conf = noise = None
    if task.has_classes:
        metrics["ece"] = expected_calibration_error(labels, probs, n_bins=n_bins, strategy="uniform")
        metrics["ece_quantile"] = expected_calibration_error(labels, probs, n_bins=n_bins, strategy="quantile")
        metrics["calibration"] = calibration_report(labels, probs, class_names=class_names, n_bins=n_bins)
        timings["metrics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conf = confusion(labels, probs.argmax(1), num_classes=probs.shape[1], ids=ids, class_names=class_names)
        timings["confusion"] = time.perf_counter() - t0
    else:
        timings["metrics"] = time.perf_counter() - t0
        for name in ("confusion", "calibration", "label_noise"):
            skipped[name] = task.no_classes_reason
    per_label = None
    if task.per_label:
        from .multilabel import multilabel_report

        t0 = time.perf_counter()
        per_label = multilabel_report(labels, probs, names=class_names, threshold=task.threshold, n_bins=n_bins)
        timings["per_label"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a regression's label and pred are real values, not classes: its rules may use the target (a number) instead
    columns = [c for c in rule_columns(samples) if c not in set(exclude_columns)
               and (task.rules_on_labels or c not in ("label", "pred"))]
    slices = find_slices(samples, embeddings=embeddings, probs=probs if task.has_classes else None,
                         class_names=class_names if task.has_classes else None, layer=layer,
                         columns=columns, min_size=min_size, max_depth=max_depth, n_clusters=n_clusters, alpha=alpha,
                         max_slices=max_slices, seed=seed)
    timings["slices"] = time.perf_counter() - t0
    if task.has_classes:
        t0 = time.perf_counter()
        noise = find_label_issues(labels, probs, ids=ids, class_names=class_names)
        timings["label_noise"] = time.perf_counter() - t0
    return {"metrics": metrics, "confusion": conf, "slices": slices, "label_noise": noise, "skipped": skipped,
            "timings": timings, "multilabel": per_label}


def evaluation_stage(ctx) -> dict:
    """Pipeline stage: writes metrics.json, confusion.json, slices.parquet, label_noise.parquet and a classifier's
    ranked findings (findings.json) into the run."""
    options = dict((ctx.params.get("stage_options") or {}).get("evaluation") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise AnalyzerError(f"unknown evaluation options {', '.join(unknown)}: choose from {', '.join(OPTIONS)}")
    top_confused = options.pop("top_confused", 10)
    from .tasks import task_of

    task = task_of(ctx.model)
    result = evaluate(ctx.samples, ctx.predictions.probs, class_names=ctx.class_names,
                      embeddings=ctx.predictions.embeddings, layer=ctx.predictions.embedding_layer,
                      exclude_columns=ctx.dataset.ground_truth_columns, seed=ctx.params.get("seed", 0), task=task,
                      labels=ctx.dataset.y, **options)
    splits = split_metrics(ctx.samples, ctx.predictions.probs, ctx.dataset.y, task=task,
                           class_names=ctx.class_names, n_bins=options.get("n_bins", 10))
    if splits is not None:
        result["metrics"].update(splits)
    write_json(ctx.path(METRICS), result["metrics"])
    if result["confusion"] is not None:
        write_json(ctx.path(CONFUSION), result["confusion"].to_dict(top=top_confused))
    write_parquet(ctx.path(SLICES), result["slices"])
    if result["label_noise"] is not None:
        write_parquet(ctx.path(LABEL_NOISE), result["label_noise"].table)
    if result["multilabel"] is not None:
        from .multilabel import MULTILABEL

        write_json(ctx.path(MULTILABEL), result["multilabel"])
    if task.has_classes and not task.per_label and len(ctx.class_names) >= 2:  # where the Overview ranks them
        from .findings import FINDINGS, findings_to_json, rank_findings

        noise = result["label_noise"].table if result["label_noise"] is not None else None
        write_json(ctx.path(FINDINGS), findings_to_json(rank_findings(
            ctx.samples, num_classes=len(ctx.class_names), slices=result["slices"], label_noise=noise)))
    slices = result["slices"]
    summary = {**task.headline(result["metrics"]),
               "num_slices": int(len(slices)),
               "top_slice": slices["description"].iloc[0] if len(slices) else None,
               "timings_s": {k: round(v, 4) for k, v in result["timings"].items()}}
    if result["multilabel"] is not None and result["multilabel"]["co_missed"]:
        top = result["multilabel"]["co_missed"][0]
        summary["top_co_missed"] = [top["label_a"], top["label_b"]]
    if task.has_classes:
        summary.update(ece=result["metrics"]["ece"], num_label_suspects=int(len(result["label_noise"].table)),
                       estimated_label_issues=result["label_noise"].estimated_issues)
    if result["skipped"]:
        summary["skipped"] = result["skipped"]
    if splits is not None and splits["split_gap"]:
        summary["split_gap"] = splits["split_gap"]
    return summary


def split_metrics(samples: pd.DataFrame, probs, labels, *, task, class_names=None, n_bins: int = 10) -> dict | None:
    """metrics.json's `splits` ({split: the task's metrics on its rows, with num_samples, error_rate, mean_loss and,
    for tasks with classes, ece}) and `split_gap` (the evaluation split against the training split,
    `splits.train_and_eval`: per headline metric, and for the error rate and the mean loss, {train, eval, gap =
    eval - train}; the loss gap is the overfitting indicator). None for a run over one dataset."""
    from ..loading.splits import SPLIT_COLUMN, split_names, train_and_eval
    from .metrics import expected_calibration_error

    names = split_names(samples)
    if not names:
        return None
    column = samples[SPLIT_COLUMN].astype(str).to_numpy()
    probs, labels = np.asarray(probs), np.asarray(labels)
    per_split = {}
    for name in names:
        rows = np.flatnonzero(column == name)
        values = task.metrics(labels[rows], probs[rows], names=class_names)
        if task.has_classes:
            values["ece"] = expected_calibration_error(labels[rows], probs[rows], n_bins=n_bins, strategy="uniform")
        values.update(num_samples=int(len(rows)),
                      error_rate=float(1.0 - samples["correct"].to_numpy()[rows].mean()),
                      mean_loss=float(np.nanmean(samples["loss"].to_numpy(dtype=np.float64)[rows])))
        per_split[name] = values
    train, evaluation = train_and_eval(names)
    gap = {}
    if train is not None:
        gap = {"train": train, "eval": evaluation, "metrics": {}}
        for key in (*task.headline(per_split[train]), "error_rate", "mean_loss"):
            a, b = per_split[train].get(key), per_split[evaluation].get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a is not None and b is not None:
                gap["metrics"][key] = {"train": float(a), "eval": float(b), "gap": float(b) - float(a)}
    return {"splits": per_split, "split_gap": gap}


# ------------------------------------------------------------------------------------------------------------ export

def _names_column(codes, class_names):
    if class_names is None:
        return codes
    return np.asarray([str(c) for c in class_names], dtype=object)[np.asarray(codes, dtype=np.int64)]


# OWASP (CSV injection): a cell starting with one of these is a formula in Excel, LibreOffice and Google Sheets.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A cell that a spreadsheet shows as text: a text cell starting a formula gets a quote before it."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def to_csv(table: pd.DataFrame) -> str:
    """`table` as CSV that is safe to open in a spreadsheet: every text cell and column name that would start a
    formula (ids, class names, metadata from an upload) is quoted; numbers are left as they are."""
    out = table.copy()
    out.columns = [csv_cell(str(c)) for c in out.columns]
    for position in range(out.shape[1]):
        column = out.iloc[:, position]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            out.isetitem(position, column.map(csv_cell))
    return out.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)  # a text cell holding "\r" stays one cell


def _write_csv(table: pd.DataFrame, path) -> str:
    text = to_csv(table)
    if path is not None:
        Path(path).write_text(text)
    return text


def slices_csv(slices: pd.DataFrame, path: str | Path | None = None) -> str:
    """slices.parquet as CSV (member ids space-separated in one cell); written to `path` if given, returned."""
    if "ids" not in slices.columns:
        raise AnalyzerError("not a slices table: expected an ids column (read slices.parquet from a run)")
    table = slices.assign(ids=[" ".join(map(str, ids)) for ids in slices["ids"]])
    return _write_csv(table, path)


def errors_csv(samples: pd.DataFrame, probs=None, path: str | Path | None = None, *, by: str = "confident_wrong",
               class_names=None, limit: int | None = None) -> str:
    """An error ranking (see `analyzers.evaluation.metrics.RANKINGS`) as CSV, with class names beside label and prediction."""
    from .metrics import rank_errors

    table = rank_errors(samples, probs, by=by, limit=limit)
    table = table.assign(label_name=_names_column(table["label"], class_names),
                         pred_name=_names_column(table["pred"], class_names))
    return _write_csv(table, path)


def suspects_csv(label_noise: pd.DataFrame, path: str | Path | None = None, *, class_names=None) -> str:
    """label_noise.parquet as CSV, with class names beside the given and suggested labels."""
    missing = [c for c in ("id", "label", "suggested_label", "score") if c not in label_noise.columns]
    if missing:
        raise AnalyzerError(f"not a label-noise table: {', '.join(missing)} missing (read label_noise.parquet)")
    table = label_noise.assign(label_name=_names_column(label_noise["label"], class_names),
                               suggested_name=_names_column(label_noise["suggested_label"], class_names))
    return _write_csv(table, path)
