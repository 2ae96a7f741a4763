"""What a run's pages and its report say about it, computed from the run with no Streamlit.

The pages call these through `dashboard.data`, which caches them per run; the HTML report (`dashboard.report`) and
the notebook entry point call them directly. One copy of each, so a page and a report of the same run never
disagree.
"""
from __future__ import annotations

import numpy as np

from analyzers.loading.runs import Run

from .text import md


def optional_table(run: Run, relpath: str):
    """A parquet table of the run, or None when this run does not have that analysis."""
    return run.read_parquet(relpath) if run.has(relpath) else None


def optional_json(run: Run, relpath: str):
    return run.read_json(relpath) if run.has(relpath) else None


def task_named_for(run: Run):
    """The run's task as run.json names it, at its default threshold."""
    from analyzers.evaluation.tasks import task_named

    return task_named(run.task, len(run.class_names))


def run_task(run: Run, stored_thresholds=None):
    """The run's task (`analyzers.evaluation.tasks`) at `stored_thresholds` (thresholds.json, where a multi-label
    run has it): what its outputs mean and how it ranks its errors."""
    from analyzers.evaluation.thresholds import task_at

    task = task_named_for(run)
    return task_at(task, stored_thresholds) if task.per_label else task


def metrics(run: Run, task=None) -> dict:
    """Headline metrics and the per-class report: metrics.json if the run has it, else analyzers.evaluation.metrics
    on the run. `task` is the run's task at its stored thresholds (default: `run_task` of thresholds.json)."""
    from analyzers.evaluation import metrics as m
    from analyzers.evaluation.thresholds import THRESHOLDS

    task = task if task is not None else run_task(run, optional_json(run, THRESHOLDS))
    if not task.has_classes:  # a regression's or a multi-label run's own metrics (tasks.Task.metrics)
        # metrics.json is taken at the task's default threshold: stored per-label thresholds are computed afresh
        at_default = task == task_named_for(run)
        return run.read_json("metrics.json") if run.has("metrics.json") and at_default else task.metrics(
            run.labels, run.probs, names=run.class_names)
    if run.has("metrics.json"):
        stored = run.read_json("metrics.json")
        if "classification_report" in stored or "per_class" in stored:
            stored.setdefault("classification_report", stored.get("per_class"))
            return stored
    labels = run.sample_table["label"].to_numpy()
    result = m.classification_metrics(labels, run.probs, class_names=run.class_names)
    result["ece"] = m.expected_calibration_error(labels, run.probs)
    return result


def confusion(run: Run):
    """analyzers.evaluation.metrics.Confusion of a classifier's stored labels and predictions."""
    from analyzers.evaluation import metrics as m

    samples = run.sample_table
    return m.confusion(samples["label"].to_numpy(), samples["pred"].to_numpy(), num_classes=len(run.class_names),
                       ids=samples["id"].to_numpy(), class_names=run.class_names)


def layer_flags(flags: dict) -> dict:
    """gradients/flags.json's flagged layers as {layer: "vanishing" | "exploding"} (what `grad_norm_figure` draws)."""
    return {**{layer: "vanishing" for layer in flags.get("vanishing", [])},
            **{layer: "exploding" for layer in flags.get("exploding", [])}}


def gradient_traces(traces, kind: str):
    """gradients/traces.parquet's gradient norms of `kind` (parameters or activations), one column per layer and
    a row per batch (empty when none was traced)."""
    part = traces[traces["kind"] == kind]
    if part.empty:
        return part
    return part.pivot_table(index="batch", columns="layer", values="grad_norm", sort=False).reset_index()


def readable_samples(run: Run, table, task):
    """The core columns with class names instead of indices, for tables a person reads (a regression's targets
    and predictions, and a multi-label run's label sets, as they are)."""
    import pandas as pd

    label, pred = table["label"].to_numpy(), table["pred"].to_numpy()
    if task.has_classes:
        names = np.asarray(run.class_names, dtype=object)
        label, pred = names[label], names[pred]
    return pd.DataFrame({"id": table["id"].astype(str).to_numpy(), "label": label, "predicted": pred,
                         "confidence": table["confidence"].to_numpy(), "loss": table["loss"].to_numpy(),
                         "correct": table["correct"].to_numpy()})


def multilabel_report(run: Run, task) -> dict:
    """A multi-label run's per-label report and co-missed labels at `task`'s thresholds: multilabel.json, else
    computed on the run (`analyzers.evaluation.multilabel.multilabel_report`)."""
    from analyzers.evaluation.multilabel import MULTILABEL, multilabel_report as report_of

    stored = optional_json(run, MULTILABEL)
    # multilabel.json is taken at the analysis's threshold; a person's per-label thresholds since then are computed
    if stored is not None and np.allclose(np.broadcast_to(np.asarray(stored["threshold"], dtype=np.float64),
                                                          task.thresholds.shape), task.thresholds):
        return stored
    return report_of(run.labels, run.probs, names=run.class_names, threshold=task.threshold)


def reliability(run: Run, strategy: str = "uniform", n_bins: int = 10) -> dict:
    """Top-label calibration bins (`metrics.calibration_bins`) of a classifier, as a dict."""
    return top_label_calibration(run, strategy, n_bins).to_dict()


