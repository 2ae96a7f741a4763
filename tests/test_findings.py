"""Findings on one scale (issue 18, item 6): planted problems must lead, and suspects that are only the errors are no
finding. References: scikit-learn's confusion matrix, hand-counted excess errors, and a simulated calibrated model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyzers.evaluation.findings import (MIN_ERRORS_FOR_NOISE, STRONG_SUSPECT, calibration_noise_floor,
                                           rank_findings)
from analyzers.errors import AnalyzerError
from analyzers.evaluation.metrics import expected_calibration_error


def _samples(labels, probs, pred=None):
    pred = probs.argmax(1) if pred is None else pred
    return pd.DataFrame({"id": np.arange(len(labels)).astype(str), "label": labels, "pred": pred,
                         "correct": pred == labels})


def _calibrated(n=2000, k=4, seed=0):
    """Probabilities of a calibrated model: labels drawn from them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 5.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return labels, probs


def test_an_under_confident_model_leads_with_calibration():
    """The case the issue saw: ECE about 0.4 (confidence 0.45, accuracy 0.875) got no finding at all."""
    rng = np.random.default_rng(0)
    n, k = 400, 4
    labels = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.875, labels, (labels + 1) % k)
    probs = np.full((n, k), 0.55 / 3)
    probs[np.arange(n), pred] = 0.45
    findings = rank_findings(_samples(labels, probs, pred), probs)
    top = findings[0]
    assert top.kind == "calibration" and top.details["direction"] == "under"
    ece = expected_calibration_error(labels, probs)
    assert ece == pytest.approx(abs(0.45 - (pred == labels).mean()), abs=1e-9)  # one bin holds every sample
    assert top.impact == pytest.approx(n * (ece - top.details["noise_floor"]))


def test_a_calibrated_model_with_a_planted_slice_leads_with_the_slice():
    labels, probs = _calibrated()
    samples = _samples(labels, probs)
    overall = 1 - samples["correct"].mean()
    # the planted slice: 100 samples of which 60 are wrong
    slices = pd.DataFrame({"source": ["features"], "description": ["colour == red"], "size": [100], "errors": [60],
                           "error_rate": [0.6], "lift": [0.6 / overall], "score": [1.0], "ids": [[]],
                           "conditions": ["[]"]})
    findings = rank_findings(samples, probs, slices=slices)
    assert findings[0].kind == "slice" and findings[0].impact == pytest.approx(100 * (0.6 - overall))
    calibration = next((f for f in findings if f.kind == "calibration"), None)
    # a calibrated model's ECE is its sample's noise: little or nothing is left of it
    assert calibration is None or calibration.impact < 0.3 * findings[0].impact


def test_the_noise_floor_is_what_a_calibrated_model_shows():
    labels, probs = _calibrated(n=500, seed=3)
    floor = calibration_noise_floor(probs, draws=40)
    assert 0 < floor < 0.1
    assert expected_calibration_error(labels, probs) == pytest.approx(floor, abs=0.03)


def test_the_noise_floor_of_large_bins_is_the_normal_mean_deviation_of_their_draws():
    """issue 15: bins of many samples take sqrt(2 var / pi) for the draws' mean absolute deviation; on 300k samples
    it must equal drawing every sample (400 draws, by hand here) to within the draws' noise."""
    from analyzers.evaluation.findings import NORMAL_BIN_VARIANCE
    from analyzers.evaluation.metrics import DEFAULT_BINS, calibration_bins

    rng = np.random.default_rng(5)
    confidence = np.clip(rng.beta(8, 2, 300_000), 0.5, 1.0)
    probs = np.column_stack([confidence, 1 - confidence])
    edges = calibration_bins(np.zeros(1), np.zeros(1), n_bins=DEFAULT_BINS).edges
    which = np.searchsorted(edges[1:-1], confidence)
    variance = np.bincount(which, weights=confidence * (1 - confidence), minlength=DEFAULT_BINS)
    assert (variance >= NORMAL_BIN_VARIANCE).sum() >= 3  # the normal path is taken for several bins
    expected = np.bincount(which, weights=confidence, minlength=DEFAULT_BINS)
    drawn = [np.abs(np.bincount(which, weights=rng.random(len(confidence)) < confidence, minlength=DEFAULT_BINS)
                    - expected).sum() / len(confidence) for _ in range(400)]
    assert calibration_noise_floor(probs) == pytest.approx(np.mean(drawn), rel=0.04)
    assert np.isnan(calibration_noise_floor(np.zeros((0, 3))))  # no samples: no floor, not a division by zero


