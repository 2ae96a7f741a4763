"""Thresholds for one class against the rest (issue 12): every count equals scikit-learn's confusion matrix at that
threshold, the curves are scikit-learn's, and the marked thresholds are the best by brute force."""
from __future__ import annotations

import numpy as np
import pytest

from analyzers import AnalyzerError
from analyzers.evaluation.thresholds import threshold_curve


def _imbalanced(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.03).astype(int)
    p1 = np.clip(0.15 * labels + rng.beta(1, 12, n) + 0.25 * labels * rng.random(n), 0, 1)
    p1 = np.round(p1, 3)  # ties: several samples share a score
    return labels, np.column_stack([1 - p1, p1])


def test_counts_and_curves_equal_scikit_learn_at_every_threshold():
    from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score, precision_recall_curve,
                                 roc_auc_score, roc_curve)

    labels, probs = _imbalanced()
    curve = threshold_curve(labels, probs, positive=1)
    assert curve.prevalence == pytest.approx(labels.mean())
    for t in (0.05, 0.1, 0.2, 0.3, 0.5, float(probs[:, 1].max()), float(probs[:, 1].max()) + 0.01, 0.0):
        at = curve.at(t, cost_fp=1, cost_fn=20)
        pred = (probs[:, 1] >= t).astype(int)
        tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
        assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (tp, fp, fn, tn), t
        assert at["f1"] == pytest.approx(f1_score(labels, pred, zero_division=0))
        assert at["cost"] == fp + 20 * fn
    precision, recall, thresholds = precision_recall_curve(labels, probs[:, 1])
    ours = {t: (p, r) for t, p, r in zip(curve.thresholds[1:], curve.precision[1:], curve.recall[1:])}
    for t, p, r in zip(thresholds, precision[:-1], recall[:-1]):
        assert ours[t] == pytest.approx((p, r))
    fpr, tpr, roc_thresholds = roc_curve(labels, probs[:, 1], drop_intermediate=False)
    ours_roc = dict(zip(curve.thresholds[1:], zip(curve.fpr[1:], curve.recall[1:])))
    for t, f, r in zip(roc_thresholds[1:], fpr[1:], tpr[1:]):
        assert ours_roc[t] == pytest.approx((f, r))
    assert curve.roc_auc == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert curve.average_precision == pytest.approx(average_precision_score(labels, probs[:, 1]))


def test_float32_scores_with_ties_give_the_curve_of_their_float64_values():
    """A run's probs.npy is float32, sorted in its own type: the same thresholds and counts as its float64 copy,
    each count that of scikit-learn's confusion matrix at that threshold (rounded scores: many ties)."""
    from sklearn.metrics import confusion_matrix

    labels, probs = _imbalanced()
    probs32 = np.round(probs, 2).astype(np.float32)
    curve, wide = threshold_curve(labels, probs32, positive=1), threshold_curve(labels, probs32.astype(np.float64))
    assert curve.thresholds.dtype == np.float64 and len(curve.thresholds) < len(labels) // 4  # ties merged
    np.testing.assert_array_equal(curve.thresholds, wide.thresholds)
    np.testing.assert_array_equal(curve.tp, wide.tp)
    np.testing.assert_array_equal(curve.fp, wide.fp)
    for i in range(1, len(curve.thresholds), 7):
        pred = (probs32[:, 1].astype(np.float64) >= curve.thresholds[i]).astype(int)
        tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
        assert (curve.tp[i], curve.fp[i]) == (tp, fp)


def test_the_marked_thresholds_are_the_best_by_brute_force_and_beat_one_half():
    from sklearn.metrics import f1_score

    labels, probs = _imbalanced()
    curve = threshold_curve(labels, probs, positive=1)
    grid = np.unique(probs[:, 1])
    f1s = [f1_score(labels, probs[:, 1] >= t, zero_division=0) for t in grid]
    best = curve.best_f1()
    assert f1_score(labels, probs[:, 1] >= best) == pytest.approx(max(f1s))
    assert curve.at(best)["f1"] > curve.at(0.5)["f1"] + 0.1  # imbalance: argmax is a poor cut
    costs = [np.sum((probs[:, 1] >= t) & (labels == 0)) + 20 * np.sum((probs[:, 1] < t) & (labels == 1))
             for t in np.r_[grid, grid.max() + 1]]
    cheapest = curve.best_cost(1, 20)
    assert curve.at(cheapest, cost_fp=1, cost_fn=20)["cost"] == min(costs)
    assert cheapest <= best  # missing a positive costs more: the cut moves down


