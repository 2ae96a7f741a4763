"""Attributions: shape contract, hand-known gradients, models left untouched, awkward models handled or refused."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError, load_model, wrap_module
from analyzers.explanations.attributions import METHODS, explain, list_methods, reduce_for_display
from tests.conftest import TinyCNN, export_model

# keep shap/smoothgrad/IG cheap where only shapes matter: few draws and steps, not doubled by the completeness check
FAST = {"nsamples": 8, "nt_samples": 4, "n_steps": 8, "n_samples": 20, "check_completeness": False}


class TinySeq(nn.Module):
    """4 channels x 12 positions -> 3 classes, with a 1-D convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).amax(dim=2))


def _tabular_model():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


MODELS = {
    "image": (lambda: TinyCNN(), (1, 8, 8)),
    "sequence": (lambda: TinySeq(), (4, 12)),
    "tabular": (_tabular_model, (5,)),
}


def _data(shape, n, seed=0):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("modality", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_the_input_shape_for_one_sample_and_a_batch(modality, method):
    build, shape = MODELS[modality]
    torch.manual_seed(0)
    model = build().eval()
    x = _data(shape, 3)
    if method not in [m.name for m in list_methods(modality)]:
        with pytest.raises(AnalyzerError, match="does not apply to (tabular|sequence)"):
            explain(model, x, method=method, background=x)
        return
    if method == "attention_rollout":  # these models have no attention: refused with that reason (tests/test_attention)
        with pytest.raises(AnalyzerError, match="no attention in this model"):
            explain(model, x, method=method)
        return
    batch = explain(model, x, method=method, background=x, batch_size=2, **FAST)
    one = explain(model, x[:1], method=method, background=x, **FAST)
    assert batch.shape == x.shape and one.shape == (1, *shape)
    assert batch.dtype == np.float32 and np.isfinite(batch).all()
    assert np.abs(batch).sum() > 0, "an all-zero map explains nothing"
    # a loaded model knows its sample shape: one unbatched sample comes back unbatched
    loaded = wrap_module(model, shape)
    assert explain(loaded, x[0], method=method, background=x, **FAST).shape == shape
    display = reduce_for_display(batch)
    assert display.shape == ((3, *shape[1:]) if modality != "tabular" else (3, *shape))


def test_saliency_and_friends_of_a_linear_model_match_its_weights():
    torch.manual_seed(1)
    model = nn.Linear(6, 4).eval()
    w = model.weight.detach().numpy()
    x = _data((6,), 5, seed=2) - 0.5
    target = np.array([0, 1, 2, 3, 1])
    np.testing.assert_allclose(explain(model, x, target, "saliency"), np.abs(w[target]), rtol=1e-6)
    np.testing.assert_allclose(explain(model, x, target, "input_x_gradient"), x * w[target], rtol=1e-5, atol=1e-7)
    # a linear score: Integrated Gradients from zero, and occluding one feature at a time, are exactly x * w
    np.testing.assert_allclose(explain(model, x, target, "integrated_gradients"), x * w[target], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(explain(model, x, target, "occlusion", window=1, stride=1), x * w[target],
                               rtol=1e-4, atol=1e-6)


def test_target_none_is_the_predicted_class_and_bad_targets_are_refused(tiny_cnn, tiny_data):
    x = tiny_data[0][:6]
    pred = tiny_cnn(torch.as_tensor(x)).argmax(1).numpy()
    np.testing.assert_array_equal(explain(tiny_cnn, x, None, "saliency"), explain(tiny_cnn, x, pred, "saliency"))
    with pytest.raises(AnalyzerError, match="out of range"):
        explain(tiny_cnn, x, 3, "saliency")
    with pytest.raises(AnalyzerError, match="one integer per sample"):
        explain(tiny_cnn, x, [0, 1], "saliency")
    with pytest.raises(AnalyzerError, match="unknown attribution method"):
        explain(tiny_cnn, x, None, "no_such_method")
    with pytest.raises(AnalyzerError, match="one input is no background"):  # more draw their background from x
        explain(tiny_cnn, x[:1], None, "shap")
    with pytest.raises(AnalyzerError, match="needs background"):
        explain(tiny_cnn, x, None, "integrated_gradients", baseline="mean")


def test_probability_outputs_are_explained_as_log_probabilities(tiny_cnn, tiny_data):
    x = tiny_data[0][:4]
    probs_model = nn.Sequential(tiny_cnn, nn.Softmax(dim=1)).eval()
    loaded = wrap_module(probs_model, (1, 8, 8))
    assert loaded.output_kind == "probabilities"
    # the class score of a probability model is its log-probability: the gradient of log_softmax(logits)[:, 0]
    a = explain(loaded, x, 0, "input_x_gradient")
    xt = torch.as_tensor(x).requires_grad_()
    grad = torch.autograd.grad(torch.log_softmax(tiny_cnn(xt), 1)[:, 0].sum(), xt)[0].numpy()
    np.testing.assert_allclose(a, x * grad, rtol=1e-4, atol=1e-6)


class Awkward(nn.Module):
    """In-place ReLUs, a reused module, dropout and batch norm: everything that trips attribution code."""

    def __init__(self, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=inplace)  # used twice
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.bn(self.conv1(x)))
        h = self.act(self.conv2(h))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["requires"] == after["requires"]
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_hands_a_train_mode_model_back_untouched(method):
    torch.manual_seed(0)
    model = Awkward().train()  # a model in train mode, with batch-norm statistics that a forward would update
    x = _data((1, 8, 8), 4)
    model(torch.as_tensor(x)).sum().backward()  # the user's own .grad, which must survive
    model.conv2.weight.requires_grad_(False)
    model.fc.register_forward_hook(lambda *a: None)  # the user's own hook, which must stay
    before = _snapshot(model)
    layer = "conv2" if method == "gradcam" else None
    if method == "attention_rollout":  # no attention here: refused, and the model is still handed back untouched
        with pytest.raises(AnalyzerError, match="no attention in this model"):
            explain(model, x, 1, method)
        _assert_same(before, _snapshot(model))
        return
    first = explain(model, x, 1, method, background=x, layer=layer, **FAST)
    _assert_same(before, _snapshot(model))
    assert model.training
    # eval mode inside: dropout off and batch norm on running statistics, so the map is deterministic
    np.testing.assert_array_equal(first, explain(model, x, 1, method, background=x, layer=layer, **FAST))


def test_in_place_relu_gives_the_same_maps_as_out_of_place():
    torch.manual_seed(0)
    inplace, plain = Awkward(inplace=True).eval(), Awkward(inplace=False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = _data((1, 8, 8), 5)
    for method in ("saliency", "integrated_gradients", "gradcam"):
        np.testing.assert_allclose(explain(inplace, x, 2, method, layer="conv2"),
                                   explain(plain, x, 2, method, layer="conv2"), rtol=1e-5, atol=1e-7)


def test_a_model_that_starts_with_an_in_place_op_on_its_input_is_explained():
    class InPlaceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.relu_())

    torch.manual_seed(0)
    model = InPlaceFirst().eval()
    x = _data((4,), 3) - 0.5
    sal = explain(model, x, 0, "saliency")
    w = model.fc.weight.detach().numpy()[0]
    np.testing.assert_allclose(sal, np.where(x > 0, np.abs(w), 0), rtol=1e-6)
    assert (x < 0).any()  # the caller's array was not modified in place


def test_grad_cam_refuses_a_reused_module_and_a_non_spatial_layer():
    model = Awkward().eval()
    x = _data((1, 8, 8), 2)
    with pytest.raises(AnalyzerError, match="runs 2 times per forward pass"):
        explain(model, x, 0, "gradcam", layer="act")
    with pytest.raises(AnalyzerError, match="not a spatial map"):
        explain(model, x, 0, "gradcam", layer="fc")
    with pytest.raises(AnalyzerError, match="has no layer"):
        explain(model, x, 0, "gradcam", layer="conv9")
    with pytest.raises(AnalyzerError, match="no convolutional layer|does not apply"):
        explain(_tabular_model(), _data((5,), 2), 0, "gradcam")


def test_grad_cam_raw_map_is_the_layer_resolution_and_upsamples_to_the_input():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = _data((2, 8, 8), 3)
    up, raw = explain(model, x, 1, "gradcam", return_raw=True)
    assert raw.shape == (3, 1, 4, 4) and up.shape == x.shape
    assert (raw >= 0).all()  # the ReLU of the paper
    np.testing.assert_array_equal(up[:, 0], up[:, 1])  # repeated over channels
    assert int(np.unravel_index(up[0, 0].argmax(), (8, 8))[0]) // 2 == int(
        np.unravel_index(raw[0, 0].argmax(), (4, 4))[0])
    with pytest.raises(AnalyzerError, match="gradcam only"):
        explain(model, x, 1, "saliency", return_raw=True)


