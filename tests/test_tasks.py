"""Tasks (issue 12): one object per task turns outputs into predictions, errors and metrics; its metrics equal
scikit-learn's and hand computations, its refusals name the problem, and inference asks instead of guessing."""
from __future__ import annotations

import numpy as np
import pytest

from analyzers import AnalyzerError
from analyzers.evaluation.tasks import Classification, MultiLabel, Regression, infer_task, task_named


def test_regression_metrics_equal_scikit_learn_and_the_formulas():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = rng.normal(3, 2, 200)
    pred = y + rng.normal(0, 0.5, 200)
    task = Regression(1)
    m = task.metrics(y, pred[:, None])  # an (N, 1) output is the same as (N,)
    assert m["mse"] == pytest.approx(np.mean((pred - y) ** 2)) == pytest.approx(skm.mean_squared_error(y, pred))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - y) ** 2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - y)))
    assert m["r2"] == pytest.approx(1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2))
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred))
    assert m["median_absolute_error"] == pytest.approx(np.median(np.abs(pred - y)))
    assert m["mape"] == pytest.approx(np.mean(np.abs(pred - y) / np.abs(y)))
    assert m["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, pred))
    np.testing.assert_allclose(task.residuals(y, pred), pred - y)
    np.testing.assert_allclose(task.errors(y, pred), np.abs(pred - y))
    assert task.wrong(y, pred).sum() == 20  # the largest 10% of the errors
    y0 = y.copy()
    y0[3] = 0.0
    assert task.metrics(y0, pred)["mape"] is None  # undefined where a target is 0


def test_multilabel_metrics_equal_scikit_learn_and_the_per_sample_error_is_the_hamming_fraction():
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    y = (rng.random((300, 4)) < [0.5, 0.2, 0.4, 0.1]).astype(int)
    probs = np.clip(y * 0.7 + rng.random((300, 4)) * 0.5, 0, 1)
    task = MultiLabel(4)
    m = task.metrics(y, probs, names=["a", "b", "c", "d"])
    pred = (probs >= 0.5).astype(int)
    assert m["subset_accuracy"] == pytest.approx(np.mean((pred == y).all(axis=1)))
    assert m["hamming_loss"] == pytest.approx(np.mean(pred != y)) == pytest.approx(skm.hamming_loss(y, pred))
    assert m["roc_auc_macro"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, j], probs[:, j]) for j in range(4)]))
    assert m["roc_auc_micro"] == pytest.approx(skm.roc_auc_score(y.ravel(), probs.ravel()))
    assert m["average_precision_macro"] == pytest.approx(
        np.mean([skm.average_precision_score(y[:, j], probs[:, j]) for j in range(4)]))
    report = m["classification_report"]
    for j, name in enumerate("abcd"):
        tp = np.sum((pred[:, j] == 1) & (y[:, j] == 1))
        assert report[name]["precision"] == pytest.approx(tp / max(pred[:, j].sum(), 1))
        assert report[name]["recall"] == pytest.approx(tp / y[:, j].sum())
        assert report[name]["support"] == y[:, j].sum()
    np.testing.assert_allclose(task.errors(y, probs), (pred != y).mean(axis=1))
    np.testing.assert_array_equal(task.wrong(y, probs), (pred != y).any(axis=1))


