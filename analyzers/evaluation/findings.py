"""Findings ranked on one scale: how many samples each one accounts for.

Every candidate problem of a run is scored by the samples it accounts for, so that a miscalibrated model and a weak
slice can be compared at all:

- a slice: its errors beyond the overall error rate, size x (its error rate - the overall rate);
- a most-confused pair: the errors in that cell of the confusion matrix;
- class imbalance: the errors of the rare classes beyond the overall error rate;
- calibration: how far the confidences are from the accuracy, in samples: N x ECE is the gap between the number of
  samples the model expects to get right in each confidence bin and the number it gets right, summed. A finite
  sample has some ECE even from a perfectly calibrated model, so what that model would show (labels drawn from the
  model's own probabilities, CALIBRATION_DRAWS times) is subtracted first;
- label-noise suspects: the suspects whose label is most probably wrong (label_noise's score, the estimated
  probability that the label is wrong, >= STRONG_SUSPECT). Such a sample is nearly always an error too, so the
  suspects are a finding only when they stand out from the errors: at most half of them, out of at least
  MIN_ERRORS_FOR_NOISE errors. Otherwise they are the error list under another name (where a wrong label and a
  confident mistake cannot be told apart; digits, with 6 errors, has no suspects at all).

`rank_findings` returns them best first; the dashboard leads with the top three and words them. The evaluation
stage stores them in the run (`FINDINGS`, `findings_to_json`), so that a page never ranks 10M rows again (1.2 s of
a 10M-row run's first page); a run from before they were stored has them ranked when first shown.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import AnalyzerError
from .metrics import check_predictions

STRONG_SUSPECT = 0.9  # the label is wrong with probability at least 0.9 (label_noise.label_issue_scores)
RARE_CLASS_SHARE = 0.5  # a class with under half the mean support per class is rare
MIN_IMBALANCE_RATIO = 3.0  # largest class support over the smallest: below this there is no imbalance finding
MIN_ERRORS_FOR_NOISE = 20
MIN_IMPACT = 1.0  # findings accounting for less than one sample are left out
CALIBRATION_DRAWS = 20
NORMAL_BIN_VARIANCE = 400.0  # a confidence bin whose hits vary this much is taken as normal (_noise_floor)
PAIRS = 3
SLICES = 5
FINDINGS = "findings.json"  # {"findings": [{"kind", "impact", "details"}, ...]}, best first (run_checks checks it)


@dataclass(frozen=True)
class Finding:
    kind: str  # slice, confusion, imbalance, calibration, label_noise
    impact: float  # the samples it accounts for (see the module docstring), the ranking's one scale
    details: dict = field(default_factory=dict)  # what the dashboard needs to word it and link to it


def slice_findings(slices: pd.DataFrame | None, overall_error: float) -> list:
    if slices is None or not len(slices):
        return []
    out = []
    for index, row in enumerate(slices.head(SLICES).itertuples()):
        excess = float(row.size) * (float(row.error_rate) - overall_error)
        out.append(Finding("slice", excess, {"index": index, "description": row.description, "size": int(row.size),
                                              "errors": int(row.errors), "error_rate": float(row.error_rate),
                                              "lift": float(row.lift), "source": row.source}))
    return out


def confusion_findings(labels: np.ndarray, pred: np.ndarray, k: int) -> list:
    counts = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    np.fill_diagonal(counts, 0)
    support = np.bincount(labels, minlength=k)
    order = np.argsort(-counts, axis=None, kind="stable")[:PAIRS]
    return [Finding("confusion", float(counts.flat[i]), {"true": int(i // k), "pred": int(i % k),
                                                         "count": int(counts.flat[i]),
                                                         "share_of_true": float(counts.flat[i] / support[i // k])})
            for i in order if counts.flat[i] > 0]


def imbalance_finding(labels: np.ndarray, correct: np.ndarray, k: int) -> list:
    support = np.bincount(labels, minlength=k)
    present = support[support > 0]
    if len(present) < 2 or present.max() / present.min() < MIN_IMBALANCE_RATIO:
        return []
    overall_error = 1.0 - correct.mean()
    rare = np.flatnonzero((support > 0) & (support < RARE_CLASS_SHARE * support.mean()))
    errors = np.bincount(labels[~correct], minlength=k)
    excess = float(sum(max(0.0, errors[c] - support[c] * overall_error) for c in rare))
    recall = {int(c): float(1 - errors[c] / support[c]) for c in rare}
    return [Finding("imbalance", excess, {"rare": [int(c) for c in rare], "recall": recall,
                                          "support": {int(c): int(support[c]) for c in rare},
                                          "ratio": float(present.max() / present.min()),
                                          "overall_recall": float(1 - overall_error)})]


def calibration_noise_floor(probs: np.ndarray, *, draws: int = CALIBRATION_DRAWS, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated model with these probabilities: labels drawn from them.

    Only whether the drawn label is the predicted class enters the top-label ECE, and that happens with probability
    the confidence: each draw is one Bernoulli(confidence) per sample, over confidence bins found once (so a
    million rows cost a few bincounts per draw, not a draw over every class)."""
    return _noise_floor(np.asarray(probs, dtype=np.float64).max(axis=1), draws=draws, seed=seed)