def test_exported_pt2_model_is_explained_like_the_original_including_grad_cam_by_name(tiny_cnn, tmp_path):
    x = _data((1, 8, 8), 4)
    loaded = load_model(str(export_model(tiny_cnn, torch.as_tensor(x[:2]), tmp_path / "tiny.pt2")), isolation="process")
    assert loaded.conv_layers == ("conv",)
    for method in ("saliency", "integrated_gradients", "gradcam", "occlusion"):
        np.testing.assert_allclose(explain(loaded, x, 1, method), explain(tiny_cnn, x, 1, method), rtol=1e-4,
                                   atol=1e-6)
    np.testing.assert_allclose(explain(loaded, x, 1, "gradcam", layer="conv"), explain(tiny_cnn, x, 1, "gradcam"),
                               rtol=1e-4, atol=1e-6)
    before = _snapshot(loaded.module)
    explain(loaded, x, None, "shap", background=x, nsamples=8)
    _assert_same(before, _snapshot(loaded.module))


def test_two_threads_sharing_one_model_get_identical_maps(tiny_cnn, tiny_data):
    x = tiny_data[0][:8]
    results = {}

    def work(name, method):
        results[name] = explain(tiny_cnn, x, None, method, n_steps=32, nt_samples=8, batch_size=3)

    expected = {m: explain(tiny_cnn, x, None, m, n_steps=32, nt_samples=8, batch_size=3)
                for m in ("integrated_gradients", "smoothgrad", "gradcam")}
    threads = [threading.Thread(target=work, args=(f"{m}-{i}", m)) for i in range(2) for m in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, value in results.items():
        np.testing.assert_array_equal(value, expected[name.rsplit("-", 1)[0]])
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_baselines_and_occlusion_windows():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = _data((1, 8, 8), 3)
    bg = _data((1, 8, 8), 20, seed=5)
    zero = explain(model, x, 0, "integrated_gradients")
    blur = explain(model, x, 0, "integrated_gradients", baseline="blur")
    mean = explain(model, x, 0, "integrated_gradients", baseline="mean", background=bg)
    assert not np.allclose(zero, blur) and not np.allclose(zero, mean)
    with pytest.raises(AnalyzerError, match="blur.*images or sequences"):
        explain(_tabular_model(), _data((5,), 2), 0, "integrated_gradients", baseline="blur")
    with pytest.raises(AnalyzerError, match="unknown baseline"):
        explain(model, x, 0, "integrated_gradients", baseline="noise")
    coarse = explain(model, x, 0, "occlusion", window=4, stride=4)
    # a 4x4 window with stride 4 tiles the image: the map is constant on each tile
    assert np.allclose(coarse[:, :, :4, :4], coarse[:, :, :1, :1])
    with pytest.raises(AnalyzerError, match="window"):
        explain(model, x, 0, "occlusion", window=(9, 9))


def test_method_registry_describes_options_for_the_dashboard():
    assert {m.name for m in list_methods("tabular")} == set(METHODS) - {"gradcam", "attention_rollout"}
    assert METHODS["integrated_gradients"].options["n_steps"] == 50
    assert METHODS["shap"].needs_background and METHODS["gradcam"].needs_conv_layer
    with pytest.raises(AnalyzerError, match="not a batch"):
        reduce_for_display(np.zeros((2, 1, 2, 3, 4)))


def test_random_methods_are_seeded_per_call_even_across_models_and_leave_the_callers_rng_alone(tiny_cnn, tiny_data):
    import copy

    x = tiny_data[0][:4]
    other = copy.deepcopy(tiny_cnn)  # another model: another lock, so only the seeding keeps the draws apart
    expected = explain(tiny_cnn, x, None, "smoothgrad", nt_samples=8)
    assert not np.array_equal(expected, explain(tiny_cnn, x, None, "smoothgrad", nt_samples=8, seed=1))
    results = []

    def work(model):
        for _ in range(5):
            results.append(explain(model, x, None, "smoothgrad", nt_samples=8))

    threads = [threading.Thread(target=work, args=(m,)) for m in (tiny_cnn, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 10 and all(np.array_equal(r, expected) for r in results)
    torch.manual_seed(123)
    np.random.seed(123)
    explain(tiny_cnn, x, None, "smoothgrad", nt_samples=8)
    explain(tiny_cnn, x, None, "shap", background=x, nsamples=8)
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))


def test_tabular_gradients_per_standard_deviation_rank_by_effect_not_by_units():
    """issue 18, item 9: f = 1000 * a + 1 * b with a spread of 0.001 and b of 10: raw saliency ranks a first (its
    gradient is 1000), though a typical change of b moves the score 10 times more; per standard deviation ranks b."""
    from analyzers.explanations.attributions import per_standard_deviation

    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(0, 0.001, 500), rng.normal(0, 10, 500)]).astype(np.float32)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[:] = torch.tensor([[1000.0, 1.0], [0.0, 0.0]])
        model.bias.zero_()
    raw = explain(model, x[:5], np.zeros(5, dtype=np.int64), "saliency")
    np.testing.assert_allclose(raw, np.tile([1000.0, 1.0], (5, 1)), rtol=1e-5)
    scaled = per_standard_deviation(raw, x)
    np.testing.assert_allclose(scaled, raw * x.std(axis=0, dtype=np.float64), rtol=1e-5)
    assert (scaled.argmax(axis=1) == 1).all() and (raw.argmax(axis=1) == 0).all()
    assert METHODS["saliency"].per_input_unit and not METHODS["integrated_gradients"].per_input_unit


