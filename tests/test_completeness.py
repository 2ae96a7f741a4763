"""Completeness of the additive methods through `explain` (issue 16): SHAP's efficiency gap against an expectation
over the background computed here, Integrated Gradients' gap with n_steps doubled by default, both variants of
SmoothGrad against autograd on the same noise draws, and the settings stored with every map of a run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError
from analyzers.explanations.attributions import (IG_TOLERANCE, SHAP_MAX_NSAMPLES, SHAP_TOLERANCE, METHODS,
                                                 RANDOM_METHODS, _TargetScore, explain)
from analyzers.explanations.completeness import ig_completeness, shap_completeness
from tests.conftest import TinyCNN


def _linear_model() -> nn.Module:
    """Planted linear score on features 0-2 of 6: f = 2 x0 - x1 + 0.5 x2 + 0.3, and -f for the other class."""
    model = nn.Linear(6, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, :3] = torch.tensor([2.0, -1.0, 0.5])
        model.weight[1] = -model.weight[0]
        model.bias[:] = torch.tensor([0.3, -0.3])
    return model.eval()


def _xor_model() -> nn.Module:
    """Planted XOR of the signs of features 0 and 1 (of 6), as a ReLU net: f = |x0 + x1| - |x0 - x1|, which is
    positive when they share a sign; the other class scores -f."""
    hidden = nn.Linear(6, 4, bias=False)
    out = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.weight[:, :2] = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
        out.weight[0] = torch.tensor([1.0, 1.0, -1.0, -1.0])
        out.weight[1] = -out.weight[0]
    return nn.Sequential(hidden, nn.ReLU(), out).eval()


def _relative_gap(attr: np.ndarray, difference: np.ndarray) -> np.ndarray:
    return np.abs(attr.reshape(len(attr), -1).sum(1, dtype=np.float64) - difference) / np.abs(difference)


# --- SHAP ----------------------------------------------------------------------------------------------------------

def test_shap_values_are_those_of_shaps_gradient_explainer():
    """The expected gradients computed here use shap's draws: each sample's values are shap.GradientExplainer's on
    that sample alone, with the sample's own seed as rseed, for several classes, a background whose size is no
    power of two and gradients taken a few draws at a time across samples."""
    import shap

    from analyzers.explanations.attributions import sample_seeds

    torch.manual_seed(0)
    model = TinyCNN().eval()
    rng = np.random.default_rng(0)
    x, background = rng.random((5, 1, 8, 8), dtype=np.float32), rng.random((13, 1, 8, 8), dtype=np.float32)
    targets = np.array([0, 2, 1, 0, 2])
    ours = explain(model, x, targets, "shap", background=background, nsamples=40, seed=3, batch_size=16,
                   check_completeness=False)
    seeds = sample_seeds(x, 3)
    assert len(set(seeds.tolist())) == len(x)  # five samples, five streams of draws
    expected = np.zeros_like(x)
    for i, cls in enumerate(targets):
        explainer = shap.GradientExplainer(_TargetScore(model, int(cls)), torch.as_tensor(background), batch_size=16)
        values = explainer.shap_values(torch.as_tensor(x[i:i + 1]), nsamples=40, rseed=int(seeds[i]))
        expected[i] = np.asarray(values).reshape(1, 8, 8)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("build", [_linear_model, _xor_model], ids=["linear", "xor"])
def test_shap_efficiency_gap_is_within_two_percent_at_the_median_after_doubling(build):
    model = build()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    background = rng.normal(size=(64, 6)).astype(np.float32)
    # the efficiency target, computed here: f(x) - E[f(background)] on the class explained (the predicted one)
    with torch.no_grad():
        fx, fb = model(torch.as_tensor(x)).double().numpy(), model(torch.as_tensor(background)).double().numpy()
    targets = fx.argmax(1)
    difference = fx[np.arange(len(x)), targets] - fb.mean(0)[targets]
    assert np.abs(difference).min() > 1e-3  # no sample is skipped: every one counts in the median

    unchecked = explain(model, x, None, "shap", background=background, check_completeness=False)
    before = _relative_gap(unchecked, difference)
    assert np.median(before) > 0.03  # 200 draws miss: what the check is for

    result = explain(model, x, None, "shap", background=background, details=True)
    after = _relative_gap(result.attributions, difference)
    assert np.median(after) <= 0.02
    np.testing.assert_allclose(result.completeness_gap, after, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.difference, difference, rtol=1e-5, atol=1e-6)
    # each sample stopped within the tolerance or at the cap, and doubling is what got it there
    assert ((after <= SHAP_TOLERANCE) | (result.nsamples == SHAP_MAX_NSAMPLES)).all()
    assert (result.nsamples > 200).any() and set(np.unique(result.nsamples)) <= {200 * 2 ** k for k in range(6)}
    assert (result.n_steps == -1).all() and result.row_settings(0)["nsamples"] == result.nsamples[0]
    # a sample complete at the first pass keeps the unchecked map exactly
    first = np.flatnonzero(result.nsamples == 200)
    np.testing.assert_array_equal(result.attributions[first], unchecked[first])
    # the planted features carry the attributions: the others' gradient is zero
    assert np.abs(result.attributions[:, 3:]).max() == 0


def test_shap_completeness_refuses_bad_budgets_in_one_line():
    model, x = _linear_model(), np.zeros((2, 6), np.float32)
    with pytest.raises(AnalyzerError, match="max_nsamples must be an integer of at least nsamples"):
        shap_completeness(model, x, background=x, nsamples=400, max_nsamples=200)
    with pytest.raises(AnalyzerError, match="tolerance must be a relative gap"):
        shap_completeness(model, x, background=x, tolerance=5)
    with pytest.raises(AnalyzerError, match="SHAP needs background"):
        shap_completeness(model, x, background=None)
    with pytest.raises(AnalyzerError, match="max_steps must be an integer of at least n_steps"):
        ig_completeness(model, x, n_steps=64, max_steps=32)
    with pytest.raises(AnalyzerError, match="check_completeness must be True or False"):
        explain(model, x, 0, "integrated_gradients", check_completeness="no")
    with pytest.raises(AnalyzerError, match="nsamples must be an integer of at least 1"):
        explain(model, x, 0, "shap", background=x, nsamples=0)


# --- Integrated Gradients through explain() ------------------------------------------------------------------------

class Ramps(nn.Module):
    """Ramps of ReLUs along the path from zero: f = sum_i a_i (relu(z_i) - relu(z_i - 1)), z = 4 (x - 0.5), whose
    kinks 50 Gauss-Legendre steps integrate badly; the other class scores -f."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.tensor([1.0, -2.0, 1.5, 0.5]))

    def forward(self, x):
        z = 4 * (x - 0.5)
        f = (self.a * (torch.relu(z) - torch.relu(z - 1))).sum(1)
        return torch.stack([f, -f], 1)


