"""Robustness curves (issue 14): at strength 0 the curve is the model's accuracy as scikit-learn computes it from
`predict`; noise curves fall and never rise (beyond one sample in a hundred) on the digits and tabular samples; the
per-class curves weighted by the class counts give the overall curve, and a slice's point is its rows' accuracy;
each sample's first flip is where `predict` on the perturbed inputs first changes its prediction; the same seed gives
the same curve whatever the batch size; the model is handed back as it came; each perturbation does what it says on
hand-built inputs; a perturbation of another modality is refused naming those that apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score

import sample_models
from analyzers.data_health.robustness import (PERTURBATIONS, RobustnessCurve, fgsm_curve, perturbed_inputs,
                                              robustness_curve)
from analyzers.engines.inference import predict
from analyzers.errors import InvalidOption
from analyzers.guard import _hook_count
from analyzers.loading import wire
from analyzers.loading.models import load_model

NOISE = (0.25, 0.5, 1.0, 2.0)
# a curve may rise a little between two strengths (a sample wrong at 0.5 can be right at 1.0): at most this much.
# Measured on the samples' noise curves: no rise at all; tabular feature_dropout rose by 1 sample of 171 (0.006)
RISE_TOLERANCE = 0.01


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_model("sample:digits"), sample_models.get_sample("digits").load_data("test")


@pytest.fixture(scope="module")
def tabular():
    return load_model("sample:tabular"), sample_models.get_sample("tabular").load_data("test")


@pytest.fixture(scope="module")
def digits_noise(digits):
    model, data = digits
    return robustness_curve(model, data.x, data.y, perturbation="gaussian_noise", strengths=NOISE)


def _accuracy(model, x, y) -> float:
    return accuracy_score(y, predict(model, x).probs.argmax(axis=1))


def test_strength_zero_is_the_unperturbed_accuracy_and_noise_curves_only_fall(digits, tabular, digits_noise):
    table_curve = robustness_curve(tabular[0], tabular[1].x, tabular[1].y, perturbation="feature_noise",
                                   strengths=NOISE)
    for (model, data), curve in ((digits, digits_noise), (tabular, table_curve)):
        assert curve.strengths.tolist() == [0.0, *NOISE]  # 0 is added: the unperturbed point
        assert curve.metric == "accuracy" and curve.higher_is_better and not curve.adversarial
        assert curve.values[0] == pytest.approx(_accuracy(model, data.x, data.y), abs=1e-12)
        assert curve.flip_rate[0] == 0 and np.all(np.diff(curve.values) <= RISE_TOLERANCE)
        assert curve.values[-1] < curve.values[0] - 0.1  # the noise does hurt: the curve is not flat


def test_per_class_curves_weighted_by_counts_give_the_curve_and_slices_are_their_rows(digits):
    model, data = digits
    even = np.arange(len(data.y)) % 2 == 0
    curve = robustness_curve(model, data.x, data.y, perturbation="gaussian_noise", strengths=NOISE,
                             slices={"even rows": even, "none": np.zeros(len(even), bool)})
    counts = np.bincount(data.y, minlength=10)
    np.testing.assert_array_equal(curve.class_counts, counts)
    np.testing.assert_allclose((curve.class_values * counts[:, None]).sum(axis=0) / counts.sum(), curve.values,
                               rtol=0, atol=1e-12)
    pred = predict(model, data.x).probs.argmax(axis=1)
    for k in range(10):
        assert curve.class_values[k, 0] == pytest.approx(accuracy_score(data.y[data.y == k], pred[data.y == k]))
    assert curve.slice_names == ("even rows", "none")
    np.testing.assert_array_equal(curve.slice_counts, [even.sum(), 0])
    assert curve.slice_values[0, 0] == pytest.approx(accuracy_score(data.y[even], pred[even]))
    assert np.isnan(curve.slice_values[1]).all()  # an empty slice has no accuracy
    # a slice's point at a strength: its rows' accuracy on the same perturbed inputs
    noisy = perturbed_inputs(data.x, perturbation="gaussian_noise", strength=1.0)
    assert curve.slice_values[0, 3] == pytest.approx(_accuracy(model, noisy[even], data.y[even]))


def test_first_flips_are_where_predict_on_the_perturbed_inputs_first_changes(digits, digits_noise):
    model, data = digits
    clean = predict(model, data.x).probs.argmax(axis=1)
    expected = np.full(len(clean), np.inf)
    for index, strength in enumerate(NOISE, start=1):
        noisy = perturbed_inputs(data.x, perturbation="gaussian_noise", strength=strength, seed=0)
        changed = predict(model, noisy).probs.argmax(axis=1) != clean
        assert digits_noise.flip_rate[index] == pytest.approx(changed.mean())
        assert digits_noise.values[index] == pytest.approx(_accuracy(model, noisy, data.y))
        expected[changed & np.isinf(expected)] = strength
    np.testing.assert_array_equal(digits_noise.first_flip, expected)
    first = digits_noise.first_flipping(5)
    assert len(first) == 5 and np.all(np.diff(expected[first]) >= 0)  # the earliest flips, earliest first
    assert expected[first].max() == np.sort(expected)[4]


def test_the_same_seed_gives_the_same_curve_whatever_the_batch_size_and_another_seed_another(digits, digits_noise):
    model, data = digits
    again = robustness_curve(model, data.x, data.y, perturbation="gaussian_noise", strengths=NOISE, batch_size=37)
    np.testing.assert_array_equal(again.values, digits_noise.values)
    np.testing.assert_array_equal(again.first_flip, digits_noise.first_flip)
    np.testing.assert_array_equal(again.class_values, digits_noise.class_values)
    other = robustness_curve(model, data.x, data.y, perturbation="gaussian_noise", strengths=NOISE, seed=1)
    assert not np.array_equal(other.first_flip, digits_noise.first_flip)
    # the draws of a row depend on its row only: rows 100..199 perturbed alone equal those rows of the whole
    np.testing.assert_array_equal(
        perturbed_inputs(data.x, perturbation="occlusion", strength=0.4, rows=(100, 200)),
        perturbed_inputs(data.x, perturbation="occlusion", strength=0.4)[100:200])


def test_the_model_is_handed_back_as_it_came(tabular):
    model, data = tabular
    module = model.module
    module.train()  # the dropout layer would make a curve random if the analysis forgot eval mode
    module.fc1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    modes = [m.training for m in module.modules()]
    hooks = _hook_count(module)
    try:
        first = robustness_curve(model, data.x, data.y, perturbation="feature_dropout", strengths=(0.2, 0.5))
        second = robustness_curve(model, data.x, data.y, perturbation="feature_dropout", strengths=(0.2, 0.5))
        np.testing.assert_array_equal(first.values, second.values)
        attacked = fgsm_curve(model, data.x, data.y, epsilons=(1.0, 10.0))
        assert [m.training for m in module.modules()] == modes and _hook_count(module) == hooks
        assert not module.fc1.weight.requires_grad and module.fc2.weight.requires_grad
        assert all(p.grad is None for p in module.parameters())
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    finally:
        module.eval()
        module.fc1.weight.requires_grad_(True)
    assert attacked.adversarial and attacked.perturbation == "fgsm"
    assert attacked.values[0] == pytest.approx(first.values[0])  # the same unperturbed point
    assert attacked.values[-1] < attacked.values[0] - 0.3  # the worst direction hurts far more than dropout


def test_each_perturbation_does_what_it_says_on_hand_built_inputs():
    constant = np.full((4, 2, 6, 6), 0.3, dtype=np.float32)
    # a constant channel moves in the data's own units: brightness adds the strength
    np.testing.assert_allclose(perturbed_inputs(constant, perturbation="brightness", strength=0.7), 1.0, atol=1e-6)
    rng = np.random.default_rng(3)
    x = (rng.random((300, 2, 8, 8)) * np.array([1.0, 5.0])[None, :, None, None]).astype(np.float32)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    np.testing.assert_allclose(perturbed_inputs(x, perturbation="brightness", strength=2.0),
                               x + 2.0 * std[None, :, None, None], rtol=1e-5, atol=1e-5)
    noise = perturbed_inputs(x, perturbation="gaussian_noise", strength=0.5) - x  # noise of half each channel's std
    np.testing.assert_allclose(noise.std(axis=(0, 2, 3)), 0.5 * std, rtol=0.03)
    np.testing.assert_allclose(perturbed_inputs(x, perturbation="gaussian_noise", strength=1.0) - x, 2 * noise,
                               rtol=1e-4, atol=1e-5)  # nested: the same draw, scaled
    flat = perturbed_inputs(x, perturbation="contrast", strength=1.0)
    np.testing.assert_allclose(flat, np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape), atol=1e-5)
    blurred = perturbed_inputs(x[:3], perturbation="blur", strength=1.5)
    for i in range(3):
        for c in range(2):
            np.testing.assert_allclose(blurred[i, c], gaussian_filter(x[i, c], sigma=1.5, mode="nearest"),
                                       atol=1e-5)
    for name in ("gaussian_noise", "blur", "brightness", "contrast", "occlusion"):  # strength 0: untouched
        assert np.array_equal(perturbed_inputs(x, perturbation=name, strength=0.0), x)
    # occlusion on 8x8: cells of 2x2, 16 per image; 0.25 covers 4 of them, each filled with its channel's mean
    quarter = perturbed_inputs(x, perturbation="occlusion", strength=0.25)
    half = perturbed_inputs(x, perturbation="occlusion", strength=0.5)
    hidden_q, hidden_h = quarter != x, half != x
    assert np.all(hidden_q.mean(axis=(1, 2, 3)) == 0.25) and np.all(hidden_h.mean(axis=(1, 2, 3)) == 0.5)
    assert np.all(hidden_h[hidden_q])  # nested: what 0.25 covers, 0.5 covers too
    np.testing.assert_allclose(half[:, 1][hidden_h[:, 1]], x[:, 1].mean(), rtol=1e-5)
    table = rng.normal(size=(50, 10)).astype(np.float32) * 3 + 1
    dropped = perturbed_inputs(table, perturbation="feature_dropout", strength=0.3)
    replaced = dropped != table
    assert np.all(replaced.sum(axis=1) == 3)
    np.testing.assert_allclose(dropped[replaced], np.broadcast_to(table.mean(axis=0), table.shape)[replaced],
                               rtol=1e-5)


def test_a_perturbation_of_another_modality_or_a_bad_option_is_refused(tabular, digits):
    model, data = tabular
    with pytest.raises(InvalidOption, match="blur does not apply to table inputs.*feature_noise, feature_dropout"):
        robustness_curve(model, data.x, data.y, perturbation="blur", strengths=(1,))
    with pytest.raises(InvalidOption, match="feature_noise does not apply to image.*gaussian_noise, blur"):
        robustness_curve(digits[0], digits[1].x, digits[1].y, perturbation="feature_noise", strengths=(1,))
    with pytest.raises(InvalidOption, match="unknown perturbation 'noise': choose one of gaussian_noise"):
        robustness_curve(model, data.x, data.y, perturbation="noise", strengths=(1,))
    with pytest.raises(InvalidOption, match="at most 1 "):
        robustness_curve(model, data.x, data.y, perturbation="feature_dropout", strengths=(0.5, 1.5))
    with pytest.raises(InvalidOption, match="at least 0"):
        robustness_curve(model, data.x, data.y, perturbation="feature_noise", strengths=(-1,))
    with pytest.raises(InvalidOption, match="boolean mask of 171 rows"):
        robustness_curve(model, data.x, data.y, perturbation="feature_noise", strengths=(1,), slices={"a": [1, 2]})
    assert set(PERTURBATIONS) >= {"gaussian_noise", "blur", "brightness", "contrast", "occlusion", "feature_noise",
                                  "feature_dropout"}


def test_a_curve_crosses_the_worker_boundary_and_a_malformed_one_is_refused(digits_noise):
    header, blobs = wire.encode(digits_noise)
    back = wire.decode(header, blobs)
    assert isinstance(back, RobustnessCurve) and back.slice_names == ()
    np.testing.assert_array_equal(back.first_flip, digits_noise.first_flip)
    with pytest.raises(ValueError, match="malformed"):
        RobustnessCurve(**{**digits_noise.__dict__, "values": digits_noise.values[:-1]})


@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])  # 4.0: a kernel of 33 taps, wider than the 8-pixel image
def test_blur_is_scipys_gaussian_filter_on_images_and_sequences(sigma):
    rng = np.random.default_rng(11)
    images = rng.random((4, 3, 8, 11)).astype(np.float32)
    blurred = perturbed_inputs(images, perturbation="blur", strength=sigma)
    np.testing.assert_allclose(blurred, gaussian_filter(images, sigma=(0, 0, sigma, sigma), mode="nearest"),
                               atol=1e-5)
    # a short sequence (one matrix product) and one longer than BLUR_MATRIX_LIMIT (scipy's own filter)
    for length in (20, 1100):
        sequences = rng.random((3, 4, length)).astype(np.float32)
        np.testing.assert_allclose(perturbed_inputs(sequences, perturbation="blur", strength=sigma),
                                   gaussian_filter(sequences, sigma=(0, 0, sigma), mode="nearest"), atol=1e-5)


def test_the_noise_written_in_place_is_the_per_block_draws_whatever_the_batch_cuts():
    from analyzers.data_health.robustness import DRAW_BLOCK, _normals, _row_draws

    for start, stop in ((0, 4 * DRAW_BLOCK), (10, 137), (DRAW_BLOCK - 1, DRAW_BLOCK + 1), (5, 6)):
        expected = _row_draws(3, start, stop, lambda rng, n: rng.standard_normal((n, 2, 5), dtype=np.float32))
        np.testing.assert_array_equal(_normals(3, start, stop, (2, 5)), expected)