def test_confused_pairs_count_their_cell_as_scikit_learn_does():
    from sklearn.metrics import confusion_matrix

    labels, probs = _calibrated(n=600, k=3, seed=1)
    pred = probs.argmax(1)
    cells = confusion_matrix(labels, pred, labels=range(3))
    np.fill_diagonal(cells, 0)
    pairs = [f for f in rank_findings(_samples(labels, probs), probs) if f.kind == "confusion"]
    assert pairs[0].impact == cells.max()
    assert (pairs[0].details["true"], pairs[0].details["pred"]) == np.unravel_index(cells.argmax(), cells.shape)


def test_class_imbalance_counts_the_rare_classes_excess_errors():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(500, int), np.ones(500, int), np.full(40, 2)]
    pred = labels.copy()
    pred[rng.choice(1000, 50, replace=False)] = 2  # 5% errors among the common classes
    pred[1000:1030] = 0  # the rare class: 30 of its 40 wrong
    probs = np.eye(3)[pred] * 0.9 + 0.1 / 3
    found = next(f for f in rank_findings(_samples(labels, probs, pred), probs) if f.kind == "imbalance")
    overall = (pred != labels).mean()
    assert found.details["rare"] == [2] and found.impact == pytest.approx(30 - 40 * overall)
    assert found.details["recall"][2] == pytest.approx(0.25)


def test_label_noise_suspects_that_are_every_error_are_no_finding():
    labels, probs = _calibrated(n=300, seed=4)
    samples = _samples(labels, probs)
    wrong = samples[~samples["correct"]]
    assert len(wrong) >= MIN_ERRORS_FOR_NOISE
    as_errors = pd.DataFrame({"id": wrong["id"], "score": 0.95, "label": wrong["label"],
                              "suggested_label": wrong["pred"]})
    assert not [f for f in rank_findings(samples, probs, label_noise=as_errors) if f.kind == "label_noise"]
    few = as_errors.head(5).assign(score=np.linspace(STRONG_SUSPECT, 0.99, 5))
    found = [f for f in rank_findings(samples, probs, label_noise=few) if f.kind == "label_noise"]
    assert found and found[0].impact == 5 and found[0].details["top_id"] == few["id"].iloc[-1]
    # with few errors there is nothing to stand out from: the same five suspects among 8 errors are no finding
    right = samples[samples["correct"]]
    eight = pd.concat([right, wrong.head(8)]).reset_index(drop=True)
    assert not [f for f in rank_findings(eight, probs[eight["id"].astype(int)], label_noise=few)
                if f.kind == "label_noise"]


def test_planted_flips_are_a_label_noise_finding_and_a_clean_run_is_not():
    """The label-noise module's own suspects on a calibrated model: 80 labels of 2000 flipped to another class give
    a finding made of the flips; the same samples with their true labels (their errors ordinary mistakes) give none
    worth ranking first."""
    from analyzers.evaluation.label_noise import find_label_issues

    for seed in range(3):
        true, probs = _calibrated(n=2000, seed=seed)
        rng = np.random.default_rng(seed)
        flipped = np.zeros(len(true), dtype=bool)
        flipped[rng.choice(len(true), 80, replace=False)] = True
        labels = true.copy()
        labels[flipped] = (true[flipped] + rng.integers(1, 4, 80)) % 4
        samples = _samples(labels, probs)
        noise = find_label_issues(labels, probs, ids=samples["id"].to_numpy()).table
        found = [f for f in rank_findings(samples, probs, label_noise=noise) if f.kind == "label_noise"]
        assert found, seed
        strong = noise[noise["score"] >= STRONG_SUSPECT]
        assert found[0].impact == len(strong) >= 30  # measured: 47, 52, 52 strong suspects
        assert flipped[strong["id"].astype(int)].mean() >= 0.9  # measured: 1.00, 0.98, 0.96 of them planted
        assert flipped[int(found[0].details["top_id"])]
        clean = _samples(true, probs)
        quiet = find_label_issues(true, probs, ids=clean["id"].to_numpy()).table
        assert (quiet["score"] >= STRONG_SUSPECT).sum() <= 2  # measured: 0, 1, 1


