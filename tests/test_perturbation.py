"""Perturbation scores (issue 16): deletion and insertion normalised against hand-computed probabilities and against
the same sample's random order; a low-probability target whose raw deletion AUC looks excellent; ROAD's noisy linear
imputation against hand-solved neighbour equations; ROAD on a model that only reads a planted region."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from analyzers import AnalyzerError
from analyzers.errors import InvalidOption
from analyzers.explanations.perturbation import (PERTURBATION_COLUMNS, deletion_insertion, noisy_linear_imputation,
                                                 road, road_skip_reason)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def _two_class(weights, bias) -> nn.Module:
    """Logits (w.x + bias, 0): p(class 0) = sigmoid(w.x + bias), by hand."""
    model = nn.Linear(len(weights), 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0] = torch.tensor(weights, dtype=torch.float32)
        model.bias.copy_(torch.tensor([bias, 0.0]))
    return model.eval()


# --- deletion / insertion, normalised ----------------------------------------------------------------------------------

def test_normalised_scores_match_a_hand_computation():
    model = _two_class([3.0, 2.0, 1.0, 0.0], -4.0)
    x = np.ones((1, 4), np.float32)
    attr = np.array([[3.0, 2.0, 1.0, 0.0]])  # w * x: removed in the order 0, 1, 2, 3
    curves = deletion_insertion(model, x, attr, 0, steps=4)
    # logit w.x - 4 with k features removed (zeros baseline): 2, -1, -3, -4, -4; inserted: -4, -1, 1, 2, 2
    deletion, insertion = _sigmoid([2, -1, -3, -4, -4]), _sigmoid([-4, -1, 1, 2, 2])
    np.testing.assert_allclose(curves.deletion[0], deletion, rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[0], insertion, rtol=1e-5)
    p_x, p_b = _sigmoid(2), _sigmoid(-4)
    auc_del = np.sum((deletion[1:] + deletion[:-1]) / 2) / 4  # trapezoid, steps of 1/4
    auc_ins = np.sum((insertion[1:] + insertion[:-1]) / 2) / 4
    np.testing.assert_allclose(curves.deletion_auc[0], auc_del, rtol=1e-5)
    np.testing.assert_allclose(curves.deletion_auc_norm[0], auc_del / p_x, rtol=1e-5)
    np.testing.assert_allclose(curves.insertion_auc_norm[0], (auc_ins - p_b) / (p_x - p_b), rtol=1e-5)
    # the map's order is the best one here: no random order removes the evidence faster
    assert curves.deletion_vs_random[0] >= -1e-6 and curves.insertion_vs_random[0] >= -1e-6


def test_against_random_order_is_zero_when_every_order_is_the_same_and_positive_for_the_best_one():
    rng = np.random.default_rng(0)
    # distinct samples (each its own random order), each with equal features
    x = np.repeat(1 + 0.01 * np.arange(16, dtype=np.float32)[:, None], 4, axis=1)
    # p depends only on how many features are present: every order draws the same curve
    same = deletion_insertion(_two_class([1.0] * 4, -2.0), x, rng.normal(size=x.shape), 0, steps=4)
    np.testing.assert_allclose(same.deletion_vs_random, 0, atol=1e-5)
    np.testing.assert_allclose(same.insertion_vs_random, 0, atol=1e-5)
    np.testing.assert_allclose(same.random_deletion, same.deletion, atol=1e-6)
    # one best order (w * x): the random orders lose to it, and strictly for most samples
    model = _two_class([3.0, 2.0, 1.0, 0.0], -2.0)
    best = deletion_insertion(model, x, x * np.array([3.0, 2.0, 1.0, 0.0]), 0, steps=4)
    assert (best.deletion_vs_random >= -1e-6).all() and (best.deletion_vs_random > 1e-3).mean() > 0.7
    assert (best.insertion_vs_random >= -1e-6).all() and (best.insertion_vs_random > 1e-3).mean() > 0.7
    # seeded per sample: the same sample alone (a dashboard click) gets the same random curve as in the batch
    alone = deletion_insertion(model, x[5:6], x[5:6] * np.array([3.0, 2.0, 1.0, 0.0]), 0, steps=4)
    np.testing.assert_allclose(alone.random_deletion[0], best.random_deletion[5], rtol=1e-6)
    other = deletion_insertion(model, x, x * np.array([3.0, 2.0, 1.0, 0.0]), 0, steps=4, seed=1)
    assert not np.allclose(other.random_deletion, best.random_deletion)
    off = deletion_insertion(model, x, x, 0, steps=4, random_order=False)
    assert off.random_deletion is None and np.isnan(off.deletion_vs_random).all()


def test_a_low_probability_target_cannot_look_faithful():
    """Planted: the model never looks at its input for class 1, whose probability is 0.032 everywhere. Any map for
    class 1 is unfaithful, yet its raw deletion AUC (0.032) beats that of a perfect map on a class the model does
    use; normalised it reads "no effect" (1) and "no better than random" (0)."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 6)).astype(np.float32) + 0.5
    ignores = _two_class([0.0] * 6, float(np.log(0.968 / 0.032)))
    low = deletion_insertion(ignores, x, rng.normal(size=x.shape), 1, steps=6)
    np.testing.assert_allclose(low.start, 0.032, rtol=1e-4)
    uses = _two_class([1.0] * 6, -2.0)  # p(class 0) = sigmoid(sum x - 2): the map x itself is the right one
    good = deletion_insertion(uses, x, x, 0, steps=6)
    assert (low.deletion_auc < 0.04).all() and (low.deletion_auc < good.deletion_auc).all()  # raw: "better"
    np.testing.assert_allclose(low.deletion_auc_norm, 1.0, rtol=1e-4)
    assert (good.deletion_auc_norm < 0.7).all()  # normalised: the perfect map is the better one
    np.testing.assert_allclose(low.deletion_vs_random, 0.0, atol=1e-4)
    assert (good.deletion_vs_random > 0.01).mean() > 0.7
    # p(x) = p(baseline): insertion has no span to normalise by, and says so (NaN) rather than dividing noise by it
    assert np.isnan(low.insertion_auc_norm).all() and np.isnan(low.insertion_vs_random).all()


