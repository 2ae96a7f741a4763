"""Shift between splits (analyzers.data_health.shift): per-feature tests against scipy's own, Holm against a hand
computation, the domain classifier and MMD on samples with and without a planted shift."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import chi2_contingency, ks_2samp, norm
from scipy.stats.contingency import association

from analyzers.data_health.shift import (FEATURE_COLUMNS, embedding_shift, feature_shift, holm, mmd_statistics,
                                         shift_pair)
from analyzers.errors import AnalyzerError, InvalidOption


def _gauss(n, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_numeric_features_are_scipys_ks_with_cohens_d():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(250, 4))
    b[:, 1] += 0.5
    b[:, 3] = rng.exponential(size=250)
    result = feature_shift(a, b)
    for f in range(4):
        reference = ks_2samp(a[:, f], b[:, f])
        assert result.statistic[f] == pytest.approx(reference.statistic, abs=1e-12)
        assert result.effect[f] == pytest.approx(reference.statistic, abs=1e-12)
        assert result.p_value[f] == pytest.approx(reference.pvalue, rel=1e-9)
        pooled = np.sqrt((299 * a[:, f].var(ddof=1) + 249 * b[:, f].var(ddof=1)) / 548)
        assert result.mean_difference[f] == pytest.approx((b[:, f].mean() - a[:, f].mean()) / pooled)
    assert result.kinds == ("numeric",) * 4 and result.tests == ("ks",) * 4
    assert list(result.shifted) == [False, True, False, True]
    assert list(result.table().columns) == list(FEATURE_COLUMNS)


def test_categorical_features_are_scipys_chi_square_with_cramers_v():
    rng = np.random.default_rng(2)
    a = pd.DataFrame({"x": rng.normal(size=400), "colour": rng.choice(["red", "green", "blue"], 400),
                      "flag": rng.random(400) < 0.5, "code": rng.integers(0, 4, 400)})
    b = pd.DataFrame({"x": rng.normal(size=300), "colour": rng.choice(["red", "green", "blue", "grey"], 300),
                      "flag": rng.random(300) < 0.35, "code": rng.integers(0, 4, 300)})
    result = feature_shift(a, b, categorical=["code"])
    assert result.kinds == ("numeric", "categorical", "categorical", "categorical")
    for f, column in enumerate(a.columns[1:], start=1):
        values = sorted(set(a[column]) | set(b[column]), key=str)
        table = np.array([[np.sum(side[column] == v) for v in values] for side in (a, b)])
        chi2, p, _, _ = chi2_contingency(table, correction=False)
        assert result.statistic[f] == pytest.approx(chi2, rel=1e-9)
        assert result.p_value[f] == pytest.approx(p, rel=1e-9)
        assert result.effect[f] == pytest.approx(association(table, method="cramer", correction=False), rel=1e-9)
        assert np.isnan(result.mean_difference[f])
    assert result.shifted[1] and result.shifted[2]  # a new colour, a flag from 50% to 35%
    # categorical by index on an array: the same numbers
    assert feature_shift(a[["code"]].to_numpy(), b[["code"]].to_numpy(), categorical=[0]).statistic[0] == \
        pytest.approx(result.statistic[3])


def test_holm_is_the_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04, running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.2, 0.9]) == pytest.approx([1.0, 0.6, 1.0])  # 0.6, then 1.0 (capped), then 1.0
    assert holm([0.02]) == pytest.approx([0.02])
    result = feature_shift(_gauss(200, 6, seed=3), _gauss(150, 6, seed=4) + [0, 0.4, 0, 0, 0.3, 0])
    assert result.p_adjusted == pytest.approx(holm(result.p_value))
    with pytest.raises(AnalyzerError, match="between 0 and 1"):
        holm([0.1, np.nan])


def test_the_tabular_samples_train_and_test_split_have_no_shifted_feature_and_a_planted_one_shows():
    import sample_models

    sample = sample_models.get_sample("tabular")
    train, test = sample.load_data("train"), sample.load_data("test")
    result = feature_shift(train.x, test.x, feature_names=train.feature_names)
    assert not result.shifted.any()  # a stratified random split: nothing moved (smallest adjusted p 1.0)
    planted = test.x.copy()
    planted[:, 0] *= 1.2  # mean radius 20% larger
    moved = feature_shift(train.x, planted, feature_names=train.feature_names)
    assert list(np.flatnonzero(moved.shifted)) == [0] and moved.mean_difference[0] > 0.5


def test_domain_auc_is_a_half_on_two_halves_of_one_sample_and_high_on_a_planted_shift():
    x = _gauss(1000)
    same = embedding_shift(x[:500], x[500:])
    assert abs(same.domain_auc - 0.5) < 0.07  # measured 0.54
    assert same.mmd_p > 0.05  # measured 0.16 (over 20 null draws of 200 a side: 0.04 to 0.95, one below 0.05)
    one = _gauss(500, seed=1)
    one[:, 0] += 1.5
    shifted_one = embedding_shift(x[:500], one)
    bayes = norm.cdf(1.5 / np.sqrt(2))  # 0.855: no classifier does better on a 1.5-std mean shift
    assert bayes - 0.06 < shifted_one.domain_auc < bayes + 0.03  # measured 0.856
    three = _gauss(500, seed=2)
    three[:, :3] += 1.5
    shifted = embedding_shift(x[:500], three)
    assert shifted.domain_auc > 0.9  # measured 0.968, the optimum Phi(1.5 sqrt(3) / sqrt(2)) = 0.97
    assert shifted.mmd_p == pytest.approx(1 / 201)  # no permutation comes near the observed MMD
    assert shifted_one.mmd_p == pytest.approx(1 / 201)
    assert shifted.mmd > 10 * max(same.mmd, 1e-4)


def test_the_best_separated_rows_are_a_new_cluster():
    a = _gauss(400, 8, seed=5)
    b = _gauss(400, 8, seed=6)
    cluster = np.arange(0, 400, 10)  # 40 rows of b moved far away
    b[cluster] += 6.0
    result = embedding_shift(a, b, top_k=10)
    assert set(result.top_b) <= set(cluster)  # the AUC is only 0.55: nine tenths of b are like a
    assert result.mmd_p < 0.01
    table = result.table()
    assert list(table["side"]) == ["a"] * 10 + ["b"] * 10 and table["probability"].between(0, 1).all()
    assert (np.diff(table[table.side == "b"]["probability"]) <= 0).all()


def test_mmd_is_the_full_matrix_estimate_whatever_the_batch():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 5)), rng.normal(0.3, 1.0, size=(45, 5))
    z = np.concatenate([a, b])
    sigma = np.median(cdist(z, z)[np.triu_indices(len(z), 1)])
    kernel = np.exp(-cdist(z, z, "sqeuclidean") / (2 * sigma ** 2))
    kaa, kbb, kab = kernel[:60, :60], kernel[60:, 60:], kernel[:60, 60:]
    reference = ((kaa.sum() - 60) / (60 * 59) + (kbb.sum() - 45) / (45 * 44) - 2 * kab.mean())
    sides = (np.arange(105) < 60)[:, None].astype(float)
    for batch in (1, 7, 512):
        assert mmd_statistics(z, sides, sigma, batch_size=batch)[0] == pytest.approx(reference, rel=1e-9)
    result = embedding_shift(a, b, permutations=50)
    assert result.bandwidth == pytest.approx(sigma) and result.mmd == pytest.approx(reference, rel=1e-9)
    assert result.mmd_p == pytest.approx((1 + np.sum(result.null_mmd >= result.mmd)) / 51)


def test_seeded_runs_repeat_exactly_and_subsample_the_given_rows():
    a, b = _gauss(700, 6, seed=8), _gauss(650, 6, seed=9) + 0.2
    first = embedding_shift(a, b, seed=3, max_samples=300, permutations=40)
    again = embedding_shift(a, b, seed=3, max_samples=300, permutations=40)
    assert first.to_json() == again.to_json()
    assert np.array_equal(first.null_mmd, again.null_mmd)
    other = embedding_shift(a, b, seed=4, max_samples=300, permutations=40)
    assert not np.array_equal(first.rows_a, other.rows_a)
    assert len(first.rows_a) == len(first.rows_b) == 300
    assert (np.diff(first.rows_a) > 0).all() and first.rows_a.max() < 700
    assert set(first.top_a) <= set(first.rows_a) and set(first.top_b) <= set(first.rows_b)


def test_results_are_plain_json_for_shift_json():
    a, b = _gauss(100, 3, seed=10), _gauss(80, 3, seed=11)
    b[:, 2] = 5.0  # constant on one side
    a[:, 2] = 5.0  # and the other: d = 0, KS 0, p 1
    features = feature_shift(a, b, feature_names=["u", "v", "w"])
    assert features.mean_difference[2] == 0 and features.p_value[2] == 1
    embedding = embedding_shift(a, b, permutations=20)
    record = shift_pair("train", "test", features=features, embedding=embedding)
    text = json.dumps(record, allow_nan=False)
    back = json.loads(text)
    assert {"a", "b", "domain_auc", "mmd", "mmd_p", "features"} <= set(back)
    assert [f["feature"] for f in back["features"]] == ["u", "v", "w"]
    c = b.copy()
    c[:, 2] = 6.0  # two constants that differ: d is infinite, None in JSON
    assert json.loads(json.dumps(feature_shift(a, c).to_json(), allow_nan=False))["features"][2][
        "mean_difference"] is None


def test_bad_input_and_options_are_refused_with_their_fix():
    a = _gauss(50, 4)
    with pytest.raises(AnalyzerError, match="same features"):
        feature_shift(a, _gauss(50, 3))
    with pytest.raises(AnalyzerError, match="at least 2 rows"):
        feature_shift(a, a[:0])
    with pytest.raises(AnalyzerError, match="reshape"):
        feature_shift(a[:, 0], a[:, 1])
    nan = a.copy()
    nan[3, 2] = np.nan
    with pytest.raises(AnalyzerError, match="NaN"):
        feature_shift(a, nan)
    with pytest.raises(AnalyzerError, match="different columns"):
        feature_shift(pd.DataFrame(a, columns=list("pqrs")), pd.DataFrame(a, columns=list("pqrt")))
    with pytest.raises(AnalyzerError, match="missing"):
        feature_shift(pd.DataFrame({"c": ["x", "y", None]}), pd.DataFrame({"c": ["x", "y", "y"]}))
    with pytest.raises(InvalidOption, match="alpha"):
        feature_shift(a, a, alpha=5)
    with pytest.raises(InvalidOption, match="not a feature"):
        feature_shift(a, a, categorical=["nope"])
    with pytest.raises(AnalyzerError, match="dimensions"):
        embedding_shift(a, _gauss(50, 3))
    with pytest.raises(AnalyzerError, match="NaN"):
        embedding_shift(a, nan)
    with pytest.raises(AnalyzerError, match="empty"):
        embedding_shift(a, a[:0])
    with pytest.raises(AnalyzerError, match="fewer than the 5 folds"):
        embedding_shift(a, a[:3])
    with pytest.raises(InvalidOption, match="folds"):
        embedding_shift(a, a, folds=1)
    with pytest.raises(InvalidOption, match="permutations"):
        embedding_shift(a, a, permutations=-1)


def test_slice_shift_counts_each_split_and_tests_with_fisher_and_holm():
    from scipy.stats import fisher_exact

    from analyzers.data_health.shift import SLICE_SHIFT_COLUMNS, slice_shift

    rng = np.random.default_rng(7)
    n = 800
    split = np.where(np.arange(n) < 500, "train", "test")
    group = rng.integers(0, 4, n)
    # group 0 grows from 5% to 60% errors in test; group 1 stays at 10%; group 2 is absent from train
    group[(split == "train") & (group == 2)] = 3
    rate = np.select([group == 0, group == 1, group == 2], [np.where(split == "train", 0.05, 0.6), 0.1, 0.5], 0.1)
    correct = rng.random(n) >= rate
    samples = pd.DataFrame({"id": np.arange(n) + 100, "correct": correct, "split": split})
    slices = pd.DataFrame({"description": ["g == 0", "g == 1", "g == 2"], "source": ["metadata"] * 3,
                           "ids": [samples["id"][group == g].to_numpy() for g in range(3)]})
    table = slice_shift(slices, samples, split_a="train", split_b="test")
    assert list(table.columns) == list(SLICE_SHIFT_COLUMNS)
    assert table["change"].tolist() == ["grew", "same", "absent"]
    wrong = ~correct
    p_values = []
    for g, row in zip(range(3), table.itertuples()):
        a, b = (group == g) & (split == "train"), (group == g) & (split == "test")
        assert (row.size_a, row.size_b) == (a.sum(), b.sum())
        assert (row.errors_a, row.errors_b) == ((a & wrong).sum(), (b & wrong).sum())
        assert row.share_a == pytest.approx(a.sum() / 500) and row.share_b == pytest.approx(b.sum() / 300)
        share_p = fisher_exact([[a.sum(), 500 - a.sum()], [b.sum(), 300 - b.sum()]])[1]
        assert row.share_p == pytest.approx(share_p)
        if a.sum():
            p_values.append(fisher_exact([[(a & wrong).sum(), (a & ~wrong).sum()],
                                          [(b & wrong).sum(), (b & ~wrong).sum()]])[1])
    np.testing.assert_allclose(table["error_p"][:2], p_values)
    np.testing.assert_allclose(table["error_p_adjusted"][:2], holm(p_values))
    assert np.isnan(table["error_p"][2]) and table["share_a"][2] == 0
    with pytest.raises(AnalyzerError, match="no samples of split"):
        slice_shift(slices, samples, split_a="train", split_b="validation")
