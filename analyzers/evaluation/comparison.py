"""Compare two runs on the same dataset: where they disagree, which one is right, per-class and per-slice deltas.

`compare_predictions` works on arrays; `compare_runs` on two run directories; `compare_command` is
`python -m analyzers compare RUN_A RUN_B [--out DIR]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalyzerError
from .metrics import check_predictions, expected_calibration_error

TABLES = ("per_class", "per_slice", "disagreements")


@dataclass(frozen=True)
class Comparison:
    """`summary`: each run's headline metrics (the task's), the mean per-sample error of each, how many samples
    each run gets less wrong than the other and the exact sign test of that split (McNemar's exact test when the
    error is right or wrong); for classifiers also accuracy, ECE and the agreement counts. Tables: `per_class`
    (support, precision, recall and F1 of each run per class or per label, and their deltas b - a; empty for a
    regression), `per_slice` (the mean error of each run on every slice either run found), `disagreements` (the
    samples the two runs predict differently, the largest change of error first, and which run is better)."""

    summary: dict
    per_class: pd.DataFrame
    per_slice: pd.DataFrame
    disagreements: pd.DataFrame

    def write(self, out: str | Path) -> Path:
        """summary.json and one CSV per table under `out`."""
        from .stage import slices_csv
        from ..loading.runs import write_atomic, write_json

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise AnalyzerError(f"{out} is a file: give a directory for the comparison tables")
        write_json(out / "summary.json", self.summary)
        write_atomic(out / "per_class.csv", lambda tmp: self.per_class.to_csv(tmp, index=False))
        write_atomic(out / "per_slice.csv", lambda tmp: slices_csv(self.per_slice, tmp))
        write_atomic(out / "disagreements.csv", lambda tmp: self.disagreements.to_csv(tmp, index=False))
        return out


PER_CLASS_COLUMNS = ["class", "name", "support", "precision_a", "precision_b", "recall_a", "recall_b",
                     "recall_delta", "f1_a", "f1_b", "f1_delta"]


def _check_outputs(task, labels, outputs_a, outputs_b):
    if task is None:  # class probabilities: a classifier over their columns
        from .tasks import Classification

        labels, outputs_a = check_predictions(labels, outputs_a)
        task = Classification(outputs_a.shape[1])
    if task.has_classes:
        labels, outputs_a = check_predictions(labels, outputs_a)
        _, outputs_b = check_predictions(labels, outputs_b)
    else:
        labels = task.check_labels(labels)
        outputs_a, outputs_b = (np.asarray(o, dtype=np.float64) for o in (outputs_a, outputs_b))
        if not (np.isfinite(outputs_a).all() and np.isfinite(outputs_b).all()):
            raise AnalyzerError("the runs' outputs hold NaN or infinite values: rebuild the run")
    if outputs_a.shape != outputs_b.shape:
        raise AnalyzerError(f"the runs predict different numbers of classes ({outputs_a.shape[1:]} and "
                            f"{outputs_b.shape[1:]}): compare runs of models with the same classes or labels")
    if len(outputs_a) != len(labels):
        raise AnalyzerError(f"{len(outputs_a)} outputs for {len(labels)} labels: give one output row per sample")
    return task, labels, outputs_a, outputs_b


def compare_predictions(ids, labels, probs_a, probs_b, *, task=None, class_names=None,
                        slices: pd.DataFrame | None = None, names: tuple = ("a", "b")) -> Comparison:
    """Compare two models' outputs on the same samples (rows aligned), as the run's `task`
    (analyzers.evaluation.tasks; None: class probabilities of a classifier) reads them: class probabilities, a
    multi-label run's per-label probabilities or a regression's predicted values. `slices` (columns description, ids
    and optionally source, run) are evaluated under both models."""
    from scipy.stats import binomtest
    from sklearn.metrics import precision_recall_fscore_support

    task, labels, probs_a, probs_b = _check_outputs(task, labels, probs_a, probs_b)
    ids = np.asarray(ids)
    if ids.shape != (len(labels),):
        raise AnalyzerError(f"ids must have one entry per sample ({len(labels)}), got {ids.shape}")
    names_k = [str(c) for c in class_names] if class_names is not None else [str(i) for i in
                                                                              range(task.num_outputs)]
    error_a, error_b = task.errors(labels, probs_a), task.errors(labels, probs_b)
    better_a, better_b = int((error_a < error_b).sum()), int((error_b < error_a).sum())
    metrics_a, metrics_b = (task.metrics(labels, p, names=names_k) for p in (probs_a, probs_b))
    pred_a, pred_b = task.predictions(probs_a), task.predictions(probs_b)
    differ = (pred_a != pred_b).reshape(len(labels), -1).any(axis=1)
    summary = {
        "runs": list(names), "num_samples": int(len(labels)), "task": task.name, "error_name": task.error_name,
        "headline_a": task.headline(metrics_a), "headline_b": task.headline(metrics_b),
        "mean_error_a": float(error_a.mean()), "mean_error_b": float(error_b.mean()),
        "mean_error_delta": float(error_b.mean() - error_a.mean()),
        "agree": int((~differ).sum()), "disagree": int(differ.sum()),
        "better_a": better_a, "better_b": better_b, "same_error": int((error_a == error_b).sum()),
        # the exact sign test: are the samples one run gets less wrong than the other split evenly between them?
        # With an error of 0 or 1 (a classifier) it is McNemar's exact test.
        "paired_p": float(binomtest(better_a, better_a + better_b, 0.5).pvalue) if better_a + better_b else 1.0,
        "paired_test": "McNemar" if np.isin(np.r_[error_a, error_b], (0, 1)).all() else "sign test",
    }
    if task.exactly_right:  # an error of 0 is a right answer: count the samples both runs get right or wrong
        right_a, right_b = error_a == 0, error_b == 0
        summary.update(both_right=int((right_a & right_b).sum()), both_wrong=int((~right_a & ~right_b).sum()),
                       both_wrong_differently=int((~right_a & ~right_b & differ).sum()))
    if task.has_classes:
        summary.update(accuracy_a=metrics_a["accuracy"], accuracy_b=metrics_b["accuracy"],
                       accuracy_delta=metrics_b["accuracy"] - metrics_a["accuracy"],
                       ece_a=expected_calibration_error(labels, probs_a),
                       ece_b=expected_calibration_error(labels, probs_b))
    if task.has_classes or task.per_label:  # per class, or per label: scikit-learn's scores of each run
        classes = np.arange(task.num_outputs)
        chosen = {"labels": classes} if task.has_classes else {}
        pa, ra, fa, support = precision_recall_fscore_support(labels, pred_a, zero_division=0, **chosen)
        pb, rb, fb, _ = precision_recall_fscore_support(labels, pred_b, zero_division=0, **chosen)
        per_class = pd.DataFrame({"class": classes, "name": names_k, "support": support,
                                  "precision_a": pa, "precision_b": pb, "recall_a": ra, "recall_b": rb,
                                  "recall_delta": rb - ra, "f1_a": fa, "f1_b": fb, "f1_delta": fb - fa})
    else:
        per_class = pd.DataFrame(columns=PER_CLASS_COLUMNS)
    per_slice = _per_slice(ids, error_a, error_b, slices)
    rows = np.flatnonzero(differ)
    columns_a = task.sample_columns(labels, probs_a, names=names_k)
    columns_b = task.sample_columns(labels, probs_b, names=names_k)
    delta = error_b[rows] - error_a[rows]
    disagreements = pd.DataFrame({
        "id": ids[rows], "label": columns_a["label"][rows], "pred_a": columns_a["pred"][rows],
        "pred_b": columns_b["pred"][rows], "error_a": error_a[rows], "error_b": error_b[rows], "error_delta": delta,
        "better": np.where(delta < 0, "b", np.where(delta > 0, "a", "neither"))})
    if task.has_classes:
        disagreements = disagreements.assign(confidence_a=probs_a[rows].max(1), confidence_b=probs_b[rows].max(1),
                                             p_label_a=probs_a[rows, labels[rows]],
                                             p_label_b=probs_b[rows, labels[rows]])
    # the largest change of error first; then the run that is better, then id (a stable, readable order)
    order = np.lexsort((disagreements["id"].astype(str).to_numpy(), disagreements["better"].to_numpy(),
                        -np.abs(delta)))
    disagreements = disagreements.iloc[order].reset_index(drop=True)
    return Comparison(summary=summary, per_class=per_class, per_slice=per_slice, disagreements=disagreements)


def _closest_slices(slices: pd.DataFrame) -> tuple[list, list]:
    """For each slice, the other run's slice sharing most samples (Jaccard of the member ids) and that overlap:
    two runs' clusters are matched by their samples, never by their numbers or names."""
    members = [set(map(str, s)) for s in slices["ids"]]
    runs = slices["run"].tolist() if "run" in slices else [""] * len(slices)
    closest, overlap = [], []
    for i, own in enumerate(members):
        best, score = None, 0.0
        for j, other in enumerate(members):
            if runs[j] == runs[i] or not own or not other:
                continue
            jaccard = len(own & other) / len(own | other)
            if jaccard > score:
                best, score = slices["description"].iloc[j], jaccard
        closest.append(best)
        overlap.append(score)
    return closest, overlap