def top_label_calibration(run: Run, strategy: str = "uniform", n_bins: int = 10):
    """The top-label reliability bins (`metrics.CalibrationBins`) of every sample of a classifier run: those its
    evaluation stage stored (metrics.json, computed from the same probabilities) when they are these bins and count
    every sample, else computed from the samples' `correct` and `confidence` columns (0.6 s of the first page at
    10M rows). Stored bins that fail their check are computed instead."""
    from analyzers.errors import AnalyzerError
    from analyzers.evaluation import metrics as m

    try:
        stored = run.read_json("metrics.json")["calibration"][strategy]["top_label"] if run.has("metrics.json") \
            else None
        bins = m.CalibrationBins.from_dict(stored) if stored is not None else None
    except (AnalyzerError, KeyError, TypeError):
        bins = None
    # uniform bins must be the equal-width ones a selection's are subtracted from (`CalibrationBins.without`)
    if bins is not None and bins.strategy == strategy and len(bins.count) == n_bins and \
            int(bins.count.sum()) == run.num_samples and \
            (strategy != "uniform" or np.array_equal(bins.edges, np.linspace(0.0, 1.0, n_bins + 1))):
        return bins
    run.probs  # checked: `correct` and `confidence` are its top class against the label and its top probability
    return m.calibration_bins(run.sample_table["correct"].to_numpy(dtype=bool),
                              run.sample_table["confidence"].to_numpy(dtype=np.float64), n_bins=n_bins,
                              strategy=strategy)


def findings(run: Run) -> list:
    """The run's ranked findings: as its evaluation stage stored them, else (a run from before they were stored)
    analyzers.evaluation.findings.rank_findings on the run, with its slices and label-noise tables."""
    from analyzers.evaluation.findings import FINDINGS, findings_from_json, rank_findings

    if run.has(FINDINGS):
        return findings_from_json(run.read_json(FINDINGS))
    run.probs  # checked: its top probabilities are the samples' confidence, which the findings read instead
    return rank_findings(run.sample_table, num_classes=len(run.class_names),
                         slices=optional_table(run, "slices.parquet"),
                         label_noise=optional_table(run, "label_noise.parquet"))


def class_name(run: Run, index) -> str:
    names = run.class_names
    try:
        return str(names[int(index)])
    except (IndexError, ValueError, TypeError):
        return str(index)


def percent(fraction: float) -> str:
    """The one way a share is written on every page: one decimal ("5.1%", "4.0%"), so a column never mixes "5.13%"
    with "4%"."""
    return f"{float(fraction):.1%}"


def finding_text(run: Run, finding) -> tuple[str, str, tuple | None]:
    """One finding in plain words, as (Markdown with every value from the run escaped, what it accounts for on the
    ranking's one scale, (page, link text, selection or None) to see its samples, or None)."""
    d = finding.details
    if finding.kind == "slice":
        text = (f"**Errors concentrate in a group:** {md(d['description'])} — {d['size']:,} samples, error rate "
                f"{percent(d['error_rate'])} ({d['lift']:.1f}× the overall rate).")
        return text, f"{finding.impact:.0f} errors more than the overall rate would give", (
            "errors", "See this group", f"slice:{d['index']}")
    if finding.kind == "confusion":
        true, pred = class_name(run, d["true"]), class_name(run, d["pred"])
        text = (f"**Most confused:** true **{md(true)}** predicted as **{md(pred)}** {d['count']:,} times "
                f"({percent(d['share_of_true'])} of {md(true)}).")
        return text, f"{d['count']:,} errors", ("confusion", "See these samples", f"cell:{d['true']}-{d['pred']}")
    if finding.kind == "imbalance":
        rare = ", ".join(f"{md(class_name(run, c))} ({d['support'][c]:,} samples, recall "
                         f"{percent(d['recall'][c])})" for c in d["rare"])
        text = (f"**Class imbalance:** the largest class has {d['ratio']:.0f}× the samples of the smallest, and the "
                f"rare classes are recognised less often: {rare}, against {percent(d['overall_recall'])} overall.")
        return text, f"{finding.impact:.0f} errors of the rare classes beyond the overall rate", (
            "confusion", "See the confusion matrix", None)
    if finding.kind == "calibration":
        way = "under-confident" if d["direction"] == "under" else "over-confident"
        text = (f"**The model is {way}:** its mean confidence is {d['mean_confidence']:.2f} and its accuracy "
                f"{d['accuracy']:.2f} (calibration error {d['ece']:.3f}); its probabilities cannot be read as "
                f"chances. The reliability chart shows where.")
        return text, (f"its confidence misstates the number of right answers by about {finding.impact:.0f} samples, "
                      f"beyond the {d['noise_floor']:.3f} a calibrated model of this size would show"), None
    from analyzers.evaluation.findings import STRONG_SUSPECT  # label_noise

    text = (f"**Label-noise suspects:** {d['count']:,} samples whose label is probably wrong (estimated probability "
            f"at least {STRONG_SUSPECT:g}); the strongest, id {md(d['top_id'])}, is labelled "
            f"{md(class_name(run, d['top_label']))} but looks like {md(class_name(run, d['top_suggested']))}. The "
            f"other {d['errors'] - d['count']:,} errors are ordinary mistakes.")
    return text, f"{d['count']:,} samples to relabel or check", ("errors", "Review the suspects", "suspects:top")


def gradient_flags_text(flags: dict) -> tuple[list, bool]:
    """Training health from gradients/flags.json in Markdown lines, and whether any layer is flagged (not errors,
    so not on the findings' scale)."""
    problems = [f"{md(layer)} (vanishing)" for layer in flags.get("vanishing", [])]
    problems += [f"{md(layer)} (exploding)" for layer in flags.get("exploding", [])]
    dead = {k: v for k, v in (flags.get("dead_relu_layers") or {}).items() if v >= 0.25}
    lines = []
    if problems:
        lines.append(f"**Gradients:** {', '.join(problems)}.")
    if dead:
        lines.append("**Dead units:** " + ", ".join(f"{md(k)} has {percent(v)} of its units never active"
                                                    for k, v in dead.items()) + ".")
    if not lines:
        lines.append("**Gradients:** no vanishing or exploding layer on the loaded data.")
    return lines, bool(problems or dead)