def test_deletion_options_are_checked_before_any_forward_pass():
    model = _two_class([1.0] * 4, 0.0)
    x = np.ones((2, 4), np.float32)
    for kwargs, words in (({"steps": 0}, "steps must be an integer of at least 1"),
                          ({"batch_size": 0}, "batch_size must be"), ({"seed": -1}, "seed must be"),
                          ({"random_order": "yes"}, "random_order must be True or False")):
        with pytest.raises(InvalidOption, match=words):
            deletion_insertion(model, x, x, **kwargs)
    with pytest.raises(AnalyzerError, match="NaN or inf"):
        deletion_insertion(model, x, np.full_like(x, np.nan))


# --- ROAD: noisy linear imputation -------------------------------------------------------------------------------------

DIRECT, DIAGONAL = 1 / 6, 1 / 12


def test_imputation_of_two_adjacent_pixels_and_a_corner_matches_the_hand_solution():
    v = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 17]], dtype=np.float64)
    image = np.stack([v, 10 * v])[None]  # two channels, imputed independently
    removed = np.zeros((1, 4, 4), bool)
    removed[0, 1, 1] = removed[0, 1, 2] = True  # a = (1,1) and b = (1,2), neighbours of each other
    # interior pixels: all 8 neighbours inside, weights summing to 1, so x_a = K_a + x_b / 6 and x_b = K_b + x_a / 6
    k_a = DIRECT * (v[0, 1] + v[2, 1] + v[1, 0]) + DIAGONAL * (v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2])
    k_b = DIRECT * (v[0, 2] + v[2, 2] + v[1, 3]) + DIAGONAL * (v[0, 1] + v[0, 3] + v[2, 1] + v[2, 3])
    x_a = (k_a + DIRECT * k_b) / (1 - DIRECT ** 2)
    x_b = k_b + DIRECT * x_a
    out = noisy_linear_imputation(image, removed, noise=0)
    np.testing.assert_allclose(out[0, 0, 1, 1], x_a, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1, 2], x_b, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1, 1], 10 * x_a, rtol=1e-6)
    np.testing.assert_allclose(np.where(removed[:, None], 0, out), np.where(removed[:, None], 0, image))
    # a corner: 3 neighbours inside the image, their weights renormalised (5/12)
    corner = np.zeros((1, 4, 4), bool)
    corner[0, 0, 0] = True
    expected = (DIRECT * (v[0, 1] + v[1, 0]) + DIAGONAL * v[1, 1]) / (2 * DIRECT + DIAGONAL)
    np.testing.assert_allclose(noisy_linear_imputation(image, corner, noise=0)[0, 0, 0, 0], expected, rtol=1e-6)


