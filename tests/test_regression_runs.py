"""A regression model through the whole run (issue 12): the task is read from real targets and a one-output model,
recorded in run.json; metrics.json equals scikit-learn on the stored predictions; samples.parquet carries target,
prediction, residual and abs_error; the slices name a planted region where the model is wrong; explanations
explain the predicted value; the refusals name the problem. In-process and in the sandbox."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError
from analyzers.engines.pipeline import load_run_inputs, run_analysis
from analyzers.loading.runs import open_run
from tests.conftest import export_model


def _planted_regression(n=1200, seed=0):
    """price = 40 x0 - 25 x1 + 150 everywhere; the model below learned it except where x2 > 1 (about 16% of the
    samples), where it predicts 60 too high: the region the slices must name."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = 40 * x[:, 0] - 25 * x[:, 1] + 150 + rng.normal(0, 2, n)
    return x, y


class _Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.gate = nn.Linear(4, 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[40.0, -25.0, 0.0, 0.0]]))
            self.fc.bias.fill_(150.0)
            self.gate.weight.copy_(torch.tensor([[0.0, 0.0, 20.0, 0.0]]))
            self.gate.bias.fill_(-20.0)

    def forward(self, x):
        return self.fc(x) + 60 * torch.sigmoid(self.gate(x))  # wrong by up to 60 where x2 > 1


@pytest.fixture(scope="module")
def regression_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    x, y = _planted_regression()
    np.savez(root / "prices.npz", x=x, y=y)
    pd.DataFrame({**{f"f{j}": x[:, j] for j in range(4)}, "price": y}).to_csv(root / "prices.csv", index=False)
    export_model(_Planted().eval(), torch.zeros(2, 4), root / "prices.pt2")
    return root, x, y