def test_the_best_thresholds_are_remembered_per_cost_and_a_thinned_curve_keeps_its_points():
    """The page asks for the best thresholds on every rerun (a pass over up to 10M thresholds each): the curve
    computes each once per cost, the same as a fresh curve's; the chart draws a thinned curve whose rates are the
    full curve's at the thresholds it keeps."""
    labels, probs = _imbalanced(5000, seed=3)
    curve, fresh = threshold_curve(labels, probs, positive=1), threshold_curve(labels, probs, positive=1)
    assert curve.best_f1() == fresh.best_f1() and curve.best_cost(1, 20) == fresh.best_cost(1, 20)
    assert curve.best_cost(1, 1) == fresh.best_cost(1, 1) != curve.best_cost(1, 20)  # each cost its own
    calls = []
    original = type(curve).cost
    type(curve).cost = lambda self, *a: calls.append(a) or original(self, *a)
    try:
        curve.best_cost(1, 20), curve.best_cost(1, 20), curve.best_f1()
    finally:
        type(curve).cost = original
    assert calls == []  # remembered
    thin = curve.thinned(50)
    assert len(thin.thresholds) <= 51 and np.isinf(thin.thresholds[0])
    assert thin.thresholds[1] == curve.thresholds[1] and thin.thresholds[-1] == curve.thresholds[-1]
    kept = np.searchsorted(-curve.thresholds, -thin.thresholds)
    np.testing.assert_array_equal(curve.thresholds[kept], thin.thresholds)
    for rate in ("precision", "recall", "fpr", "f1"):
        np.testing.assert_allclose(getattr(thin, rate), getattr(curve, rate)[kept])
    assert curve.thinned(len(curve.thresholds)) is curve


def test_one_class_against_the_rest_and_refusals():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), 300)
    labels = rng.integers(0, 3, 300)
    curve = threshold_curve(labels, probs, positive=2)
    at = curve.at(0.4)
    assert at["tp"] == np.sum((probs[:, 2] >= 0.4) & (labels == 2))
    assert at["prevalence"] == pytest.approx(np.mean(labels == 2))
    with pytest.raises(AnalyzerError, match="class index 0..2"):
        threshold_curve(labels, probs, positive=3)
    with pytest.raises(AnalyzerError, match="cost of a false negative"):
        curve.cost(1, -1)


def test_predictions_at_a_threshold_and_the_stored_choice(tmp_path):
    import json

    from analyzers.evaluation.thresholds import THRESHOLDS, predictions_at, save_threshold

    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.1, 0.05, 0.85]])
    np.testing.assert_array_equal(predictions_at(probs, positive=2, threshold=0.35), [0, 2, 1, 2])
    np.testing.assert_array_equal(predictions_at(probs, positive=2, threshold=0.9), [0, 0, 1, 0])  # the next best
    binary = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    np.testing.assert_array_equal(predictions_at(binary, positive=1, threshold=0.3), [0, 1, 1])
    record = save_threshold(tmp_path, positive=1, threshold=0.3, num_classes=2, cost_fp=1, cost_fn=5)
    assert json.loads((tmp_path / THRESHOLDS).read_text()) == record == {"positive": 1, "threshold": 0.3,
                                                                         "cost_fp": 1.0, "cost_fn": 5.0}
    with pytest.raises(AnalyzerError, match=r"must be a number in \[0, 1\]"):
        save_threshold(tmp_path, positive=1, threshold=1.5, num_classes=2)


def test_the_confusion_page_threshold_moves_the_counts_and_is_stored_for_the_rankings(tmp_path, sample_run_dir,
                                                                                       monkeypatch):
    import json
    import shutil

    from analyzers.loading.runs import open_run
    from tests.test_dashboard_app import _app, _ok, _text

    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir("tabular"), runs / "tabular")  # two classes: malignant, benign
    run = open_run(runs / "tabular")
    at = _app(monkeypatch, runs, runs / "tabular").run()
    at.switch_page("views/confusion.py").run()
    _ok(at)
    assert "Decision threshold" in _text(at)
    labels, probs = run.samples["label"].to_numpy(), run.probs
    curve = threshold_curve(labels, probs, positive=1)

    def shown(name):
        return next(m.value for m in at.metric if m.label == name)

    assert shown("Recall") == f"{curve.at(0.5)['recall']:.3f}"
    at.slider(key="threshold-value").set_value(0.99).run()
    _ok(at)
    strict = curve.at(0.99)
    assert shown("Recall") == f"{strict['recall']:.3f}" and shown("Precision") == f"{strict['precision']:.3f}"
    assert strict["recall"] < curve.at(0.5)["recall"]  # a stricter cut finds fewer of the class
    # the 2x2 matrix follows the slider: its cells' labels are the curve's counts at 0.99
    expected = [[str(strict["tn"]), str(strict["fp"])], [str(strict["fn"]), str(strict["tp"])]]
    heatmaps = [trace for chart in at.get("plotly_chart") for trace in json.loads(chart.proto.spec)["data"]
                if trace.get("type") == "heatmap"]
    assert expected in [trace.get("text") for trace in heatmaps]
    at.button(key="threshold-save").click().run()
    _ok(at)
    stored = json.loads((runs / "tabular" / "thresholds.json").read_text())
    assert stored["positive"] == 1 and stored["threshold"] == pytest.approx(0.99)
    # the rankings now count a sample as wrong at the stored threshold
    at.switch_page("views/errors.py").run()
    at.segmented_control(key="errors-section").set_value("Error rankings").run()
    _ok(at)
    assert "at the run's threshold" in _text(at)