def test_imputation_of_a_sequence_uses_the_positions_before_and_after():
    seq = np.array([[[0.0, 9.0, 9.0, 3.0, 5.0]]])
    removed = np.array([[False, True, True, False, True]])
    # x1 = (0 + x2) / 2, x2 = (x1 + 3) / 2: x1 = 1, x2 = 2; the last position has one neighbour: x4 = 3
    np.testing.assert_allclose(noisy_linear_imputation(seq, removed, noise=0)[0, 0], [0, 1, 2, 3, 3], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(2, 9), st.floats(-5, 5), st.integers(0, 2 ** 16),
       st.booleans())
def test_an_imputed_constant_image_stays_constant(channels, height, width, value, seed, sequence):
    rng = np.random.default_rng(seed)
    shape = (2, channels, height) if sequence else (2, channels, height, width)
    removed = rng.random((2, *shape[2:])) < rng.uniform(0.1, 0.9)
    removed[:, 0] = False  # keep one position: there is something to impute from
    image = np.full(shape, value)
    np.testing.assert_allclose(noisy_linear_imputation(image, removed, noise=0), value, atol=1e-5)
    # the noise is relative to the sample's spread: none on a constant image
    np.testing.assert_allclose(noisy_linear_imputation(image, removed, seed=seed), value, atol=1e-5)


def test_imputation_noise_is_seeded_small_and_only_on_removed_pixels():
    rng = np.random.default_rng(0)
    image = rng.random((3, 2, 16, 16))
    removed = rng.random((3, 16, 16)) < 0.5
    plain = noisy_linear_imputation(image, removed, noise=0)
    noisy = noisy_linear_imputation(image, removed, noise=0.05, seed=3)
    diff = (noisy - plain)[np.broadcast_to(removed[:, None], image.shape)]
    assert abs(diff.std() / (0.05 * image[0].std()) - 1) < 0.15 and abs(diff.mean()) < 0.01
    assert ((noisy - plain)[np.broadcast_to(~removed[:, None], image.shape)] == 0).all()
    np.testing.assert_array_equal(noisy, noisy_linear_imputation(image, removed, noise=0.05, seed=3))
    with pytest.raises(AnalyzerError, match="removes every position"):
        noisy_linear_imputation(image, np.ones((3, 16, 16), bool), noise=0)


# --- ROAD: MoRF and LeRF -----------------------------------------------------------------------------------------------

class RegionModel(nn.Module):
    """Reads only the planted region (rows 1-3, columns 1-3 of an 8x8 image): logits (10 (mean - 0.5), 0)."""

    def forward(self, x):
        z = 10 * (x[:, :, 1:4, 1:4].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _planted(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.2, (n, 1, 8, 8)).astype(np.float32)
    x[:, :, 1:4, 1:4] = rng.uniform(0.8, 1.0, (n, 1, 3, 3))
    truth = np.zeros_like(x)
    truth[:, :, 1:4, 1:4] = 1.0
    return x, truth


def test_road_morf_drops_faster_for_the_map_of_the_planted_region_than_for_a_random_map():
    x, truth = _planted()
    model = RegionModel()
    pointing = road(model, x, truth + 0.01 * np.random.default_rng(1).random(x.shape), 0)
    random = road(model, x, np.random.default_rng(2).normal(size=x.shape), 0)
    assert pointing.morf.shape == (12, 5) and pointing.fractions.tolist() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert (pointing.morf_auc < random.morf_auc).all()
    assert pointing.morf_auc.mean() < 0.3 < 0.6 < random.morf_auc.mean()
    # least relevant first keeps the region until 86% is gone: LeRF stays up, and the gap is wide
    assert (pointing.lerf[:, :3] > 0.9).all() and (pointing.gap > 0.4).all()
    assert abs(random.gap.mean()) < 0.15  # a random map ranks nothing: both orders are random


def test_road_is_seeded_independent_of_batching_and_leaves_the_model_as_found():
    x, truth = _planted(6)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(128, 2))
    module.train()
    module(torch.as_tensor(x)).sum().backward()
    before = ({k: v.clone() for k, v in module.state_dict().items()}, [p.grad.clone() for p in module.parameters()])
    one = road(module, x, truth, 0, batch_size=1, seed=4)
    many = road(module, x, truth, 0, batch_size=64, seed=4)
    np.testing.assert_allclose(one.morf, many.morf, rtol=1e-5)
    np.testing.assert_allclose(one.lerf, many.lerf, rtol=1e-5)
    assert module.training and all(m.training for m in module.modules())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[0][k]), k  # BatchNorm's running statistics included
    for p, g in zip(module.parameters(), before[1]):
        assert torch.equal(p.grad, g)


