"""Faithfulness scores: deletion/insertion against hand-computed curves, the randomisation check on a method that
ignores the model, Integrated Gradients completeness, planted ground truth, and the explain command's files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError, load_model
from analyzers.loading.datasets import load_dataset
from analyzers.explanations.attributions import explain
from analyzers.explanations.completeness import ig_completeness
from analyzers.explanations.faithfulness import (ground_truth_scores, interval_mask, randomisation_check, reinitialise,
                                                 spearman_rows)
from analyzers.explanations.perturbation import deletion_insertion
from sample_models import get_sample
from tests.conftest import export_model


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    return _sample("digits")


_LOADED = {}


def _sample(name):
    if not get_sample(name).weights_path.is_file():
        pytest.skip(f"sample {name} has no trained weights yet")
    if name not in _LOADED:  # generating a sample's data takes seconds: once per test session
        _LOADED[name] = load_model(f"sample:{name}"), load_dataset(f"sample:{name}")
    return _LOADED[name]


# --- deletion / insertion ----------------------------------------------------------------------------------------------

def test_deletion_and_insertion_curves_match_hand_computed_probabilities():
    torch.manual_seed(0)
    model = nn.Linear(8, 2).eval()
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    target = np.zeros(6, dtype=np.int64)
    contribution = x * (w[0] - w[1])  # the target's logit margin, feature by feature
    curves = deletion_insertion(model, x, contribution, target, steps=8)
    assert curves.fractions.tolist() == [k / 8 for k in range(9)]
    order = np.argsort(-contribution, axis=1)
    for k in (0, 3, 8):  # steps of 1/8 of 8 features: k features removed / inserted
        removed = np.zeros_like(x, dtype=bool)
        np.put_along_axis(removed, order[:, :k], True, axis=1)
        deleted, inserted = np.where(removed, 0, x), np.where(removed, x, 0)
        np.testing.assert_allclose(curves.deletion[:, k], _softmax(deleted @ w.T + b)[:, 0], rtol=1e-5)
        np.testing.assert_allclose(curves.insertion[:, k], _softmax(inserted @ w.T + b)[:, 0], rtol=1e-5)
    # removing the largest contributions first is the fastest way down: no other order deletes faster
    other = deletion_insertion(model, x, np.random.default_rng(1).normal(size=x.shape), target, steps=8)
    assert (curves.deletion <= other.deletion + 1e-6).all() and (curves.insertion >= other.insertion - 1e-6).all()
    assert (curves.deletion_auc < other.deletion_auc).all()
    np.testing.assert_allclose(curves.deletion_auc, np.trapezoid(curves.deletion, curves.fractions, axis=1))


def test_deletion_removes_whole_pixels_with_the_mean_baseline(tiny_cnn, tiny_data):
    x = tiny_data[0][:5]
    bg = tiny_data[0][5:]
    attr = explain(tiny_cnn, x, None, "integrated_gradients")
    curves = deletion_insertion(tiny_cnn, x, attr, baseline="mean", background=bg, steps=4, batch_size=7)
    probs_x = torch.softmax(tiny_cnn(torch.as_tensor(x)), 1).detach().numpy()
    probs_mean = torch.softmax(tiny_cnn(torch.as_tensor(bg.mean(0, keepdims=True))), 1).detach().numpy()
    pred = probs_x.argmax(1)
    np.testing.assert_allclose(curves.deletion[:, 0], probs_x[np.arange(5), pred], rtol=1e-5)
    np.testing.assert_allclose(curves.deletion[:, -1], probs_mean[0, pred], rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[:, 0], probs_mean[0, pred], rtol=1e-5)
    with pytest.raises(AnalyzerError, match="do not match inputs"):
        deletion_insertion(tiny_cnn, x, attr[:2])


# --- randomisation sanity check ----------------------------------------------------------------------------------------

def edge_detector(model, x, targets):
    """An "explanation" computed from the input alone: the kind of map the sanity check exists to catch."""
    return np.abs(np.diff(x, axis=-1, prepend=0)) + np.abs(np.diff(x, axis=-2, prepend=0))


def test_randomisation_flags_a_map_that_ignores_the_model_and_passes_gradients(digits):
    model, data = digits
    x = data.x[:12]
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    ignored = randomisation_check(model, x, edge_detector)
    assert ignored.flagged and ignored.mean_final_corr > 0.99
    assert ignored.layers == ("fc2", "fc1", "conv2", "conv1")  # top down
    for method in ("saliency", "gradcam"):
        check = randomisation_check(model, x, method)
        assert not check.flagged, (method, check.mean_final_corr)
        assert check.rank_corr.shape == (4, 12) and check.mean_final_corr < 0.3
    for key, value in model.module.state_dict().items():  # the check randomises copies only
        assert torch.equal(value, state[key]), key


def test_randomisation_results_are_cached_per_model_method_and_samples(digits, tmp_path, monkeypatch):
    import analyzers.explanations.faithfulness as faithfulness

    model, data = digits
    first = randomisation_check(model, data.x[:4], "saliency", cache_dir=tmp_path, sample_ids=[1, 2, 3, 4])
    assert len(list(tmp_path.glob("sanity-*.npz"))) == 1
    monkeypatch.setattr(faithfulness, "explain", lambda *a, **k: pytest.fail("recomputed instead of cached"))
    again = randomisation_check(model, data.x[:4], "saliency", cache_dir=tmp_path, sample_ids=[1, 2, 3, 4])
    np.testing.assert_array_equal(first.rank_corr, again.rank_corr)
    assert first.layers == again.layers
    with pytest.raises(pytest.fail.Exception):  # other samples are not served from the cache
        randomisation_check(model, data.x[:4], "saliency", cache_dir=tmp_path, sample_ids=[1, 2, 3, 5])


def test_randomisation_of_an_exported_model_reloads_and_reinitialises_it(tiny_cnn, tiny_data, tmp_path):
    x = tiny_data[0][:6]
    loaded = load_model(str(export_model(tiny_cnn, torch.as_tensor(x[:2]), tmp_path / "m.pt2")), isolation="process")
    state = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    check = randomisation_check(loaded, x, "saliency")
    assert check.layers == ("fc", "conv")
    assert check.mean_final_corr < 0.9
    assert ignored_flag(loaded, x)
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key


def ignored_flag(model, x) -> bool:
    return randomisation_check(model, x, edge_detector).flagged


def test_reinitialise_handles_modules_without_reset_parameters():
    class Bare(nn.Module):  # like an unflattened .pt2 submodule: parameters, no reset_parameters
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 3))
            self.bias = nn.Parameter(torch.zeros(4))

    bare = Bare()
    reinitialise(bare, torch.Generator().manual_seed(0))
    assert bare.weight.abs().sum() > 0 and bare.bias.abs().max() <= 1 / np.sqrt(3)
    again = Bare()
    reinitialise(again, torch.Generator().manual_seed(0))
    assert torch.equal(bare.weight, again.weight)  # seeded


def test_spearman_rows_matches_scipy_and_ignores_positions_zero_in_both_maps():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random((3, 20)), rng.random((3, 20))
    expected = [spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(spearman_rows(a, b), expected)
    # 80 shared zeros (an input equal to the baseline) would make unrelated maps correlate
    a0, b0 = np.concatenate([a, np.zeros((3, 80))], 1), np.concatenate([b, np.zeros((3, 80))], 1)
    np.testing.assert_allclose(spearman_rows(a0, b0), expected)
    assert spearman_rows(np.ones((1, 5)), np.arange(5.0)[None])[0] == 0.0


# --- Integrated Gradients completeness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "dna", "shapes"])
def test_integrated_gradients_completeness_holds_within_one_percent_on_the_samples(name):
    model, data = _sample(name)
    x = data.x[:16]
    result = ig_completeness(model, x, batch_size=32)
    assert np.nanmax(result.gap) <= 0.01
    assert (~result.skipped).sum() >= 12
    # the difference it checks against is f(x) - f(0) on the predicted class, computed here directly
    with torch.no_grad():
        logits = model.module(torch.as_tensor(x))
        zero = model.module(torch.zeros_like(torch.as_tensor(x)))
    pred = logits.argmax(1)
    np.testing.assert_allclose(result.difference, (logits - zero)[torch.arange(len(x)), pred].numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(result.attributions.reshape(len(x), -1).sum(1)[~result.skipped],
                               result.difference[~result.skipped], rtol=0.011, atol=1e-4)


def test_completeness_raises_n_steps_until_the_gap_is_small(digits):
    model, data = digits
    coarse = ig_completeness(model, data.x[:8], n_steps=2, max_steps=2)
    refined = ig_completeness(model, data.x[:8], n_steps=2, tolerance=0.005, max_steps=512)
    assert np.nanmax(coarse.gap) > 0.005  # two steps are not enough
    assert np.nanmax(refined.gap) <= 0.005 and refined.n_steps.max() > 2
    flat = ig_completeness(model, np.zeros((2, 1, 8, 8), np.float32))  # x equals the baseline: nothing to check
    assert flat.skipped.all()


# --- planted ground truth ----------------------------------------------------------------------------------------------

def test_ground_truth_scores_by_hand():
    attr = np.zeros((2, 3, 4, 4))
    attr[0, :, 0, 0] = 1.0  # peak inside, 3 of 4 units inside
    attr[0, 0, 3, 3] = -1.0
    attr[1, 0, 2, 2] = 5.0  # peak outside, next to the mask
    attr[1, 0, 1, 1] = 1.0
    mask = np.zeros((2, 4, 4), bool)
    mask[:, :2, :2] = True
    scores = ground_truth_scores(attr, mask)
    np.testing.assert_allclose(scores.mass_inside, [0.75, 1 / 6])
    assert scores.pointing_hit.tolist() == [True, False]
    assert ground_truth_scores(attr, mask, tolerance=1).pointing_hit.tolist() == [True, True]
    assert interval_mask([1, 0], [3, 2], 4).tolist() == [[False, True, True, False], [True, True, False, False]]
    with pytest.raises(AnalyzerError, match="does not match"):
        ground_truth_scores(attr, mask[:, :3])


# Floors below what the trained samples reach on 200 test samples and well above chance. dna (the motif covers 8% of
# a sequence): mass inside 0.47-0.53, pointing 0.94-0.99 for gradient methods; Grad-CAM 0.48 / 0.98. shapes (the
# shape covers 26% of an image): mass 0.41-0.47, pointing within one pixel of the shape 0.92-0.94. Grad-CAM on shapes'
# last convolution (8x8) stays at chance (0.26), so it has no floor there: the model decides on a few max-pooled
# local features and partly on the background colour it was trained to rely on.
GROUND_TRUTH_FLOORS = {
    "dna": {"saliency": (0.35, 0.85), "input_x_gradient": (0.35, 0.85), "integrated_gradients": (0.35, 0.85),
            "gradcam": (0.3, 0.85)},
    "shapes": {"saliency": (0.33, 0.8), "input_x_gradient": (0.35, 0.8), "integrated_gradients": (0.35, 0.8)},
}


@pytest.mark.parametrize("name", list(GROUND_TRUTH_FLOORS))
def test_gradient_methods_find_the_planted_ground_truth(name):
    from analyzers.explanations.explain_run import ground_truth_mask

    floors = GROUND_TRUTH_FLOORS[name]
    model, data = _sample(name)
    rows = np.arange(100)
    mask = ground_truth_mask(data, rows)
    assert mask is not None and mask.shape == (100, *data.x.shape[2:])
    tolerance = 1 if data.modality == "image" else 0  # a peak on the shape's edge counts for images
    true_class = data.metadata["true_label"].to_numpy()[rows] if "true_label" in data.metadata else data.y[rows]
    for method, (mass_floor, pointing_floor) in floors.items():
        scores = ground_truth_scores(explain(model, data.x[rows], true_class, method), mask, tolerance=tolerance)
        assert scores.mean_mass_inside >= mass_floor, (method, scores.mean_mass_inside)
        assert scores.pointing_rate >= pointing_floor, (method, scores.pointing_rate)
    # a map that ignores the sample does no better than the mask's area
    rng = np.random.default_rng(0)
    chance = ground_truth_scores(rng.random(data.x[rows].shape), mask, tolerance=tolerance)
    assert chance.mean_mass_inside < min(f for f, _ in floors.values()) - 0.05
    assert chance.pointing_rate < min(p for _, p in floors.values())


# --- the explain command -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from analyzers.engines.pipeline import run_analysis

    return run_analysis("sample:digits", "sample:digits", tmp_path_factory.mktemp("runs") / "digits", analyses=[])


def test_explain_command_writes_attributions_and_scores_and_merges(digits_run, capsys):
    from analyzers.__main__ import main
    from analyzers.loading.runs import open_run

    run = open_run(digits_run)
    ids = [str(i) for i in run.samples["id"][:3]]
    assert main(["explain", str(digits_run), "--ids", ",".join(ids), "--method", "saliency,integrated_gradients"]) == 0
    assert "saliency" in capsys.readouterr().out
    saved = np.load(digits_run / "explanations" / "saliency" / "pred.npz")
    assert saved["ids"].tolist() == ids and saved["attributions"].shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(saved["targets"], run.samples["pred"][:3])
    table = pd.read_parquet(digits_run / "explanations" / "faithfulness.parquet")
    assert len(table) == 6 and set(table["method"]) == {"saliency", "integrated_gradients"}
    ig = table[table["method"] == "integrated_gradients"]
    assert (ig["completeness_gap"] <= 0.01).all() and table["sanity_rank_corr"].notna().all()
    assert table[table["method"] == "saliency"]["completeness_gap"].isna().all()

    # more samples later: the earlier entries stay, a repeated id is replaced, not duplicated
    more = [ids[2], str(run.samples["id"][3])]
    assert main(["explain", str(digits_run), "--ids", ",".join(more), "--method", "saliency", "--target", "label"]) == 0
    assert main(["explain", str(digits_run), "--ids", ids[2], "--method", "saliency"]) == 0
    table = pd.read_parquet(digits_run / "explanations" / "faithfulness.parquet")
    assert len(table) == 8 and not table.duplicated(["id", "method", "target"]).any()
    assert np.load(digits_run / "explanations" / "saliency" / "pred.npz")["ids"].tolist() == ids
    assert np.load(digits_run / "explanations" / "saliency" / "label.npz")["ids"].tolist() == more

    assert main(["explain", str(digits_run), "--ids", "no-such-id", "--method", "saliency"]) == 1
    assert "no sample with id no-such-id" in capsys.readouterr().err


def test_explain_sample_caches_one_sample_on_disk(digits_run, digits, monkeypatch):
    import analyzers.explanations.explain_run as explain_run
    from analyzers.loading.runs import open_run

    model, data = digits
    run = open_run(digits_run)
    sample_id = run.samples["id"][5]
    first = explain_run.explain_sample(run, sample_id, "gradcam", model=model, dataset=data)
    assert first.attribution.shape == (1, 8, 8) and first.display.shape == (8, 8)
    assert set(first.scores) >= {"deletion_auc", "insertion_auc", "sanity_rank_corr", "sanity_flag"}
    for computed in ("attribute_samples", "faithfulness_table"):
        monkeypatch.setattr(explain_run, computed, lambda *a, **k: pytest.fail("not served from the cache"))
    again = explain_run.explain_sample(run, sample_id, "gradcam", model=model, dataset=data)
    np.testing.assert_array_equal(first.attribution, again.attribution)
    assert first.scores == again.scores
    with pytest.raises(AnalyzerError, match="takes no option"):
        explain_run.explain_sample(run, sample_id, "saliency", model=model, dataset=data, n_steps=3)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[:40]),  # truncated
    lambda p: p.write_bytes(b"PK\x03\x04 not a zip"),  # garbage
    lambda p: np.savez(p, attribution=np.zeros((3, 3), np.float32), scores=np.asarray("{}")),  # the wrong shape
    lambda p: np.savez(p, attribution=np.zeros((1, 8, 8), np.float32), scores=np.asarray("[1, ")),  # bad scores
])
def test_a_damaged_cache_entry_is_recomputed_not_trusted(digits_run, digits, damage):
    """issue 19: a damaged file inside a run breaks no page; a cache entry is recomputed, and rewritten whole."""
    import analyzers.explanations.explain_run as explain_run
    from analyzers.loading.runs import open_run

    model, data = digits
    run = open_run(digits_run)
    sample_id = run.samples["id"][7]
    first = explain_run.explain_sample(run, sample_id, "saliency", model=model, dataset=data, sanity=False)
    entries = sorted((digits_run / "explanations" / "cache").glob("map-*.npz"), key=lambda p: p.stat().st_mtime)
    damage(entries[-1])
    again = explain_run.explain_sample(run, sample_id, "saliency", model=model, dataset=data, sanity=False)
    np.testing.assert_array_equal(first.attribution, again.attribution)
    assert first.scores == again.scores
    with np.load(entries[-1], allow_pickle=False) as rewritten:
        np.testing.assert_array_equal(rewritten["attribution"], first.attribution)


def test_the_sanity_verdict_is_taken_once_on_the_probe_set_and_each_sample_costs_one_more_map(digits_run, digits,
                                                                                               monkeypatch):
    """issue 18: the randomisation check is computed once per model, method and options on a fixed probe set; a
    click adds one map of the fully randomised model. Its numbers are the cascade's last step (the same weights for
    the same seed), checked against randomisation_check run independently."""
    import analyzers.explanations.explain_run as explain_run
    import analyzers.explanations.faithfulness as faithfulness
    from analyzers.loading.runs import open_run

    import shutil

    shutil.rmtree(digits_run / "explanations", ignore_errors=True)  # the run is shared: no probe verdict cached yet
    model, data = digits
    run = open_run(digits_run)
    calls = []
    real_explain = faithfulness.explain

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(faithfulness, "explain", counted)
    monkeypatch.setattr(explain_run, "explain", counted)
    first, second = (str(i) for i in run.samples["id"][[11, 12]])
    a = explain_run.explain_sample(run, first, "saliency", model=model, dataset=data)
    probe_calls = len(calls)
    assert probe_calls == 4  # the map; the probe's maps, original and randomised; this sample's randomised map
    b = explain_run.explain_sample(run, second, "saliency", model=model, dataset=data)
    assert calls[probe_calls:] == [1, 1]  # the map and the randomised model's map of this one sample, nothing more
    monkeypatch.setattr(faithfulness, "explain", real_explain)
    monkeypatch.setattr(explain_run, "explain", real_explain)

    probe = explain_run.probe_inputs(data)
    cascade = randomisation_check(model, probe, "saliency", background=explain_run.background_sample(data))
    assert a.scores["sanity_mean_corr"] == pytest.approx(cascade.mean_final_corr, abs=1e-5)
    assert a.scores["sanity_flag"] == b.scores["sanity_flag"] == cascade.flagged
    rows = explain_run.resolve_rows(data, [first, second])
    targets = explain_run.resolve_targets(run, data, rows, "pred", model.num_classes)
    own = randomisation_check(model, data.x[rows], "saliency", targets,
                              background=explain_run.background_sample(data))
    np.testing.assert_allclose([a.scores["sanity_rank_corr"], b.scores["sanity_rank_corr"]], own.final_corr,
                               atol=1e-5)