def _guided_reference(model, x, target):
    """Springenberg et al.'s rule written out with torch's own hooks, not Captum's: every nn.ReLU passes back only
    the positive part of the gradient that reaches its output, where its input was positive."""
    handles = [m.register_full_backward_hook(lambda _m, grad_in, _out: (grad_in[0].clamp(min=0),))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        xt = torch.as_tensor(x).clone().requires_grad_()
        out = model(xt)
        grad, = torch.autograd.grad(out[:, target].sum(), xt)
    finally:
        for handle in handles:
            handle.remove()
    return grad.numpy()


def test_guided_backprop_is_springenbergs_rule_and_refuses_a_model_without_relu_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    x = _data((1, 8, 8), 5) - 0.5
    guided = explain(model, x, 2, "guided_backprop")
    np.testing.assert_allclose(guided, _guided_reference(model, x, 2), rtol=1e-5, atol=1e-7)
    plain = explain(model, x, 2, "saliency")
    assert not np.allclose(np.abs(guided), plain)  # the rule changed the gradient (negative ones were cut)
    assert all(not m._backward_hooks and not m._forward_hooks for m in model.modules())  # Captum's hooks are gone
    np.testing.assert_array_equal(plain, explain(model, x, 2, "saliency"))  # later gradients are plain again

    class FunctionalRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(torch.relu(x))

    with pytest.raises(AnalyzerError, match="no nn.ReLU|has none"):
        explain(FunctionalRelu().eval(), _data((5,), 2), 0, "guided_backprop")


def test_each_maps_settings_are_described_as_they_were_resolved(tiny_cnn, tiny_data):
    from analyzers.explanations.attributions import describe_settings

    x = tiny_data[0][:2]
    ig = explain(tiny_cnn, x, None, "integrated_gradients", n_steps=4, details=True)
    text = describe_settings("integrated_gradients", ig.row_settings(0))
    assert "baseline zeros" in text and f"{int(ig.n_steps[0])} steps" in text and int(ig.n_steps[0]) >= 4
    smooth = explain(tiny_cnn, x, None, "smoothgrad", nt_samples=4, stdevs=0.2, details=True)
    spread = float(x.max() - x.min())
    assert describe_settings("smoothgrad", smooth.row_settings(0)) == (
        f"4 noisy copies, noise std 0.2 × the value range of the inputs ({0.2 * spread:.3g}), seed 0")
    cam = explain(tiny_cnn, x, None, "gradcam", details=True)
    assert describe_settings("gradcam", cam.row_settings(0)) == "layer conv"
    assert describe_settings("saliency", {}) == "no options"
    assert "not stored" in describe_settings("integrated_gradients", {})