def _per_slice(ids, error_a, error_b, slices) -> pd.DataFrame:
    columns = ["run", "source", "description", "size", "error_a", "error_b", "error_delta",
               "closest_in_other_run", "overlap", "ids"]
    if slices is None or len(slices) == 0:
        return pd.DataFrame(columns=columns)
    position = pd.Series(np.arange(len(ids)), index=ids)
    slices = slices.reset_index(drop=True)
    closest, overlap = _closest_slices(slices)
    rows = []
    for index, s in slices.iterrows():
        members = position.reindex(list(s["ids"])).dropna().to_numpy(dtype=np.int64)
        if len(members) == 0:
            continue
        ea, eb = float(error_a[members].mean()), float(error_b[members].mean())
        rows.append({"run": s.get("run", ""), "source": s.get("source", ""), "description": s["description"],
                     "size": len(members), "error_a": ea, "error_b": eb, "error_delta": eb - ea,
                     "closest_in_other_run": closest[index], "overlap": overlap[index],
                     "ids": ids[members].tolist()})
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("error_delta", key=np.abs, ascending=False, kind="stable").reset_index(drop=True)


def compare_runs(run_a, run_b) -> Comparison:
    """Compare two runs (paths or opened `Run`s) made on the same dataset; samples are matched by id."""
    from .stage import SLICES
    from .tasks import task_named
    from ..loading.runs import Run, open_run

    a = run_a if isinstance(run_a, Run) else open_run(run_a)
    b = run_b if isinstance(run_b, Run) else open_run(run_b)
    sa, sb = a.samples, b.samples
    if set(sa["id"]) != set(sb["id"]):
        raise AnalyzerError(f"{a.path} and {b.path} hold different samples: compare two runs on the same dataset")
    if a.task != b.task or len(a.class_names) != len(b.class_names):
        raise AnalyzerError(f"{a.path} is a {a.task} run of {len(a.class_names)} outputs and {b.path} a {b.task} run "
                            f"of {len(b.class_names)}: compare two runs of the same task")
    order_b = pd.Series(np.arange(len(sb)), index=sb["id"].to_numpy()).loc[sa["id"].to_numpy()].to_numpy()
    labels = np.asarray(a.labels)  # class indices, targets, or a multi-label run's (N, K) matrix
    if not np.array_equal(labels, np.asarray(b.labels)[order_b]):
        raise AnalyzerError(f"{a.path} and {b.path} give the same samples different labels: compare runs made with "
                            f"the same dataset and label column")
    slices = []
    for tag, run in (("a", a), ("b", b)):
        if run.has(SLICES):
            slices.append(run.read_parquet(SLICES).assign(run=tag))
    slices = pd.concat(slices, ignore_index=True) if slices else None
    return compare_predictions(sa["id"].to_numpy(), labels, np.asarray(a.probs), np.asarray(b.probs)[order_b],
                               task=task_named(a.task, len(a.class_names)), class_names=a.class_names,
                               slices=slices, names=(str(a.path), str(b.path)))


