"""Metrics, calibration, confusion, rankings and group metrics against scikit-learn and hand computations."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             log_loss, roc_auc_score, top_k_accuracy_score)

from analyzers.errors import AnalyzerError
from analyzers.evaluation.metrics import (calibration_bins, class_bins, classification_metrics, confusion,
                               expected_calibration_error, group_metrics, largest_gap, margins, rank_errors,
                               subset_calibration, top_label_bins)


def _probs(n: int, k: int, seed: int = 0, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits)
    return labels, probs / probs.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_metrics_equal_scikit_learn(k):
    labels, probs = _probs(300, k, seed=k)
    names = [f"class {i}" for i in range(k)]
    m = classification_metrics(labels, probs, class_names=names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["log_loss"] == pytest.approx(log_loss(labels, probs))
    expected_auc = roc_auc_score(labels, probs[:, 1]) if k == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert m["roc_auc_ovr"] == pytest.approx(expected_auc)
    for kk, value in m["top_k_accuracy"].items():
        expected = accuracy_score(labels, pred) if kk == 1 else top_k_accuracy_score(labels, probs, k=kk)
        assert value == pytest.approx(expected)
    assert set(m["top_k_accuracy"]) == ({1} if k == 2 else {1, 2} if k == 3 else {1, 2, 3, 5})
    assert m["classification_report"] == classification_report(labels, pred, target_names=names, output_dict=True,
                                                               zero_division=0)
    json.dumps(m)  # stored as it is


def test_auc_is_none_when_a_class_is_absent():
    labels, probs = _probs(50, 3)
    labels[labels == 2] = 0
    assert classification_metrics(labels, probs)["roc_auc_ovr"] is None


def test_ece_equals_a_hand_computation():
    # Confidences 0.9, 0.8, 0.6, 0.55 with outcomes right, wrong, right, right; 2 equal-width bins:
    # [0, 0.5] is empty; (0.5, 1] holds all four: accuracy 3/4, mean confidence 0.7125 -> ECE 0.0375.
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(abs(0.75 - 0.7125))
    # 5 bins of width 0.2: (0.4, 0.6] holds 0.6 and 0.55 (both right): |1 - 0.575| * 2/4;
    # (0.6, 0.8] holds 0.8 (wrong): |0 - 0.8| * 1/4; (0.8, 1] holds 0.9 (right): |1 - 0.9| * 1/4.
    expected = 0.425 * 0.5 + 0.8 * 0.25 + 0.1 * 0.25
    assert expected_calibration_error(labels, probs, n_bins=5) == pytest.approx(expected)
    inside, outside = subset_calibration(labels, probs, np.array([True, True, False, False]), n_bins=5)
    assert inside == pytest.approx((0.8 + 0.1) / 2)  # 0.8 wrong, 0.9 right: separate bins
    assert outside == pytest.approx(1 - 0.575)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_bins_match_calibration_curve(strategy):
    labels, probs = _probs(500, 3, seed=4, signal=1.0)
    for k, bins in enumerate(class_bins(labels, probs, n_bins=8, strategy=strategy)):
        prob_true, prob_pred = calibration_curve(labels == k, probs[:, k], n_bins=8, strategy=strategy)
        filled = bins.count > 0
        np.testing.assert_allclose(bins.observed[filled], prob_true)
        np.testing.assert_allclose(bins.mean_predicted[filled], prob_pred)
        assert bins.count.sum() == 500
    top = top_label_bins(labels, probs, n_bins=8, strategy=strategy)
    prob_true, prob_pred = calibration_curve(probs.argmax(1) == labels, probs.max(1), n_bins=8, strategy=strategy)
    np.testing.assert_allclose(top.observed[top.count > 0], prob_true)
    np.testing.assert_allclose(top.mean_predicted[top.count > 0], prob_pred)


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.5, 1.0, 20000)
    right = rng.random(20000) < p
    assert calibration_bins(right, p).ece < 0.02
    assert calibration_bins(right, np.full_like(p, 0.99)).ece > 0.2


def test_confusion_matches_scikit_learn_with_cell_ids():
    labels, probs = _probs(200, 4, seed=2, signal=0.8)
    pred = probs.argmax(1)
    ids = np.array([f"s{i:03d}" for i in range(200)])
    c = confusion(labels, pred, num_classes=4, ids=ids)
    np.testing.assert_array_equal(c.counts, confusion_matrix(labels, pred, labels=range(4)))
    for over in ("true", "pred", "all"):
        np.testing.assert_allclose(c.normalized(over), confusion_matrix(labels, pred, labels=range(4), normalize=over))
    for t in range(4):
        for p in range(4):
            np.testing.assert_array_equal(c.ids(t, p), np.sort(ids[(labels == t) & (pred == p)]))
    worst = c.most_confused(3)
    off = c.counts * (1 - np.eye(4, dtype=int))
    assert worst["count"].iloc[0] == off.max()
    assert list(worst["count"]) == sorted(worst["count"], reverse=True)
    pairs = c.most_confused_pairs(2)
    assert pairs["count"].iloc[0] == (off + off.T).max()
    d = c.to_dict()
    assert sum(cell["count"] for cell in d["cells"]) == 200
    json.dumps(d)
    # issue 15: a cell lists its first ids (ascending) beside its full count; the file stays small at 10M rows
    capped = c.to_dict(ids_per_cell=3)
    assert capped["ids_per_cell"] == 3
    for cell in capped["cells"]:
        assert cell["count"] == c.counts[cell["true"], cell["pred"]]
        assert cell["ids"] == c.ids(cell["true"], cell["pred"])[:3].tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(2, 5), st.integers(0, 10_000))
def test_confusion_and_metrics_invariants(n, k, seed):
    labels, probs = _probs(n, k, seed=seed)
    c = confusion(labels, probs.argmax(1), num_classes=k)
    assert c.counts.sum() == n
    assert sorted(np.concatenate(list(c.cell_ids.values())).tolist()) == list(range(n))
    m = classification_metrics(labels, probs)
    for key in ("accuracy", "balanced_accuracy"):
        assert 0 <= m[key] <= 1
    assert all(0 <= v <= 1 for v in m["top_k_accuracy"].values())
    for strategy in ("uniform", "quantile"):
        assert 0 <= expected_calibration_error(labels, probs, strategy=strategy) <= 1
    # the order of the samples does not matter
    perm = np.random.default_rng(seed).permutation(n)
    m2 = classification_metrics(labels[perm], probs[perm])
    assert m2["accuracy"] == pytest.approx(m["accuracy"])
    assert m2["log_loss"] == pytest.approx(m["log_loss"])
    assert expected_calibration_error(labels[perm], probs[perm]) == pytest.approx(expected_calibration_error(labels, probs))
    c2 = confusion(labels[perm], probs[perm].argmax(1), num_classes=k, ids=perm)
    np.testing.assert_array_equal(c2.counts, c.counts)
    for cell, ids in c.cell_ids.items():
        np.testing.assert_array_equal(c2.cell_ids[cell], ids)


def _samples(labels, probs, **extra):
    pred = probs.argmax(1)
    n = len(labels)
    return pd.DataFrame({"id": np.arange(n)[::-1], "label": labels, "pred": pred, "confidence": probs.max(1),
                         "loss": -np.log(probs[np.arange(n), labels]), "correct": pred == labels, **extra})


def test_rankings_sort_the_samples_table():
    labels, probs = _probs(100, 3, seed=5, signal=0.5)
    s = _samples(labels, probs)
    wrong = rank_errors(s, by="confident_wrong")
    assert not wrong["correct"].any() and len(wrong) == (~s["correct"]).sum()
    assert wrong["confidence"].is_monotonic_decreasing
    right = rank_errors(s, by="unsure_right", limit=5)
    assert right["correct"].all() and len(right) == 5 and right["confidence"].is_monotonic_increasing
    assert rank_errors(s, by="loss")["loss"].is_monotonic_decreasing
    by_margin = rank_errors(s, probs, by="margin")
    top2 = np.sort(probs, 1)[:, -2:]
    np.testing.assert_allclose(np.sort(by_margin["margin"]), np.sort(top2[:, 1] - top2[:, 0]))
    assert by_margin["margin"].is_monotonic_increasing
    np.testing.assert_allclose(margins(np.array([[0.5, 0.3, 0.2]])), [0.2])
    with pytest.raises(AnalyzerError, match="unknown ranking"):
        rank_errors(s, by="worst")
    with pytest.raises(AnalyzerError, match="margin needs probs"):
        rank_errors(s, by="margin")


def test_group_metrics_and_largest_gap():
    rng = np.random.default_rng(3)
    n = 600
    group = rng.choice(["north", "south", "east"], n)
    labels = rng.integers(0, 2, n)
    right = np.where(group == "south", rng.random(n) < 0.6, rng.random(n) < 0.95)
    pred = np.where(right, labels, 1 - labels)
    probs = np.zeros((n, 2))
    probs[np.arange(n), pred] = 0.8
    probs[np.arange(n), 1 - pred] = 0.2
    s = _samples(labels, probs, region=group, score=rng.random(n))
    table = group_metrics(s, probs, "region")
    assert table["group"].iloc[0] == "south"  # worst first
    for _, row in table.iterrows():
        member = group == row["group"]
        assert row["size"] == member.sum()
        assert row["accuracy"] == pytest.approx(accuracy_score(labels[member], pred[member]))
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels[member], pred[member]))
        assert row["positive_rate"] == pytest.approx((pred[member] == 1).mean())
        assert row["true_positive_rate"] == pytest.approx(pred[member & (labels == 1)].mean())
        assert row["ece"] == pytest.approx(expected_calibration_error(labels[member], probs[member]))
    gap = largest_gap(table)
    assert gap.worst_group == "south" and gap.gap == pytest.approx(table["accuracy"].max() - table["accuracy"].min())
    assert largest_gap(table, metric="error_rate").worst_group == "south"
    assert len(group_metrics(s, probs, "score", bins=4)) == 4  # a numeric column is cut into quantile groups
    # issue 18, item 7: numeric groups read in value order (as pandas orders its bins), not by accuracy or as text
    spread = s.assign(spread=rng.normal(size=n) * 40)
    bins = pd.qcut(spread["spread"], q=5).cat.categories.astype(str).tolist()
    assert group_metrics(spread, probs, "spread").group.tolist() == bins
    with pytest.raises(AnalyzerError, match="no column 'colour'"):
        group_metrics(s, probs, "colour")
    with pytest.raises(AnalyzerError, match="distinct values"):
        group_metrics(s.assign(name=[f"n{i}" for i in range(n)]), probs, "name")
    with pytest.raises(AnalyzerError, match="unknown group metric"):
        largest_gap(table, metric="speed")


def test_bad_inputs_are_refused_with_a_message():
    labels, probs = _probs(10, 3)
    with pytest.raises(AnalyzerError, match="labels must lie in 0..2"):
        classification_metrics(labels + 3, probs)
    with pytest.raises(AnalyzerError, match="not logits"):
        classification_metrics(labels, probs * 5)
    with pytest.raises(AnalyzerError, match="one integer per sample"):
        classification_metrics(labels[:5], probs)
    with pytest.raises(AnalyzerError, match="2 class names for 3 classes"):
        classification_metrics(labels, probs, class_names=["a", "b"])
    with pytest.raises(AnalyzerError, match="unknown calibration strategy"):
        expected_calibration_error(labels, probs, strategy="equal")
    with pytest.raises(AnalyzerError, match="n_bins must be a positive integer"):
        expected_calibration_error(labels, probs, n_bins=0)
    with pytest.raises(AnalyzerError, match="no samples"):
        classification_metrics(labels[:0], probs[:0])


def test_bins_without_a_part_are_the_bins_of_the_rest():
    """`CalibrationBins.without`: the whole's bins less a part's equal the bins computed on the other rows."""
    labels, probs = _probs(3000, 4, seed=5, signal=0.7)
    correct, confidence = probs.argmax(1) == labels, probs.max(1)
    whole = calibration_bins(correct, confidence, n_bins=12)
    rng = np.random.default_rng(6)
    for member in (rng.random(3000) < 0.2, confidence > 0.8, np.zeros(3000, bool), np.ones(3000, bool)):
        part = calibration_bins(correct[member], confidence[member], n_bins=12)
        rest, reference = whole.without(part), calibration_bins(correct[~member], confidence[~member], n_bins=12)
        np.testing.assert_array_equal(rest.count, reference.count)
        np.testing.assert_allclose(rest.mean_predicted, reference.mean_predicted, rtol=1e-9)  # NaN where empty
        np.testing.assert_allclose(rest.observed, reference.observed, rtol=1e-9, atol=1e-12)
        assert rest.ece == pytest.approx(reference.ece, rel=1e-9, abs=1e-12) or (rest.ece != rest.ece)
    with pytest.raises(AnalyzerError, match="not among"):
        calibration_bins(correct[:10], confidence[:10], n_bins=12).without(whole)  # the whole is not among 10 rows
    with pytest.raises(AnalyzerError, match="same uniform edges"):
        whole.without(calibration_bins(correct, confidence, n_bins=5))
    with pytest.raises(AnalyzerError, match="same uniform edges"):
        calibration_bins(correct, confidence, strategy="quantile").without(whole)


def test_a_confusion_matrix_groups_its_cells_once_and_then_holds_only_them():
    """The counts come at once; the cells' ids are grouped on the first ask, once however many threads ask together
    (a dashboard's sessions share one matrix), equal to grouping by hand, and the per-sample codes are let go."""
    import threading

    rng = np.random.default_rng(3)
    labels, pred = rng.integers(0, 4, 5000), rng.integers(0, 4, 5000)
    ids = rng.permutation(5000)  # not increasing: the lexsort path
    for given in (None, ids):
        c = confusion(labels, pred, num_classes=4, ids=given)
        np.testing.assert_array_equal(c.counts, pd.crosstab(labels, pred).to_numpy())
        assert c.codes is not None
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(c.cell_ids)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(cells is seen[0] for cells in seen) and c.codes is None and c.sample_ids is None
        names = np.arange(5000) if given is None else given
        assert len(seen[0]) == 16
        for (t, p), cell in seen[0].items():  # each cell's ids in ascending order
            np.testing.assert_array_equal(cell, np.sort(names[(labels == t) & (pred == p)]))