def test_classification_is_the_existing_metrics_and_binary_is_two_classes():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), 100)
    y = rng.integers(0, 3, 100)
    task = Classification(3)
    assert task.name == "classification" and Classification(2).name == "binary"
    assert task.metrics(y, probs)["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    np.testing.assert_array_equal(task.errors(y, probs), (probs.argmax(1) != y).astype(float))


def test_inference_reads_the_task_and_asks_when_two_readings_fit():
    assert isinstance(infer_task(np.array([0, 2, 1]), 3), Classification)
    assert infer_task(np.array([0, 1, 1]), 1).name == "binary"  # a binary logit
    assert isinstance(infer_task(np.array([40.5, 321.0, 97.25]), 1), Regression)
    assert isinstance(infer_task(np.array([[0, 1, 1], [1, 0, 0]]), 3), MultiLabel)
    # the diabetes case: integer targets 40..321 with one output is a count regression or a wrong binary model
    with pytest.raises(AnalyzerError, match="say which task.*--task regression"):
        infer_task(np.array([40, 321, 97]), 1)
    with pytest.raises(AnalyzerError, match="real numbers but the model has 3 outputs"):
        infer_task(np.array([0.5, 1.5]), 3)
    with pytest.raises(AnalyzerError, match="one 0/1 column per model output"):
        infer_task(np.array([[0, 1], [1, 0]]), 3)


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(AnalyzerError, match="real numbers.*--task regression"):
        Classification(3).check_labels(np.array([0.0, 1.5, 2.0]))
    with pytest.raises(AnalyzerError, match=r"multi-hot array \(samples, 3\)"):
        MultiLabel(3).check_labels(np.array([0, 1, 2]))
    with pytest.raises(AnalyzerError, match="1 targets are NaN or infinite, the first in row 1"):
        Regression(1).check_labels(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(AnalyzerError, match="regression needs one output per sample"):
        task_named("regression", 3)
    with pytest.raises(AnalyzerError, match="unknown task"):
        task_named("ranking", 3)
    assert isinstance(task_named("regression", 1), Regression)


def test_a_worker_cannot_hand_over_an_unknown_task_or_non_finite_targets():
    """The parent checks what a sandboxed worker says of its dataset: the task is one it reads, and a regression's
    targets are finite float64 (a worker is not trusted)."""
    import pandas as pd

    from analyzers.loading.datasets import dataset_from_fields

    good = {"x": np.zeros((3, 2), np.float32), "y": np.array([1.5, 2.0, 3.0]), "ids": np.arange(3),
            "spec": "d.npz", "sha256": "0" * 64, "class_names": None, "metadata": pd.DataFrame(),
            "feature_names": None, "preprocessing": {}, "extras": {}, "ground_truth_columns": [], "task": "regression"}
    assert dataset_from_fields(good).task == "regression"
    for change, words in (({"task": "ranking"}, "task is not one"),
                          ({"y": np.array([1.5, np.nan, 3.0])}, "finite float64"),
                          ({"task": "classification"}, "one int64 per sample")):
        with pytest.raises(AnalyzerError, match=words):
            dataset_from_fields({**good, **change})


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), True, "0.5", (0.1, 0.2, 2.0), (0.1, np.nan, 0.3)])
def test_a_multilabel_threshold_out_of_zero_one_is_refused_as_a_stored_cut_is(threshold, tmp_path):
    """One check owns a probability cut: the task refuses what saving a label's threshold refuses, with its words."""
    from analyzers.evaluation.thresholds import save_label_thresholds

    with pytest.raises(AnalyzerError, match=r"a multi-label threshold must be a number in \[0, 1\]"):
        MultiLabel(num_outputs=3, threshold=threshold)
    cuts = threshold if isinstance(threshold, tuple) else (threshold, 0.5, 0.5)
    with pytest.raises(AnalyzerError, match=r"the threshold of label '.' must be a number in \[0, 1\]"):
        save_label_thresholds(tmp_path, cuts, names="abc")
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_multilabel_threshold_is_one_cut_or_one_per_label():
    assert MultiLabel(num_outputs=3, threshold=np.array(0.25)).thresholds.tolist() == [0.25] * 3
    assert MultiLabel(num_outputs=3, threshold=np.array([0.1, 0.2, 0.3])).threshold == (0.1, 0.2, 0.3)
    with pytest.raises(AnalyzerError, match=r"one per label \(3\)"):
        MultiLabel(num_outputs=3, threshold=(0.1, 0.2))