def compare_command(args) -> int:
    """`python -m analyzers compare RUN_A RUN_B [--out DIR]`: print a summary; write the tables with --out."""
    comparison = compare_runs(args.run_a, args.run_b)
    s = comparison.summary

    def scores(which: str) -> str:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in s[f"headline_{which}"].items() if v is not None)
        return shown + (f", ECE {s[f'ece_{which}']:.4f}" if f"ece_{which}" in s else "")

    print(f"A {args.run_a}: {scores('a')}")
    print(f"B {args.run_b}: {scores('b')}")
    print(f"they predict differently on {s['disagree']} of {s['num_samples']} samples; mean {s['error_name']} "
          f"{s['mean_error_a']:.4g} -> {s['mean_error_b']:.4g}; A less wrong on {s['better_a']}, B on "
          f"{s['better_b']} ({s['paired_test']} p = {s['paired_p']:.3g})")
    moved = comparison.per_class.reindex(comparison.per_class["recall_delta"].abs().sort_values(
        ascending=False, kind="stable").index).head(3)
    for _, row in moved.iterrows():
        if row["recall_delta"] != 0:
            print(f"  {row['name']}: recall {row['recall_a']:.3f} -> {row['recall_b']:.3f}")
    if len(comparison.per_slice):
        top = comparison.per_slice.iloc[0]
        print(f"  largest slice change: {top['description']} (run {top['run']}): mean {s['error_name']} "
              f"{top['error_a']:.3f} -> {top['error_b']:.3f}")
    if getattr(args, "out", None):
        out = comparison.write(args.out)
        print(f"tables written to {out}: summary.json, {', '.join(t + '.csv' for t in TABLES)}")
    return 0
