"""Faithfulness scores of a regression's maps: the curves follow the predicted value, normalised by the span
f(x) - f(b) from 1 (nothing removed) to 0 (all removed). On a planted linear model the exact map (weight x input,
which Integrated Gradients equals) beats a random order of removal on every sample, whichever side of the baseline
the input lies, and the reversed map loses to it; the curves equal the linear model's hand-computed predictions; a
span too small to divide by is NaN; ROAD on a sequence ranks the same way; the Explain page shows the scores."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from analyzers.evaluation.tasks import model_for_task, task_named
from analyzers.explanations.attributions import explain
from analyzers.explanations.perturbation import (MIN_SPAN, deletion_insertion, noisy_linear_imputation, road,
                                                 road_skip_reason)
from analyzers.loading.models import wrap_module

WEIGHTS = np.array([3.0, -2.0, 1.5, 0.5, -1.0, 0.2, 0.0, 4.0], np.float32)
BIAS = 10.0


def _value_model(module: nn.Module, input_shape: tuple):
    """`module` read as a regression: its one output is the predicted value (output kind "value")."""
    return model_for_task(wrap_module(module.eval(), input_shape), task_named("regression", 1))


def _linear(weights=WEIGHTS, bias=BIAS):
    layer = nn.Linear(len(weights), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights)[None])
        layer.bias.fill_(bias)
    return _value_model(layer, (len(weights),))


def _inputs(n=200, seed=0):
    return np.random.default_rng(seed).normal(size=(n, len(WEIGHTS))).astype(np.float32)


def _predict(x, weights=WEIGHTS, bias=BIAS):
    """The linear model by hand, in float64: the independent reference of every curve."""
    return np.asarray(x, np.float64) @ np.asarray(weights, np.float64) + bias


@pytest.fixture(scope="module")
def planted():
    model, x = _linear(), _inputs()
    return model, x, x * WEIGHTS  # the exact map: each feature's contribution to f(x) - f(0)


def test_the_curves_are_the_linear_models_hand_computed_predictions(planted):
    model, x, exact = planted
    curves = deletion_insertion(model, x, exact, steps=len(WEIGHTS))  # one feature per step
    assert curves.value and curves.fractions.tolist() == [k / 8 for k in range(9)]
    span = _predict(x) - BIAS  # f(x) - f(0)
    assert (span > 0).any() and (span < 0).any()  # inputs on both sides of the baseline
    # a signed map is read as evidence for the span: the contributions toward its sign are removed first
    order = np.argsort(-(exact * np.sign(span)[:, None]), axis=1, kind="stable")
    for k in range(9):
        removed = np.zeros_like(x, dtype=bool)
        np.put_along_axis(removed, order[:, :k], True, axis=1)
        np.testing.assert_allclose(curves.deletion[:, k], _predict(np.where(removed, 0, x)), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(curves.insertion[:, k], _predict(np.where(removed, x, 0)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(curves.start, _predict(x), rtol=1e-5)
    np.testing.assert_allclose(curves.floor, BIAS, rtol=1e-6)
    # the normalised deletion curve runs from 1 (nothing removed) to 0 (all removed); its area by hand
    by_hand = (curves.deletion.astype(np.float64) - BIAS) / span[:, None]
    np.testing.assert_allclose(by_hand[:, 0], 1, rtol=1e-4)
    np.testing.assert_allclose(by_hand[:, -1], 0, atol=1e-4)
    finite = np.isfinite(curves.deletion_auc_norm)
    assert finite.mean() > 0.9
    np.testing.assert_allclose(curves.deletion_auc_norm[finite],
                               np.trapezoid(by_hand, curves.fractions, axis=1)[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(curves.insertion_auc_norm[finite], np.trapezoid(
        (curves.insertion - BIAS) / span[:, None], curves.fractions, axis=1)[finite], rtol=1e-4, atol=1e-4)
    random_by_hand = np.trapezoid((curves.random_deletion - BIAS) / span[:, None], curves.fractions, axis=1)
    np.testing.assert_allclose(curves.deletion_vs_random[finite],
                               (random_by_hand - np.trapezoid(by_hand, curves.fractions, axis=1))[finite],
                               rtol=1e-4, atol=1e-4)


def test_the_exact_map_beats_a_random_order_and_the_reversed_map_loses(planted):
    model, x, exact = planted
    ig = explain(model, x, None, "integrated_gradients")
    np.testing.assert_allclose(ig, exact, rtol=1e-3, atol=1e-3)  # IG of a linear model from zeros: w * x
    scores = {name: deletion_insertion(model, x, attr).deletion_vs_random for name, attr in {
        "exact": exact, "integrated_gradients": ig, "reversed": -exact}.items()}
    # ten random maps per sample: one sample's score swings by about 2 spans (contributions of both signs make the
    # normalised curves overshoot), so the random map's centre is read over many maps, by its median
    tiled = np.tile(x, (10, 1))
    scores["random"] = deletion_insertion(model, tiled, np.random.default_rng(1).normal(size=tiled.shape)
                                          ).deletion_vs_random
    for name, values in scores.items():
        assert np.isfinite(values).mean() > 0.9, name
    mean = {name: float(np.nanmean(v)) for name, v in scores.items()}
    median = {name: float(np.nanmedian(v)) for name, v in scores.items()}
    assert mean["exact"] > 1.0 and median["exact"] > 0.5, (mean, median)
    assert mean["integrated_gradients"] == pytest.approx(mean["exact"], abs=0.01)
    assert mean["reversed"] < -1.0 and median["reversed"] < -0.5, (mean, median)
    assert abs(median["random"]) < 0.15 and abs(mean["random"]) < 0.3, (mean, median)
    # removing the largest contributions toward the span first is the best order of all for a linear model, the
    # reversed one the worst: no random order does better, or worse, on any sample
    assert np.nanmin(scores["exact"]) > -1e-4 and np.nanmax(scores["reversed"]) < 1e-4
    # without reading the sign as evidence for the span, the exact map looks worse than chance below the baseline
    below = _predict(x) < BIAS
    unsigned = deletion_insertion(model, x, exact, signed=False).deletion_vs_random
    assert np.nanmean(unsigned[below]) < 0 < np.nanmean(scores["exact"][below])


def test_a_span_too_small_to_divide_by_is_nan():
    model = _linear()
    x = np.zeros((3, 8), np.float32)
    x[1, 0] = 1.0  # f(x) - f(0) = 3: a span of 3 over a range of 3
    x[2, [0, 7]] = [4.0, -2.9875]  # 12 - 11.95 = 0.05, under 1% of the range of 12 the curves cover
    curves = deletion_insertion(model, x, x * WEIGHTS, steps=8)
    np.testing.assert_allclose(curves.start, _predict(x), rtol=1e-5)
    span = curves.start[2] - curves.floor[2]
    reach = max(curves.deletion[2].max(), curves.insertion[2].max()) - min(curves.deletion[2].min(),
                                                                           curves.insertion[2].min())
    assert abs(span) < MIN_SPAN * reach  # the rule of VALUE_MIN_SPAN
    for name in ("deletion_auc_norm", "insertion_auc_norm", "deletion_vs_random", "insertion_vs_random"):
        values = getattr(curves, name)
        assert np.isnan(values[0]) and np.isfinite(values[1]) and np.isnan(values[2]), name
    assert curves.deletion_vs_random[1] >= 0  # its one feature that moves the value goes first: no order beats that
    # a model that ignores its inputs: every span is 0, every score NaN
    flat = deletion_insertion(_linear(np.zeros(8, np.float32), 150.0), _inputs(5), _inputs(5) * WEIGHTS)
    assert np.isnan(flat.deletion_vs_random).all() and np.isnan(flat.deletion_auc_norm).all()


def test_classification_curves_still_follow_the_probability():
    layer = nn.Linear(8, 2).eval()
    curves = deletion_insertion(layer, _inputs(4), _inputs(4), steps=4)
    assert not curves.value and (curves.deletion >= 0).all() and (curves.deletion <= 1).all()


def test_road_of_a_value_ranks_the_exact_map_first_and_matches_the_imputed_predictions():
    length = 24
    weights = np.random.default_rng(2).normal(size=length).astype(np.float32)
    layer = nn.Linear(length, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights)[None])
        layer.bias.fill_(-5.0)
    model = _value_model(nn.Sequential(nn.Flatten(), layer), (1, length))
    x = np.random.default_rng(3).normal(size=(60, 1, length)).astype(np.float32)
    exact = x * weights
    assert road_skip_reason(model, x) is None
    good = road(model, x, exact, noise=0.0)
    bad = road(model, x, -exact, noise=0.0)
    assert good.value and np.isfinite(good.gap).mean() > 0.9
    assert np.nanmean(good.gap) > 0.3 and np.nanmean(bad.gap) < -0.3, (np.nanmean(good.gap), np.nanmean(bad.gap))
    # the curves against the linear model on the imputed inputs, by hand (noise 0: the imputation alone)
    f_x = x[:, 0] @ weights.astype(np.float64) - 5.0
    np.testing.assert_allclose(good.start, f_x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(good.floor, -5.0, rtol=1e-6)
    order = np.argsort(-(exact[:, 0] * np.sign(f_x + 5.0)[:, None]), axis=1)
    for j, fraction in enumerate(good.fractions):
        removed = np.zeros((len(x), length), dtype=bool)
        np.put_along_axis(removed, order[:, :int(np.floor(fraction * length + 1e-9))], True, axis=1)
        imputed = noisy_linear_imputation(x, removed, noise=0.0)
        np.testing.assert_allclose(good.morf[:, j], imputed[:, 0] @ weights.astype(np.float64) - 5.0, rtol=1e-4,
                                   atol=1e-3)


# --- a regression run: the explain command's table and the Explain page ------------------------------------------------

def test_a_regression_runs_table_has_the_scores_and_the_sanity_check(sample_run_dir, tmp_path):
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.runs import open_run

    run_dir = tmp_path / "prices"
    shutil.copytree(sample_run_dir("prices"), run_dir)
    ids = list(open_run(run_dir).samples["id"].astype(str)[:16])
    result = explain_run(run_dir, ids, ["integrated_gradients", "shap"])
    assert not result.skipped
    scores = result.scores.set_index("method")
    for method in ("integrated_gradients", "shap"):  # SHAP against the background's mean, its own reference
        rows = scores.loc[method]
        assert np.isfinite(rows["deletion_vs_random"]).mean() > 0.8
        assert rows["deletion_vs_random"].mean() > 0.2, (method, rows["deletion_vs_random"].mean())
        assert rows["road_gap"].isna().all()  # a table has no neighbours to impute from
        assert (rows["sanity_samples"] > 0).all() and rows["sanity_mean_corr"].notna().all()


def test_the_explain_page_shows_a_regressions_faithfulness_scores(sample_run_dir, tmp_path, monkeypatch):
    from tests.test_dashboard_app import _app, _ok, _text

    runs = tmp_path / "runs"
    run_dir = runs / "sample-prices"
    shutil.copytree(sample_run_dir("prices"), run_dir)
    at = _app(monkeypatch, runs, run_dir).run()
    at.switch_page("views/explain.py").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    text = _text(at)
    assert "deletion vs a random order" in text and "of the starting value's distance from the baseline" in text
    assert "of the starting probability" not in text and "only the maps are shown" not in text
    assert "Sanity check" in text and "Controls on the same probe samples" in text
    assert "completeness gap" in text  # Integrated Gradients, a default map of a regression