def test_the_noise_floor_is_the_mean_ece_of_labels_drawn_from_the_probabilities():
    """Reference: labels drawn from each row's distribution, scored by expected_calibration_error, 1000 draws."""
    labels, probs = _calibrated(n=2000, seed=7)
    rng = np.random.default_rng(11)
    cumulative = np.cumsum(probs, axis=1)
    drawn = [(rng.random((len(probs), 1)) > cumulative).sum(axis=1).clip(0, probs.shape[1] - 1) for _ in range(1000)]
    reference = np.mean([expected_calibration_error(d, probs) for d in drawn])
    assert calibration_noise_floor(probs, draws=1000) == pytest.approx(reference, rel=0.04)


def test_a_checked_runs_stored_columns_give_the_findings_of_its_probabilities():
    """A run's `correct` and `confidence` (tied to probs.npy by its check) stand in for the probabilities: the
    same findings, impacts and details, on a model with a rare class, a confused pair and over-confidence."""
    rng = np.random.default_rng(3)
    n, k = 3000, 4
    labels = np.where(rng.random(n) < 0.05, 3, rng.integers(0, 3, n))
    logits = rng.normal(size=(n, k)) * 2.0
    logits[np.arange(n), labels] += 2.5
    logits[labels == 1, 2] += 2.0  # class 1 is taken for class 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    samples = _samples(labels, probs).assign(confidence=probs.max(1).astype(np.float32))
    from_probs = rank_findings(samples, probs)
    from_columns = rank_findings(samples, num_classes=k)
    assert {f.kind for f in from_probs} >= {"calibration", "confusion"}
    assert [(f.kind, round(f.impact, 3)) for f in from_columns] == [(f.kind, round(f.impact, 3)) for f in from_probs]
    for a, b in zip(from_columns, from_probs):
        assert a.details.keys() == b.details.keys()
        for key, value in a.details.items():
            assert value == (pytest.approx(b.details[key], rel=1e-5) if isinstance(value, float) else
                             b.details[key]), key
    with pytest.raises(AnalyzerError, match="num_classes"):
        rank_findings(samples)
    with pytest.raises(AnalyzerError, match="label must be class indices 0..2"):
        rank_findings(samples, num_classes=3)  # a label 3 names no class of three
    with pytest.raises(AnalyzerError, match="confidence"):
        rank_findings(samples.assign(confidence=samples["confidence"] + 1), num_classes=k)


def test_the_dashboards_findings_and_reliability_of_a_run_equal_those_of_its_probabilities(sample_run_dir):
    """The Overview page reads the stored `correct` and `confidence` (10M-row runs); on the digits run they give
    what the probabilities give: metrics.top_label_bins for both bin strategies, and rank_findings."""
    from analyzers.evaluation.metrics import top_label_bins
    from analyzers.loading.runs import open_run
    from dashboard import data

    run = open_run(sample_run_dir("digits"))
    labels = run.sample_table["label"].to_numpy()
    for strategy in ("uniform", "quantile"):
        shown, reference = data.reliability(run, strategy), top_label_bins(labels, run.probs, strategy=strategy)
        assert shown["ece"] == pytest.approx(reference.ece, abs=1e-6)
        np.testing.assert_allclose(np.asarray(shown["count"]), reference.count)
        np.testing.assert_allclose(np.asarray(shown["observed"], dtype=float), reference.observed, atol=1e-6)
    reference = rank_findings(run.samples, run.probs, slices=data.optional_table(run, "slices.parquet"),
                              label_noise=data.optional_table(run, "label_noise.parquet"))
    assert [(f.kind, round(f.impact, 2)) for f in data.findings(run)] == [(f.kind, round(f.impact, 2))
                                                                          for f in reference]
    assert reference