def _noise_floor(confidence: np.ndarray, *, draws: int, seed: int) -> float:
    """`calibration_noise_floor` from each sample's confidence (its top probability)."""
    from .metrics import DEFAULT_BINS, calibration_bins

    rng = np.random.default_rng(seed)
    # the bins of metrics.calibration_bins (uniform edges), found once
    edges = calibration_bins(np.zeros(1), np.zeros(1), n_bins=DEFAULT_BINS).edges
    which = np.searchsorted(edges[1:-1], confidence)
    count = np.bincount(which, minlength=DEFAULT_BINS)
    gap_base = np.bincount(which, weights=confidence, minlength=DEFAULT_BINS)
    variance = np.bincount(which, weights=confidence * (1 - confidence), minlength=DEFAULT_BINS)
    # A bin's hits are a sum of Bernoulli draws. Where their variance is large that sum is normal to within far less
    # than the draws' own noise, and a normal's mean absolute deviation is sqrt(2 variance / pi): no draws for it
    # (20 draws over 10M rows took 1.8 s of the first page). Bins of fewer or surer samples are drawn.
    normal = (count > 0) & (variance >= NORMAL_BIN_VARIANCE)
    floor = float(np.sqrt(2 * variance[normal] / np.pi).sum())
    drawn = (count > 0) & ~normal
    if drawn.any():
        if normal.any():  # draw only the samples of the drawn bins
            keep = drawn[which]
            which, confidence = which[keep], confidence[keep]
        values = []
        for _ in range(draws):
            hits = np.bincount(which, weights=rng.random(len(confidence)) < confidence, minlength=DEFAULT_BINS)
            values.append(np.abs(hits[drawn] - gap_base[drawn]).sum())
        floor += float(np.mean(values))
    return floor / int(count.sum()) if count.sum() else float("nan")


def calibration_finding(top_right: np.ndarray, confidence: np.ndarray) -> list:
    """The calibration finding from whether each sample's top class is its label and the top probability (what
    `metrics.expected_calibration_error` reads from the probabilities, taken once for every part here)."""
    from .metrics import calibration_bins

    ece = calibration_bins(top_right, confidence).ece
    floor = _noise_floor(confidence, draws=CALIBRATION_DRAWS, seed=0)
    mean_confidence = float(confidence.mean())
    accuracy = float(top_right.mean())
    return [Finding("calibration", max(0.0, ece - floor) * len(confidence),
                    {"ece": ece, "noise_floor": floor, "mean_confidence": mean_confidence, "accuracy": accuracy,
                     "direction": "under" if mean_confidence < accuracy else "over"})]