@pytest.mark.parametrize("isolation", ["process", "auto"])
def test_a_regression_run_has_its_metrics_columns_and_planted_slice(regression_files, tmp_path, isolation):
    from sklearn import metrics as skm

    root, x, y = regression_files
    run = open_run(run_analysis(str(root / "prices.pt2"), str(root / "prices.csv"), tmp_path / "run",
                                label_column="price", isolation=isolation))
    assert run.task == "regression" and run.info["task"] == "regression" and run.info["accuracy"] is None
    with torch.no_grad():
        direct = _Planted().eval()(torch.as_tensor(x))[:, 0].numpy().astype(np.float64)
    samples = run.samples
    np.testing.assert_allclose(samples["prediction"], direct, rtol=1e-5)
    np.testing.assert_allclose(samples["target"], y)
    np.testing.assert_allclose(samples["residual"], direct - y, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(samples["abs_error"], np.abs(direct - y), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(samples["loss"], (direct - y) ** 2, rtol=1e-3, atol=1e-3)
    metrics = run.read_json("metrics.json")
    pred = samples["prediction"].to_numpy()
    assert metrics["mse"] == pytest.approx(skm.mean_squared_error(y, pred))
    assert metrics["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert metrics["r2"] == pytest.approx(skm.r2_score(y, pred))
    assert metrics["median_absolute_error"] == pytest.approx(skm.median_absolute_error(y, pred))
    assert metrics["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, pred))
    evaluation = run.info["analyses"]["evaluation"]
    assert evaluation["status"] == "done" and evaluation["mae"] == pytest.approx(metrics["mae"])
    assert "predicts values, not classes" in evaluation["skipped"]["confusion"]
    assert not run.has("confusion.json") and not run.has("label_noise.parquet")
    # the planted region is the top slice: a rule on f2 above about 1
    slices = run.read_parquet("slices.parquet")
    top = slices.iloc[0]
    assert top["source"] == "features" and "f2 >" in top["description"], top["description"]
    region = x[:, 2] > 1
    members = np.isin(samples["id"].to_numpy(), np.asarray(list(top["ids"])))
    jaccard = (members & region).sum() / (members | region).sum()
    assert jaccard > 0.7, (top["description"], jaccard)
    assert {stage: s["status"] for stage, s in run.info["analyses"].items()} == {
        "evaluation": "done", "data_health": "done", "projections": "done", "gradients": "done"}

    # explanations explain the predicted value: Integrated Gradients sum to f(x) - f(0)
    from analyzers.explanations.attributions import explain

    model, data = load_run_inputs(run)
    try:
        assert data.task == "regression" and model.output_kind == "value"
        result = explain(model, data.x[:8], None, "integrated_gradients", details=True)
        with torch.no_grad():
            f0 = float(_Planted().eval()(torch.zeros(1, 4))[0, 0])
        np.testing.assert_allclose(result.attributions.sum(1), direct[:8] - f0, rtol=0.02, atol=0.5)
    finally:
        if hasattr(model, "close"):
            model.close()


def test_an_npz_with_a_declared_task(regression_files, tmp_path):
    root, x, y = regression_files
    run = open_run(run_analysis(str(root / "prices.pt2"), str(root / "prices.npz"), tmp_path / "run",
                                task="regression", isolation="process", analyses=["evaluation"]))
    assert run.task == "regression" and run.info["parameters"]["task"] == "regression"
    np.testing.assert_allclose(run.samples["target"], y)


def test_refusals_name_the_problem(regression_files, tmp_path):
    root, x, y = regression_files
    # real targets declared as classes
    with pytest.raises(AnalyzerError, match="real numbers.*--task regression|not integers"):
        run_analysis(str(root / "prices.pt2"), str(root / "prices.npz"), tmp_path / "a", task="classification",
                     isolation="process")
    # NaN targets
    bad = y.copy()
    bad[5] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=bad)
    with pytest.raises(AnalyzerError, match="1 targets are NaN or infinite, the first in row 5"):
        run_analysis(str(root / "prices.pt2"), str(tmp_path / "nan.npz"), tmp_path / "b", isolation="process")
    # whole-number targets with one output: a count regression or a binary model with bad labels; it asks
    np.savez(tmp_path / "counts.npz", x=x, y=np.round(y).astype(np.int64))
    with pytest.raises(AnalyzerError, match="say which task.*--task regression"):
        run_analysis(str(root / "prices.pt2"), str(tmp_path / "counts.npz"), tmp_path / "c", isolation="process")
    counted = open_run(run_analysis(str(root / "prices.pt2"), str(tmp_path / "counts.npz"), tmp_path / "d",
                                    isolation="process", task="regression", analyses=["evaluation"]))
    assert counted.task == "regression"
    # a model with one output per class cannot be a regression
    three = nn.Sequential(nn.Linear(4, 3)).eval()
    export_model(three, torch.zeros(2, 4), tmp_path / "three.pt2")
    with pytest.raises(AnalyzerError, match=r"regression needs one output per sample \(or two: a mean and a log-variance\), but the model has 3"):
        run_analysis(str(tmp_path / "three.pt2"), str(root / "prices.npz"), tmp_path / "e", task="regression",
                     isolation="process")
    with pytest.raises(AnalyzerError, match="real numbers but the model has 3 outputs"):
        run_analysis(str(tmp_path / "three.pt2"), str(root / "prices.npz"), tmp_path / "f", isolation="process")


def test_every_page_opens_on_a_regression_run_and_the_overview_shows_its_errors(regression_files, tmp_path,
                                                                                 monkeypatch):
    from tests.test_dashboard_app import PAGES, _app, _ok, _text

    root, x, y = regression_files
    runs = tmp_path / "runs"
    run_dir = run_analysis(str(root / "prices.pt2"), str(root / "prices.csv"), runs / "prices", label_column="price",
                           isolation="process")
    metrics = open_run(run_dir).read_json("metrics.json")
    at = _app(monkeypatch, runs, run_dir).run()
    _ok(at)
    assert at.title[0].value == "Overview"
    assert at.metric[0].value == f"{metrics['mae']:.4g}" and at.metric[2].value == f"{metrics['r2']:.3f}"
    text = _text(at)
    assert "Predicted against true" in text and "Residuals" in text and "Where the errors concentrate" in text
    assert not [m for m in at.metric if "Accuracy" in str(m.label)]  # no classification panel
    slices = [d for d in at.dataframe if "MAE inside" in d.value.columns]
    assert slices and "f2 >" in slices[0].value["slice"].iloc[0]
    top = slices[0].value.iloc[0]
    assert top["MAE inside"] > 3 * top["MAE elsewhere"]  # the planted region: wrong by up to 60
    for page, title in PAGES.items():
        at.switch_page(page).run()
        _ok(at)
        assert not at.error, (page, [e.value for e in at.error])
        if page == "views/confusion.py":
            assert "this run is a **regression**" in _text(at)  # pointed to the pages that show it
        if page == "views/compare.py":  # alone on its dataset: nothing to compare with yet
            assert "No other stored regression run" in _text(at)
        if page == "views/errors.py":  # the regression's own rankings, read by its own error
            assert "A sample counts as wrong when the absolute error is among the largest" in _text(at)
    at.switch_page("views/explain.py").run()
    _ok(at)
    text = _text(at)
    assert "— target" in text and "predicted" in text and "one of the largest errors" in text  # the largest error
    assert "of the starting value's distance from the baseline" in text  # its maps are scored on the value
    assert len(at.get("plotly_chart")) >= 2  # the default maps (Integrated Gradients, saliency) of the value


def test_a_slices_mean_error_is_tested_against_the_rest_and_its_residual_quantiles_are_its_own(sample_run_dir):
    """On the prices sample the harbour slice's MAE is larger than elsewhere beyond doubt, a random slice of the same
    size is not, and the residual quantiles inside are numpy's over the slice's own residuals."""
    from scipy.stats import mannwhitneyu

    from analyzers.evaluation.slices import slice_error_summary, slice_mask

    run = open_run(sample_run_dir("prices"))
    samples, slices = run.samples, run.read_parquet("slices.parquet")
    top = slices.head(1)
    summary = slice_error_summary(samples, top, "abs_error", quantile_column="residual")
    inside = slice_mask(samples, top["ids"].iloc[0])
    assert summary["mean_inside"].iloc[0] == pytest.approx(samples["abs_error"][inside].mean())
    assert summary["mean_inside"].iloc[0] > 3 * summary["mean_elsewhere"].iloc[0]
    assert summary["p_value"].iloc[0] < 1e-20
    assert summary["q50"].iloc[0] == pytest.approx(np.quantile(samples["residual"][inside], 0.5))
    assert summary["q90"].iloc[0] < 0  # the harbour flats are underpredicted almost everywhere
    rng = np.random.default_rng(0)
    p_random = []
    for _ in range(20):  # random slices of the same size: no evidence, p spread over (0, 1)
        ids = rng.choice(samples["id"].to_numpy(), size=int(inside.sum()), replace=False)
        p_random.append(slice_error_summary(samples, pd.DataFrame({"ids": [ids]}), "abs_error")["p_value"].iloc[0])
        member = np.isin(samples["id"], ids)
        assert p_random[-1] == pytest.approx(mannwhitneyu(samples["abs_error"][member], samples["abs_error"][~member],
                                                          alternative="greater").pvalue)
    assert np.median(p_random) > 0.1 and min(p_random) > 1e-4