@pytest.mark.parametrize("name", ["digits", "shapes", "fraud"])
def test_the_stored_findings_are_those_ranked_from_the_runs_tables(name, sample_run_dir):
    """findings.json, written by the evaluation stage, holds what rank_findings gives on the stored run's tables
    and probabilities, every field equal, and the dashboard reads it instead of ranking again."""
    from analyzers.evaluation import findings as findings_module
    from analyzers.evaluation.findings import FINDINGS
    from analyzers.loading.runs import open_run
    from dashboard import summaries

    run = open_run(sample_run_dir(name))
    assert run.has(FINDINGS)
    reference = rank_findings(run.samples, run.probs, slices=summaries.optional_table(run, "slices.parquet"),
                              label_noise=summaries.optional_table(run, "label_noise.parquet"))
    assert reference
    stored = summaries.findings(run)
    assert [f.kind for f in stored] == [f.kind for f in reference]
    for a, b in zip(stored, reference):
        assert a.impact == pytest.approx(b.impact, rel=1e-9, abs=1e-9)
        assert a.details.keys() == b.details.keys()
        for key in a.details:
            if isinstance(b.details[key], float):
                assert a.details[key] == pytest.approx(b.details[key], rel=1e-9, nan_ok=True), key
            else:
                assert a.details[key] == b.details[key], key
    # read, not ranked: the page gets the same with the ranking made to fail
    original = findings_module.rank_findings
    try:
        findings_module.rank_findings = lambda *a, **k: pytest.fail("the stored findings were ranked again")
        assert summaries.findings(run) == stored
    finally:
        findings_module.rank_findings = original


def test_a_run_without_stored_findings_has_them_ranked(sample_run_dir, tmp_path):
    """A run from before findings.json: the page ranks them from the tables, as the stage would have stored."""
    import shutil

    from analyzers.evaluation.findings import FINDINGS
    from analyzers.loading.runs import open_run
    from dashboard import summaries

    copy = tmp_path / "digits"
    shutil.copytree(sample_run_dir("digits"), copy)
    stored = summaries.findings(open_run(copy))
    (copy / FINDINGS).unlink()
    assert summaries.findings(open_run(copy)) == stored