def label_noise_finding(noise: pd.DataFrame | None, errors: int) -> list:
    if noise is None or not len(noise):
        return []
    strong = noise[noise["score"] >= STRONG_SUSPECT]
    if not len(strong) or errors < MIN_ERRORS_FOR_NOISE or len(strong) > errors / 2:
        return []  # the suspects would be the error list under another name
    top = strong.sort_values("score", ascending=False).iloc[0]
    return [Finding("label_noise", float(len(strong)), {"count": int(len(strong)), "errors": int(errors),
                                                        "top_id": top["id"], "top_label": int(top["label"]),
                                                        "top_suggested": int(top["suggested_label"])})]


def _class_indices(values: np.ndarray, k: int, column: str) -> np.ndarray:
    if values.dtype.kind not in "iu" or len(values) and (values.min() < 0 or values.max() >= k):
        raise AnalyzerError(f"the samples' {column} must be class indices 0..{k - 1}")
    return values.astype(np.int64, copy=False)


def rank_findings(samples: pd.DataFrame, probs=None, *, num_classes: int | None = None,
                  slices: pd.DataFrame | None = None, label_noise: pd.DataFrame | None = None) -> list:
    """Every finding of a run (samples.parquet's label, pred and correct; the probabilities; the run's slices and
    label-noise tables where it has them), most samples accounted for first; those under MIN_IMPACT are left out.

    Without `probs`, the calibration reads the samples' `pred` and `confidence` as the top class and the top
    probability: what an opened run's check has tied them to (`run_checks.check_probs`), and
    what spares reading a 10M-row run's probabilities (2.5 s of its first page). `num_classes` is then needed."""
    if probs is None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise AnalyzerError(f"findings without probabilities need num_classes, a number of 2 or more, got "
                                f"{num_classes!r}")
        k = int(num_classes)
        labels = _class_indices(samples["label"].to_numpy(), k, "label")
        pred = _class_indices(samples["pred"].to_numpy(), k, "pred")
        correct = pred == labels  # a checked run's pred is the top class (`check_probs`)
        top_right, confidence = correct, samples["confidence"].to_numpy(dtype=np.float64)
        if len(confidence) and not (confidence.min() >= 0 and confidence.max() <= 1 + 1e-6):
            raise AnalyzerError("the samples' confidence must be probabilities in [0, 1]")
    else:
        labels, probs = check_predictions(samples["label"].to_numpy(), probs)
        pred = samples["pred"].to_numpy().astype(np.int64)
        correct = pred == labels
        k = probs.shape[1]
        top_right, confidence = probs.argmax(axis=1) == labels, probs.max(axis=1)
    found = (slice_findings(slices, 1.0 - correct.mean()) + confusion_findings(labels, pred, k)
             + imbalance_finding(labels, correct, k)
             + calibration_finding(top_right, confidence)
             + label_noise_finding(label_noise, int((~correct).sum())))
    kept = [f for f in found if f.impact >= MIN_IMPACT]
    return sorted(kept, key=lambda f: -f.impact)


def findings_to_json(found: list) -> dict:
    """`rank_findings`'s list as the run stores it (`FINDINGS`)."""
    return {"findings": [{"kind": f.kind, "impact": float(f.impact), "details": f.details} for f in found]}


def findings_from_json(stored: dict) -> list:
    """The findings of a stored `findings_to_json` (checked by `run_checks` when read), as `rank_findings` gave
    them: JSON's object keys are text, an imbalance finding's are class indices."""
    out = []
    for record in stored["findings"]:
        details = dict(record["details"])
        if record["kind"] == "imbalance":
            details["recall"] = {int(c): float(v) for c, v in details["recall"].items()}
            details["support"] = {int(c): int(v) for c, v in details["support"].items()}
        out.append(Finding(record["kind"], float(record["impact"]), details))
    return out