def test_road_options_and_inputs_it_does_not_apply_to():
    x, truth = _planted(2)
    model = RegionModel()
    for kwargs, words in (({"fractions": (0.5, 0.3)}, "fractions must be increasing"),
                          ({"fractions": (0.5, 1.0)}, "strictly between 0 and 1"), ({"fractions": ()}, "fractions"),
                          ({"noise": -1}, "noise must be"), ({"seed": 1.5}, "seed must be"),
                          ({"batch_size": 0}, "batch_size must be")):
        with pytest.raises(InvalidOption, match=words):
            road(model, x, truth, **kwargs)
    rows = np.ones((3, 4), np.float32)
    assert "tabular" in road_skip_reason(nn.Linear(4, 2), rows)
    with pytest.raises(AnalyzerError, match="does not apply to tabular rows"):
        road(nn.Linear(4, 2), rows, rows)
    assert road_skip_reason(model, x) is None


# --- the per-run table -------------------------------------------------------------------------------------------------

def test_faithfulness_table_has_the_new_columns_and_leaves_them_empty_where_they_do_not_apply(tiny_cnn, tiny_data):
    from analyzers.explanations.explain_run import faithfulness_table

    x = tiny_data[0][:4]
    attr = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    attr[3] = 0  # a constant map ranks nothing: no score
    common = dict(options={}, background=tiny_data[0][10:], mask=None, batch_size=16, sanity=False, probe=None,
                  cache_dir=None)
    table = faithfulness_table(tiny_cnn, x, np.zeros(4, np.int64), "saliency", attr, **common)
    assert set(PERTURBATION_COLUMNS) <= set(table.columns) and {"deletion_auc", "insertion_auc"} <= set(table.columns)
    assert table.loc[:2, list(PERTURBATION_COLUMNS)].drop(columns=["insertion_auc_norm", "insertion_vs_random"]) \
        .notna().all().all()
    assert table.loc[3, list(PERTURBATION_COLUMNS)].isna().all()
    assert all(table[c].dtype == np.float32 for c in PERTURBATION_COLUMNS)  # numeric: it crosses from a worker
    rows = tiny_data[0][:3].reshape(3, -1)
    tabular = faithfulness_table(nn.Linear(64, 3).eval(), rows, np.zeros(3, np.int64), "saliency",
                                 np.random.default_rng(0).normal(size=rows.shape), **common)
    assert tabular["road_morf_auc"].isna().all() and tabular["deletion_vs_random"].notna().all()


def test_stored_tables_from_before_still_open_and_merge_with_the_new_columns(tmp_path):
    import pandas as pd

    from analyzers.explanations.explain_run import FAITHFULNESS, _merge_table
    from analyzers.loading.run_checks import check_table

    path = tmp_path / FAITHFULNESS
    path.parent.mkdir(parents=True)
    old = pd.DataFrame({"id": ["1", "2"], "method": "saliency", "target": "pred", "deletion_auc": [0.1, 0.2],
                        "insertion_auc": [0.8, 0.7], "degenerate": False})
    old.to_parquet(path)
    check_table(FAITHFULNESS, pd.read_parquet(path), num_samples=2, num_classes=3, where=tmp_path)
    new = old.iloc[1:].assign(method="gradcam", **{c: np.float32(0.5) for c in PERTURBATION_COLUMNS})
    merged = _merge_table(path, new)
    check_table(FAITHFULNESS, pd.read_parquet(path), num_samples=2, num_classes=3, where=tmp_path)
    assert len(merged) == 3 and merged.loc[merged["method"] == "saliency", "deletion_vs_random"].isna().all()
    assert (merged.loc[merged["method"] == "gradcam", "road_gap"] == 0.5).all()