def test_integrated_gradients_through_explain_double_their_steps_and_agree_with_the_run_path():
    from analyzers.explanations.explain_run import attribute_samples

    model = Ramps().eval()
    # samples that need 100-400 steps: at 1600, Captum's Gauss-Legendre nodes alone (numpy's leggauss, an
    # eigenvalue problem of that size) take seconds
    x = np.random.default_rng(2).uniform(0.55, 1.0, size=(16, 4)).astype(np.float32)[[0, 4, 5, 6, 7, 12, 14, 15]]
    with torch.no_grad():
        difference = (model(torch.as_tensor(x)) - model(torch.zeros(1, 4)))[:, 0].double().numpy()
    unchecked = explain(model, x, 0, "integrated_gradients", check_completeness=False)
    assert (_relative_gap(unchecked, difference) > 0.02).all()  # 50 steps are not enough
    checked = explain(model, x, 0, "integrated_gradients")
    gap = _relative_gap(checked, difference)
    assert gap.max() <= IG_TOLERANCE
    result = attribute_samples(model, x, np.zeros(len(x), np.int64), "integrated_gradients", options={},
                               background=x, batch_size=64)
    np.testing.assert_array_equal(result.attributions, checked)  # the API and the command: one way
    np.testing.assert_allclose(result.completeness_gap, gap, rtol=1e-4, atol=1e-7)
    assert result.n_steps.max() > 50 and (result.nsamples == -1).all()
    assert result.settings["baseline"] == "zeros" and result.row_settings(0)["n_steps"] == result.n_steps[0]


# --- SmoothGrad, both variants ---------------------------------------------------------------------------------------