def test_a_selections_metrics_equal_those_computed_on_its_rows_and_the_rest(sample_run_dir):
    """`data.subset_metrics` takes the rest's bins from the run's (CalibrationBins.without): on the digits run they
    equal metrics.calibration_bins of the other rows, for a slice's sorted members and for unsorted repeated ids."""
    from analyzers.evaluation.metrics import calibration_bins
    from analyzers.loading.runs import open_run
    from dashboard import data

    run = open_run(sample_run_dir("digits"))
    correct = run.sample_table["correct"].to_numpy()
    confidence = run.sample_table["confidence"].to_numpy().astype(np.float64)
    n = len(correct)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(n, n // 3, replace=False))
    empty = data.subset_metrics(run, np.arange(0))
    assert empty["bins_inside"] is None and empty["accuracy"] != empty["accuracy"]
    assert empty["bins_outside"]["count"] == calibration_bins(correct, confidence).count.tolist()
    for rows in (chosen, np.concatenate([chosen[::-1], chosen[:5]]), np.arange(n), np.arange(1)):
        got = data.subset_metrics(run, rows)
        member = np.zeros(n, bool)
        member[rows] = True
        assert got["accuracy"] == pytest.approx(correct[member].mean())
        assert got["mean_confidence"] == pytest.approx(confidence[member].mean())
        inside = calibration_bins(correct[member], confidence[member])
        assert got["ece_inside"] == pytest.approx(inside.ece, abs=1e-9)
        assert got["bins_inside"]["count"] == inside.count.tolist()
        if member.all():
            assert got["bins_outside"] is None and got["ece_outside"] != got["ece_outside"]
            continue
        outside = calibration_bins(correct[~member], confidence[~member])
        assert got["bins_outside"]["count"] == outside.count.tolist()
        assert got["ece_outside"] == pytest.approx(outside.ece, abs=1e-9)
        np.testing.assert_allclose(np.asarray(got["bins_outside"]["observed"], dtype=float), outside.observed,
                                   atol=1e-9)


def test_the_reliability_bins_are_the_stages_stored_ones_and_computed_where_those_do_not_fit(sample_run_dir,
                                                                                          tmp_path, monkeypatch):
    """The Overview's reliability bins are the evaluation stage's (metrics.json: nothing is read of 10M rows) for its
    bins, equal to those computed from the samples; other bins, and stored bins damaged in any field, are computed
    from the samples' columns, with the same result as metrics.calibration_bins on them."""
    import json
    import shutil

    from analyzers.evaluation import metrics
    from analyzers.loading.runs import open_run
    from dashboard import summaries

    copy = tmp_path / "digits"
    shutil.copytree(sample_run_dir("digits"), copy)
    run = open_run(copy)
    correct = run.sample_table["correct"].to_numpy(dtype=bool)
    confidence = run.sample_table["confidence"].to_numpy(dtype=np.float64)

    def computed(strategy, n_bins=10):
        return metrics.calibration_bins(correct, confidence, n_bins=n_bins, strategy=strategy)

    references = {strategy: computed(strategy) for strategy in ("uniform", "quantile")}
    odd = computed("uniform", 7)
    with monkeypatch.context() as patched:  # the stored bins: nothing computed
        patched.setattr(metrics, "calibration_bins", lambda *a, **k: pytest.fail("computed, not read"))
        for strategy, reference in references.items():
            shown = summaries.top_label_calibration(open_run(copy), strategy)
            np.testing.assert_array_equal(shown.count, reference.count)
            np.testing.assert_array_equal(shown.edges, reference.edges)
            np.testing.assert_allclose(shown.observed, reference.observed, rtol=1e-12, equal_nan=True)
            np.testing.assert_allclose(shown.mean_predicted, reference.mean_predicted, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(summaries.top_label_calibration(run, "uniform", 7).count, odd.count)
    stored = json.loads((copy / "metrics.json").read_text())
    damages = {"a count of the wrong length": ("count", lambda v: v[:-1]),
               "a text count": ("count", lambda v: ["x"] * len(v)),
               "a negative count": ("count", lambda v: [-1] + v[1:]),
               "an edge above 1": ("edges", lambda v: v[:-1] + [2.0]),
               "a mean above 1": ("observed", lambda v: [1.5 if x is not None else None for x in v]),
               "counts of fewer samples": ("count", lambda v: [c // 2 for c in v]),
               "other equal-width edges": ("edges", lambda v: [e * 0.9 for e in v]),
               "an edge past a float": ("edges", lambda v: v[:-1] + [10 ** 400]),
               "counts past int64": ("count", lambda v: [2 ** 63, 2 ** 63 + 2] + v[2:]),
               "a count that is a number": ("count", lambda v: 5)}
    for what, (field, damage) in damages.items():
        broken = json.loads(json.dumps(stored))
        entry = broken["calibration"]["uniform"]["top_label"]
        entry[field] = damage(entry[field])
        (copy / "metrics.json").write_text(json.dumps(broken))
        shown = summaries.top_label_calibration(open_run(copy), "uniform")
        np.testing.assert_array_equal(shown.count, references["uniform"].count, err_msg=what)
        np.testing.assert_array_equal(shown.edges, references["uniform"].edges, err_msg=what)
        np.testing.assert_allclose(shown.observed, references["uniform"].observed, equal_nan=True, err_msg=what)


def test_stored_calibration_bins_read_back_as_written_and_bad_ones_are_refused_in_one_line():
    from analyzers.errors import AnalyzerError
    from analyzers.evaluation.metrics import CalibrationBins, calibration_bins

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 500)
    for strategy in ("uniform", "quantile"):
        bins = calibration_bins(rng.random(500) < confidence, confidence, strategy=strategy)
        back = CalibrationBins.from_dict(bins.to_dict())
        assert back.strategy == strategy and back.ece == pytest.approx(bins.ece, rel=1e-12)
        np.testing.assert_array_equal(back.count, bins.count)
        np.testing.assert_allclose(back.observed, bins.observed, equal_nan=True, rtol=1e-15)
    good = calibration_bins(np.ones(3, bool), np.array([0.2, 0.5, 0.9])).to_dict()
    for broken in ({**good, "strategy": "magic"}, {**good, "count": good["count"][:3]},
                   {**good, "count": [0.5] * 10}, {**good, "edges": list(reversed(good["edges"]))},
                   {**good, "observed": [0.5] * 10}, {k: v for k, v in good.items() if k != "edges"}, "bins",
                   {**good, "edges": good["edges"][:-1] + [10 ** 400]}, {**good, "count": 5},
                   {**good, "count": [2 ** 63] + good["count"][1:]}, {**good, "count": [2 ** 70] + good["count"][1:]}):
        with pytest.raises(AnalyzerError, match="stored calibration bins") as caught:
            CalibrationBins.from_dict(broken)
        assert "\n" not in str(caught.value)
