"""A regression model that predicts its own spread (issue 12): two raw outputs, the mean and the log-variance, are a
Gaussian per sample. The run stores the mean and the variance; metrics.json's interval coverage equals the normal
distribution's own coverage for a model that knows the true noise, and falls where scipy says it must for one that
claims half the spread; the slices show the coverage inside; the Overview draws it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from analyzers import AnalyzerError
from analyzers.engines.pipeline import run_analysis
from analyzers.loading.runs import open_run
from tests.conftest import export_model

LOG_NOISE = np.log(0.3)


def _heteroscedastic(n=4000, seed=0):
    """y = 2 x0 + noise whose standard deviation is 0.3 exp(x1 / 2): wide where x1 is large."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    sigma = 0.3 * np.exp(x[:, 1] / 2)
    return x, (2 * x[:, 0] + sigma * rng.normal(size=n)).astype(np.float64), sigma


def _gaussian_model(spread_scale: float = 1.0) -> nn.Module:
    """The true mean 2 x0 and the true log-variance 2 log 0.3 + x1, the spread scaled by `spread_scale`."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        model.bias.copy_(torch.tensor([0.0, 2 * LOG_NOISE + 2 * np.log(spread_scale)]))
    return model.eval()


@pytest.fixture(scope="module")
def gaussian_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaussian")
    x, y, _ = _heteroscedastic()
    np.savez(root / "noisy.npz", x=x, y=y, width=np.where(x[:, 1] > 1, "wide", "narrow"))
    export_model(_gaussian_model(), torch.zeros(2, 2), root / "true.pt2")
    export_model(_gaussian_model(0.5), torch.zeros(2, 2), root / "overconfident.pt2")
    return root, x, y


@pytest.mark.parametrize("isolation", ["process", "auto"])
def test_a_model_of_the_true_spread_covers_each_level_and_its_metrics_are_scikit_learns(gaussian_files, tmp_path,
                                                                                         isolation):
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    root, x, y = gaussian_files
    run = open_run(run_analysis(str(root / "true.pt2"), str(root / "noisy.npz"), tmp_path / "run",
                                task="regression", isolation=isolation, analyses=["evaluation"]))
    assert run.task == "regression" and run.class_names == ["mean", "log_variance"]
    outputs = np.asarray(run.probs)
    mean, variance = 2 * x[:, 0].astype(np.float64), np.exp(2 * LOG_NOISE + x[:, 1].astype(np.float64))
    np.testing.assert_allclose(outputs[:, 0], mean, atol=1e-5)
    np.testing.assert_allclose(outputs[:, 1], variance, rtol=1e-4)
    m = run.read_json("metrics.json")
    assert m["mae"] == pytest.approx(mean_absolute_error(y, outputs[:, 0]))
    assert m["mse"] == pytest.approx(mean_squared_error(y, outputs[:, 0]))
    # the true spread covers each level: within 4 binomial standard errors of it over 4000 samples
    for level, observed in m["interval_coverage"].items():
        level = float(level)
        assert abs(observed - level) < 4 * np.sqrt(level * (1 - level) / len(y)), (level, observed)
    nll = torch.nn.GaussianNLLLoss(full=True)(torch.as_tensor(outputs[:, 0]), torch.as_tensor(y),
                                              torch.as_tensor(outputs[:, 1]))
    assert m["gaussian_nll"] == pytest.approx(float(nll), rel=1e-6)
    s = run.samples
    np.testing.assert_allclose(s["predicted_std"], np.sqrt(variance), rtol=1e-4)
    np.testing.assert_allclose(s["z_score"], (outputs[:, 0] - y) / np.sqrt(outputs[:, 1]), rtol=1e-6)


def test_an_overconfident_spread_undercovers_by_the_normal_distributions_amount(gaussian_files, tmp_path):
    from analyzers.evaluation.slices import slice_error_summary

    root, x, y = gaussian_files
    run = open_run(run_analysis(str(root / "overconfident.pt2"), str(root / "noisy.npz"), tmp_path / "run",
                                task="regression", isolation="process", analyses=["evaluation"]))
    coverage = run.read_json("metrics.json")["interval_coverage"]
    for level, observed in coverage.items():
        # it claims half the true spread: its level-l interval is the true one's z/2, which holds 2 Phi(z/2) - 1
        expected = 2 * norm.cdf(norm.ppf((1 + float(level)) / 2) / 2) - 1
        assert abs(observed - expected) < 0.03 and observed < float(level) - 0.15, (level, observed, expected)
    slices = run.read_parquet("slices.parquet")
    summary = slice_error_summary(run.samples, slices, "abs_error", z_column="z_score")
    z = np.abs(run.samples["z_score"].to_numpy())
    from analyzers.evaluation.slices import slice_mask

    inside = slice_mask(run.samples, slices["ids"].iloc[0])
    assert summary["coverage"].iloc[0] == pytest.approx((z[inside] <= norm.ppf(0.95)).mean())


def test_two_outputs_with_real_targets_ask_for_the_task_and_three_are_refused(gaussian_files, tmp_path):
    root, x, y = gaussian_files
    with pytest.raises(AnalyzerError, match="a mean and a log-variance: say --task regression"):
        run_analysis(str(root / "true.pt2"), str(root / "noisy.npz"), tmp_path / "a", isolation="process")
    export_model(nn.Linear(2, 3).eval(), torch.zeros(2, 2), tmp_path / "three.pt2")
    with pytest.raises(AnalyzerError, match="or two: a mean and a log-variance"):
        run_analysis(str(tmp_path / "three.pt2"), str(root / "noisy.npz"), tmp_path / "b", task="regression",
                     isolation="process")


def test_the_overview_draws_the_coverage_of_a_mean_and_variance_run(gaussian_files, tmp_path, monkeypatch):
    from tests.test_dashboard_app import _app, _ok, _text

    root, _, _ = gaussian_files
    runs = tmp_path / "runs"
    run_analysis(str(root / "overconfident.pt2"), str(root / "noisy.npz"), runs / "gauss", task="regression",
                 isolation="process")
    at = _app(monkeypatch, runs, runs / "gauss").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert "Interval coverage" in _text(at)
    assert any("90% interval coverage" in d.value.columns for d in at.dataframe)
    for page in ("errors", "explain", "embeddings", "training", "compare"):
        at.switch_page(f"views/{page}.py").run()
        _ok(at)
        assert not at.error, (page, [e.value for e in at.error])