def test_smoothgrad_is_smilkovs_mean_gradient_and_smoothgrad_abs_the_mean_of_its_magnitude():
    """Against autograd on the same noise draws (each sample's nt_samples noisy copies drawn as Captum's
    NoiseTunnel draws them for that sample alone after torch.manual_seed(its own seed): torch.normal(0, std)), on a
    ReLU net near its kinks, where the gradient's signs flip under the noise: |mean ∇| there is much smaller than
    mean |∇|, so swapping the variants fails."""
    from analyzers.explanations.attributions import sample_seeds

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].bias.zero_()  # every hidden unit's kink passes through 0, where the inputs lie
    x = np.random.default_rng(3).normal(0, 0.05, size=(4, 5)).astype(np.float32)
    k, stdevs, seed = 12, 0.5, 7
    results = {m: explain(model, x, 1, m, nt_samples=k, stdevs=stdevs, seed=seed, details=True)
               for m in ("smoothgrad", "smoothgrad_abs")}
    std = stdevs * float(x.max() - x.min())  # noise std: a fraction of the inputs' value range
    noise = []
    for sample_seed in sample_seeds(x, seed):
        torch.manual_seed(int(sample_seed))
        noise.append(torch.normal(0, torch.full((k, 5), std)))
    noisy = torch.as_tensor(x).repeat_interleave(k, 0) + torch.cat(noise)
    noisy.requires_grad_()
    grads, = torch.autograd.grad(model(noisy)[:, 1].sum(), noisy)
    grads = grads.reshape(len(x), k, 5).numpy()
    np.testing.assert_allclose(results["smoothgrad"].attributions, np.abs(grads.mean(1)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results["smoothgrad_abs"].attributions, np.abs(grads).mean(1), rtol=1e-5,
                               atol=1e-7)
    smilkov, magnitude = results["smoothgrad"].attributions, results["smoothgrad_abs"].attributions
    assert (smilkov <= magnitude + 1e-7).all() and (magnitude - smilkov).max() > 0.2 * magnitude.max()
    assert results["smoothgrad"].settings == {"nt_samples": k, "stdevs": stdevs, "noise_std": pytest.approx(std),
                                              "noise_range_of": "inputs", "seed": seed}
    assert {"smoothgrad", "smoothgrad_abs"} <= set(RANDOM_METHODS)
    assert "Smilkov" in METHODS["smoothgrad"].description and "mean |∇|" in METHODS["smoothgrad_abs"].label


def test_smoothgrad_of_each_sample_is_captums_noise_tunnel_on_that_sample_alone():
    """Captum's NoiseTunnel(Saliency) on one sample after torch.manual_seed(the sample's seed) gives that sample's
    map, for both variants, with the copies run a few at a time (nt_samples_batch_size) on a small CNN."""
    import captum.attr as ca

    from analyzers.explanations.attributions import sample_seeds

    torch.manual_seed(1)
    model = TinyCNN().eval()
    rng = np.random.default_rng(4)
    x, background = rng.random((3, 1, 8, 8), dtype=np.float32), rng.random((9, 1, 8, 8), dtype=np.float32)
    targets = np.array([2, 0, 1])
    std = 0.2 * float(background.max() - background.min())
    for method, magnitude in (("smoothgrad", False), ("smoothgrad_abs", True)):
        ours = explain(model, x, targets, method, nt_samples=10, stdevs=0.2, background=background, seed=5,
                       batch_size=1)
        for i, sample_seed in enumerate(sample_seeds(x, 5)):
            torch.manual_seed(int(sample_seed))
            theirs = ca.NoiseTunnel(ca.Saliency(model)).attribute(
                torch.as_tensor(x[i:i + 1]), nt_type="smoothgrad", nt_samples=10, stdevs=std,
                nt_samples_batch_size=10, target=int(targets[i]), abs=magnitude).detach().numpy()[0]
            np.testing.assert_allclose(ours[i], theirs if magnitude else np.abs(theirs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["smoothgrad", "smoothgrad_abs", "shap", "lime"])
def test_a_random_methods_map_of_a_sample_does_not_depend_on_its_batch(method):
    """A sample's draws come from the seed and the sample itself: its map is the same explained alone, in batches
    of 2 or of all, and with the samples in reverse order; another seed gives another map, and an identical
    sample (rows 0 and 4) the same one."""
    torch.manual_seed(2)
    model = TinyCNN().eval()
    rng = np.random.default_rng(5)
    x, background = rng.random((5, 1, 8, 8), dtype=np.float32), rng.random((7, 1, 8, 8), dtype=np.float32)
    x[4] = x[0]
    targets = np.array([1, 0, 2, 2, 1])
    options = {"background": background, "seed": 11, "check_completeness": False}
    # LIME's fit of 64 patches on 150 draws is well posed: on fewer draws than features the unregularised fit blows
    # up the float differences of a forward at another batch size (1e-7) into its weights
    options.update({"shap": {"nsamples": 20}, "lime": {"n_samples": 150}}.get(method, {"nt_samples": 6}))
    together = explain(model, x, targets, method, batch_size=len(x), **options)
    for batch_size in (1, 2):
        np.testing.assert_allclose(explain(model, x, targets, method, batch_size=batch_size, **options), together,
                                   rtol=1e-5, atol=1e-7)
    reverse = explain(model, x[::-1].copy(), targets[::-1].copy(), method, batch_size=3, **options)
    np.testing.assert_allclose(reverse[::-1], together, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(together[4], together[0])
    other = explain(model, x, targets, method, batch_size=len(x), **{**options, "seed": 12})
    assert np.abs(other - together).max() > 1e-3 * np.abs(together).max()


# --- the settings of every map of a run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    from analyzers.engines.pipeline import run_analysis
    from sample_models import get_sample

    if not get_sample("tabular").weights_path.is_file():
        pytest.skip("sample tabular has no trained weights yet")
    return run_analysis("sample:tabular", "sample:tabular", tmp_path_factory.mktemp("runs") / "tabular", analyses=[])


def test_a_runs_maps_carry_their_settings_and_completeness_and_old_smoothgrad_rows_are_relabelled(tabular_run):
    from analyzers.explanations.explain_run import explain_run, sample_map
    from analyzers.loading.runs import open_run

    run = open_run(tabular_run)
    ids = [str(i) for i in run.samples["id"][:3]]
    folder = tabular_run / "explanations"
    folder.mkdir(exist_ok=True)
    # an older run: a smoothgrad row and map from when smoothgrad was the mean of |gradient|, without settings
    pd.DataFrame({"id": ["old"], "method": ["smoothgrad"], "target": ["pred"], "deletion_auc": [0.5]}).to_parquet(
        folder / "faithfulness.parquet")
    (folder / "smoothgrad").mkdir(exist_ok=True)
    np.savez(folder / "smoothgrad" / "pred.npz", ids=np.asarray(["old"]), targets=np.asarray([0]),
             attributions=np.ones((1, 30), np.float32))

    result = explain_run(tabular_run, ids, ["shap", "integrated_gradients", "smoothgrad"], sanity=False)
    table = pd.read_parquet(folder / "faithfulness.parquet")
    assert {"completeness_gap", "ig_n_steps", "shap_nsamples", "settings"} <= set(table.columns)
    assert table.set_index("id").loc["old", "method"] == "smoothgrad_abs"
    new = table[table["id"] != "old"].set_index(["method", "id"])
    shap_rows, ig_rows = new.loc["shap"], new.loc["integrated_gradients"]
    assert ((shap_rows["completeness_gap"] <= SHAP_TOLERANCE) | (shap_rows["shap_nsamples"] == SHAP_MAX_NSAMPLES)).all()
    assert (ig_rows["completeness_gap"] <= IG_TOLERANCE).all() and (ig_rows["shap_nsamples"] == -1).all()
    for (method, _), row in new.iterrows():
        settings = json.loads(row["settings"])
        if method == "shap":
            assert settings["nsamples"] == row["shap_nsamples"] and settings["background_size"] == 64
        elif method == "integrated_gradients":
            assert settings["n_steps"] == row["ig_n_steps"] and settings["baseline"] == "zeros"
        else:
            assert settings["nt_samples"] == 16 and settings["noise_std"] > 0 and np.isnan(row["completeness_gap"])
    with np.load(folder / "smoothgrad" / "pred.npz") as stored:  # the old variant's map is gone, not mixed in
        assert stored["ids"].tolist() == ids and all(json.loads(s)["stdevs"] == 0.15 for s in stored["settings"])
    assert len(result.scores) == 9
    open_run(tabular_run)  # the run still opens with the new columns

    one = sample_map(run, ids[0], "shap")
    assert one.settings["nsamples"] == one.scores["shap_nsamples"] >= 200
    assert one.scores["completeness_gap"] is not None and one.scores["ig_n_steps"] == -1
    again = sample_map(run, ids[0], "shap")  # from the cache, settings included
    assert again.settings == one.settings and again.scores == one.scores
    np.testing.assert_array_equal(again.attribution, one.attribution)


def test_a_sandboxed_models_maps_cross_the_worker_with_their_gap_and_settings():
    from analyzers import load_model
    from analyzers.explanations.explain_run import attribute_samples

    local, remote = load_model("sample:digits"), load_model("sample:digits", isolation="sandbox")
    try:
        x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
        targets = np.array([0, 1, 2])
        here, there = (attribute_samples(m, x, targets, "integrated_gradients", options={"baseline": "blur"},
                                         background=x, batch_size=64) for m in (local, remote))
        assert type(there).__name__ == "ExplainResult" and there.settings == here.settings
        assert there.settings["baseline"] == "blur"
        np.testing.assert_array_equal(there.attributions, here.attributions)
        np.testing.assert_array_equal(there.completeness_gap, here.completeness_gap)
        np.testing.assert_array_equal(there.n_steps, here.n_steps)
    finally:
        remote.close()
