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
    """`summary`: accuracies, agreement counts and McNemar's exact p-value; tables: `per_class` (support, precision,
    recall and F1 of each run and their deltas b - a), `per_slice` (error rate of each run on every slice either
    run found), `disagreements` (samples the two runs predict differently, and which one is right)."""

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


def compare_predictions(ids, labels, probs_a, probs_b, *, class_names=None, slices: pd.DataFrame | None = None,
                        names: tuple = ("a", "b")) -> Comparison:
    """Compare two models' probabilities on the same samples (rows aligned). `slices` (columns description, ids and
    optionally source, run) are evaluated under both models."""
    from scipy.stats import binomtest
    from sklearn.metrics import precision_recall_fscore_support

    labels, probs_a = check_predictions(labels, probs_a)
    _, probs_b = check_predictions(labels, probs_b)
    if probs_a.shape != probs_b.shape:
        raise AnalyzerError(f"the runs predict different numbers of classes ({probs_a.shape[1]} and "
                            f"{probs_b.shape[1]}): compare runs of models with the same classes")
    ids = np.asarray(ids)
    if ids.shape != labels.shape:
        raise AnalyzerError(f"ids must have one entry per sample ({len(labels)}), got {ids.shape}")
    k = probs_a.shape[1]
    names_k = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    pred_a, pred_b = probs_a.argmax(1), probs_b.argmax(1)
    right_a, right_b = pred_a == labels, pred_b == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    discordant = only_a + only_b
    summary = {
        "runs": list(names), "num_samples": int(len(labels)),
        "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
        "accuracy_delta": float(right_b.mean() - right_a.mean()),
        "ece_a": expected_calibration_error(labels, probs_a), "ece_b": expected_calibration_error(labels, probs_b),
        "agree": int((pred_a == pred_b).sum()), "disagree": int((pred_a != pred_b).sum()),
        "both_right": int((right_a & right_b).sum()), "only_a_right": only_a, "only_b_right": only_b,
        "both_wrong": int((~right_a & ~right_b).sum()),
        "both_wrong_differently": int((~right_a & ~right_b & (pred_a != pred_b)).sum()),
        # McNemar's exact test: are the samples only one run gets right split evenly between the runs?
        "mcnemar_p": float(binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0,
    }
    classes = np.arange(k)
    pa, ra, fa, support = precision_recall_fscore_support(labels, pred_a, labels=classes, zero_division=0)
    pb, rb, fb, _ = precision_recall_fscore_support(labels, pred_b, labels=classes, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "name": names_k, "support": support,
                              "precision_a": pa, "precision_b": pb, "recall_a": ra, "recall_b": rb,
                              "recall_delta": rb - ra, "f1_a": fa, "f1_b": fb, "f1_delta": fb - fa})
    per_slice = _per_slice(ids, right_a, right_b, slices)
    differ = np.flatnonzero(pred_a != pred_b)
    rows = np.arange(len(labels))
    which = np.where(right_a[differ], "a", np.where(right_b[differ], "b", "neither"))
    disagreements = pd.DataFrame({
        "id": ids[differ], "label": labels[differ], "pred_a": pred_a[differ], "pred_b": pred_b[differ],
        "confidence_a": probs_a[differ].max(1), "confidence_b": probs_b[differ].max(1),
        "p_label_a": probs_a[rows[differ], labels[differ]], "p_label_b": probs_b[rows[differ], labels[differ]],
        "right": which})
    disagreements = disagreements.sort_values(["right", "id"], kind="stable").reset_index(drop=True)
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


def _per_slice(ids, right_a, right_b, slices) -> pd.DataFrame:
    columns = ["run", "source", "description", "size", "error_rate_a", "error_rate_b", "error_rate_delta",
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
        ea, eb = 1 - right_a[members].mean(), 1 - right_b[members].mean()
        rows.append({"run": s.get("run", ""), "source": s.get("source", ""), "description": s["description"],
                     "size": len(members), "error_rate_a": ea, "error_rate_b": eb, "error_rate_delta": eb - ea,
                     "closest_in_other_run": closest[index], "overlap": overlap[index],
                     "ids": ids[members].tolist()})
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("error_rate_delta", key=np.abs, ascending=False, kind="stable").reset_index(drop=True)


def compare_runs(run_a, run_b) -> Comparison:
    """Compare two runs (paths or opened `Run`s) made on the same dataset; samples are matched by id."""
    from .stage import SLICES
    from ..loading.runs import Run, open_run

    a = run_a if isinstance(run_a, Run) else open_run(run_a)
    b = run_b if isinstance(run_b, Run) else open_run(run_b)
    sa, sb = a.samples, b.samples
    if set(sa["id"]) != set(sb["id"]):
        raise AnalyzerError(f"{a.path} and {b.path} hold different samples: compare two runs on the same dataset")
    order_b = pd.Series(np.arange(len(sb)), index=sb["id"].to_numpy()).loc[sa["id"].to_numpy()].to_numpy()
    labels = sa["label"].to_numpy()
    if not np.array_equal(labels, sb["label"].to_numpy()[order_b]):
        raise AnalyzerError(f"{a.path} and {b.path} give the same samples different labels: compare runs made with "
                            f"the same dataset and label column")
    slices = []
    for tag, run in (("a", a), ("b", b)):
        if run.has(SLICES):
            slices.append(run.read_parquet(SLICES).assign(run=tag))
    slices = pd.concat(slices, ignore_index=True) if slices else None
    return compare_predictions(sa["id"].to_numpy(), labels, np.asarray(a.probs), np.asarray(b.probs)[order_b],
                               class_names=a.class_names, slices=slices, names=(str(a.path), str(b.path)))


def compare_command(args) -> int:
    """`python -m analyzers compare RUN_A RUN_B [--out DIR]`: print a summary; write the tables with --out."""
    comparison = compare_runs(args.run_a, args.run_b)
    s = comparison.summary
    print(f"A {args.run_a}: accuracy {s['accuracy_a']:.4f}, ECE {s['ece_a']:.4f}")
    print(f"B {args.run_b}: accuracy {s['accuracy_b']:.4f}, ECE {s['ece_b']:.4f}")
    print(f"they disagree on {s['disagree']} of {s['num_samples']} samples; only A right on {s['only_a_right']}, "
          f"only B right on {s['only_b_right']}, both wrong on {s['both_wrong']} (McNemar p = {s['mcnemar_p']:.3g})")
    moved = comparison.per_class.reindex(comparison.per_class["recall_delta"].abs().sort_values(
        ascending=False, kind="stable").index).head(3)
    for _, row in moved.iterrows():
        if row["recall_delta"] != 0:
            print(f"  class {row['name']}: recall {row['recall_a']:.3f} -> {row['recall_b']:.3f}")
    if len(comparison.per_slice):
        top = comparison.per_slice.iloc[0]
        print(f"  largest slice change: {top['description']} (run {top['run']}): error rate "
              f"{top['error_rate_a']:.3f} -> {top['error_rate_b']:.3f}")
    if getattr(args, "out", None):
        out = comparison.write(args.out)
        print(f"tables written to {out}: summary.json, {', '.join(t + '.csv' for t in TABLES)}")
    return 0
