"""Real architectures (issue 11): a CNN that reuses one ReLU, a torchvision-style Bottleneck net whose one in-place
ReLU runs three times per block, parameter-free models, and the Grad-CAM layer and maps they need. Each numbered
failure of the issue that this file covers has a test that reproduces it."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers.errors import AnalyzerError
from analyzers.explanations.attributions import conv_sites, default_gradcam_layer, explain
from analyzers.explanations.faithfulness import degenerate_maps, randomisation_check
from analyzers.training.gradients import gradient_norm_traces
from architectures import build
from conftest import export_model


def _data(shape, n=48, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, classes, n)


def _planted(shape, classes: int, n: int, seed: int = 0):
    """Noise images with a bright square whose place is the class: evidence a trained model's Grad-CAM must find."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    side = shape[-1] // 3
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, :, row * side:(row + 1) * side, col * side:(col + 1) * side] += 2.0
    return x, y


def _trained(arch: str, steps: int = 60):
    """The architecture trained briefly on `_planted` data (an untrained net's Grad-CAM can be negative, hence
    zero, everywhere: a fact of random weights, not of the layer)."""
    model = build(arch).train()
    x, y = _planted(model.input_shape, _classes(model), 256)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = np.random.default_rng(step).choice(len(x), 64, replace=False)
        loss = nn.functional.cross_entropy(model(torch.as_tensor(x[rows])), torch.as_tensor(y[rows]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def _classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def _relu_calls(module: nn.Module, relu_names, x: np.ndarray) -> dict:
    """An independent count: each call of each ReLU module recorded by a plain hook, in order."""
    named = dict(module.named_modules())
    seen: dict = {}
    handles = [named[n].register_forward_hook(
        lambda _m, _a, out, n=n: seen.setdefault(n, []).append(out.detach().clone())) for n in relu_names]
    try:
        with torch.no_grad():
            module(torch.as_tensor(x))
    finally:
        for h in handles:
            h.remove()
    return seen


# --- 1. a reused activation module ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, relus, widths", [
    ("shared_relu", ["relu"], {"relu@1": 8, "relu@2": 16, "relu@3": 32}),
    ("bottleneck", ["layer1.relu", "layer2.relu"],
     {"layer1.relu@1": 4, "layer1.relu@2": 4, "layer1.relu@3": 16,
      "layer2.relu@1": 8, "layer2.relu@2": 8, "layer2.relu@3": 32}),
])
def test_a_reused_relu_is_traced_per_call_site(arch, relus, widths):
    model = build(arch)
    x, y = _data(model.input_shape, classes=_classes(model))
    got = gradient_norm_traces(model, x, y, batch_size=16, num_batches=3)
    dead = got.dead_units.set_index("layer")
    assert dict(dead["units"]) == widths
    # dead units per call, against the plain hooks' outputs on exactly the traced samples
    rows = np.asarray(got.params["sample_rows"])
    calls = _relu_calls(model, relus, x[rows])
    for name in relus:
        for k, out in enumerate(calls[name]):
            never = int((out.transpose(0, 1).reshape(out.shape[1], -1) <= 0).all(dim=1).sum())
            assert dead.loc[f"{name}@{k + 1}", "dead_units"] == never
    assert set(got.traces["layer"]) >= {"conv1", "head"} if arch == "shared_relu" else True


# The bottleneck's every-stage run takes 60-120 s on 2 cores: `make bench` (pytest -m benchmark) runs it; the suite
# keeps the shared-ReLU net, which reuses one ReLU module the same way.
@pytest.mark.parametrize("arch", ["shared_relu", pytest.param("bottleneck", marks=pytest.mark.benchmark)])
def test_every_stage_and_every_method_on_an_export_of_a_reused_relu_net(arch, tmp_path):
    from analyzers.engines.inference import predict
    from analyzers.engines.pipeline import run_analysis
    from analyzers.explanations.attributions import list_methods
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.models import load_model
    from analyzers.loading.runs import open_run

    model = _trained(arch)
    x, y = _planted(model.input_shape, _classes(model), 64, seed=1)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    path = export_model(model, torch.zeros(2, *model.input_shape), tmp_path / f"{arch}.pt2")
    out = run_analysis(str(path), str(tmp_path / "data.npz"), tmp_path / "run")
    run = open_run(out)
    assert {stage: summary["status"] for stage, summary in run.info["analyses"].items()} == {
        "evaluation": "done", "data_health": "done", "projections": "done", "gradients": "done"}
    with torch.no_grad():
        direct = torch.softmax(model(torch.as_tensor(x)), dim=1).numpy()
    np.testing.assert_allclose(run.probs, direct, rtol=1e-5, atol=1e-6)
    assert any("@" in layer for layer in run.read_parquet("gradients/dead_units.parquet")["layer"])

    methods = [m.name for m in list_methods("image") if m.name not in ("shap", "lime")]  # LIME: tests/test_lime.py
    ids = [str(i) for i in run.samples["id"][:3]]
    result = explain_run(out, ids, methods, sanity=False)
    # an export's ReLUs are graph operations, not nn.ReLU modules: guided backprop is skipped, saying so; a
    # convolutional net has no attention to roll out
    assert sorted(result.skipped) == ["attention_rollout", "guided_backprop"]
    assert "nn.ReLU" in result.skipped["guided_backprop"]
    assert "no attention in this model" in result.skipped["attention_rollout"]
    assert set(result.scores["method"]) == set(methods) - {"guided_backprop", "attention_rollout"}
    gradcam = result.scores[result.scores["method"] == "gradcam"]
    assert not gradcam["degenerate"].any() and gradcam["deletion_auc"].notna().all()
    loaded = load_model(str(path), isolation="process")
    assert np.array_equal(predict(loaded, x).probs, predict(load_model(str(path)), x).probs)


# --- 3. the Grad-CAM layer, and maps that rank nothing --------------------------------------------------------------

def test_default_gradcam_layer_is_the_main_paths_last_spatial_convolution(tmp_path):
    from analyzers.loading.models import load_model

    model = build("bottleneck")  # its 1x1 shortcut convolution is registered last
    x, _ = _data(model.input_shape, n=4)
    assert list(dict(model.named_modules()))[-3] == "layer2.downsample.0"
    assert default_gradcam_layer(model, x) == "layer2.conv3"
    exported = load_model(str(export_model(model, torch.zeros(2, 3, 16, 16), tmp_path / "b.pt2")),
                          isolation="process")
    assert default_gradcam_layer(exported, x) == "layer2.conv3"
    sites = {s.name: s for s in conv_sites(model, x)[0]}
    assert sites["layer2.conv3"].depth > sites["layer2.downsample.0"].depth


class Collapsing(nn.Module):
    """Its last convolution outputs a single position (a ResNet at a small input): Grad-CAM there is constant."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 8)  # 8x8 -> 1x1
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_a_single_position_convolution_is_not_the_default_and_its_maps_are_degenerate(tmp_path):
    from analyzers.explanations.explain_run import score_samples

    torch.manual_seed(0)
    model = Collapsing().eval()
    x, _ = _data((1, 8, 8), n=6)
    assert default_gradcam_layer(model, x) == "conv1"
    attr = explain(model, x, None, "gradcam", layer="conv2")
    assert degenerate_maps(attr).all()
    targets = np.zeros(len(x), dtype=np.int64)
    _, table = score_samples(model, x, targets, "gradcam", options={"layer": "conv2"}, background=x, mask=None,
                             batch_size=8, sanity=True, probe=None, cache_dir=tmp_path)
    assert table["degenerate"].all() and table["deletion_auc"].isna().all() and table["insertion_auc"].isna().all()
    assert table["sanity_flag"].all() and table["sanity_rank_corr"].isna().all()
    _, good = score_samples(model, x, targets, "gradcam", options={"layer": "conv1"}, background=x, mask=None,
                            batch_size=8, sanity=False, probe=None, cache_dir=tmp_path)
    assert not good["degenerate"].any() and good["deletion_auc"].notna().all()


def test_degenerate_maps_and_a_constant_map_fails_the_sanity_check():
    maps = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.3), np.arange(16.0).reshape(1, 4, 4)])
    assert degenerate_maps(maps).tolist() == [True, True, False]
    torch.manual_seed(0)
    model = Collapsing().eval()
    x, _ = _data((1, 8, 8), n=4)
    check = randomisation_check(model, x, lambda m, inputs, targets: np.ones_like(inputs))
    assert check.flagged and check.degenerate.all() and np.isnan(check.mean_final_corr)


class PatchTokens(nn.Module):
    """A ViT in miniature: a patch-embedding convolution, then tokens (N, L, D) through a linear layer."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.norm(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(dim=1))


def test_a_patch_embedding_is_not_a_default_gradcam_layer():
    torch.manual_seed(0)
    model = PatchTokens().eval()
    x, _ = _data((3, 16, 16), n=2)
    with pytest.raises(AnalyzerError, match="patch embedding"):
        default_gradcam_layer(model, x)
    assert "'norm'" in str(pytest.raises(AnalyzerError, default_gradcam_layer, model, x).value)  # named to choose
    # named explicitly, the (N, 16, 8) tokens are a 4x4 patch grid: Grad-CAM with tokens as positions
    upsampled, raw = explain(model, x, 0, "gradcam", layer="norm", return_raw=True)
    captured = []
    handle = model.norm.register_forward_hook(lambda _m, _a, out: captured.append(out))
    score = model(torch.as_tensor(x))[:, 0].sum()
    handle.remove()
    grads, = torch.autograd.grad(score, captured[0])
    expected = torch.relu((grads.mean(1, keepdim=True) * captured[0]).sum(2)).reshape(2, 1, 4, 4)
    np.testing.assert_allclose(raw, expected.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert upsampled.shape == (2, 3, 16, 16)
    with pytest.raises(AnalyzerError, match="not a spatial map"):
        explain(model, x, None, "gradcam", layer="head")  # (N, classes) is neither a map nor tokens


# --- 2. an analysis that does not apply is skipped with its reason ----------------------------------------------------

class NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :3] * 2.0


def test_a_model_without_parameters_gets_a_run_with_the_gradient_stage_skipped(tmp_path, monkeypatch):
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run
    from test_dashboard_app import _app, _ok, _plain

    x, y = _data((5,), n=40)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    path = export_model(NoParameters(), torch.zeros(2, 5), tmp_path / "free.pt2")
    out = run_analysis(str(path), str(tmp_path / "data.npz"), tmp_path / "runs" / "free")
    run = open_run(out)
    gradients = run.info["analyses"]["gradients"]
    assert gradients["status"] == "skipped" and "no parameters" in gradients["reason"]
    assert run.info["analyses"]["evaluation"]["status"] == "done" and run.has("metrics.json")
    assert not run.file("gradients").exists()  # nothing half-written is left
    np.testing.assert_allclose(run.probs, torch.softmax(torch.as_tensor(x[:, :3] * 2.0), 1).numpy(), rtol=1e-5)

    at = _app(monkeypatch, tmp_path / "runs")
    at.switch_page("views/training.py")
    at.run()
    _ok(at)
    assert any("gradients analysis was skipped because the model has no parameters" in _plain(w.value)
               for w in at.warning), [w.value for w in at.warning]
    at.switch_page("views/overview.py")
    at.run()
    _ok(at)
    assert any("The gradients analysis was skipped: the model has no parameters" in _plain(w.value)
               for w in at.warning), [w.value for w in at.warning]


def test_a_stage_that_fails_is_skipped_and_the_others_are_written(tmp_path, monkeypatch):
    import analyzers.evaluation.stage as stage
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run

    def broken(ctx):
        (ctx.stage_dir / "metrics.json").write_text("{half")
        raise ValueError("boom")

    monkeypatch.setattr(stage, "evaluation_stage", broken)
    out = run_analysis("sample:tabular", "sample:tabular", tmp_path / "run", analyses=["evaluation", "gradients"])
    run = open_run(out)
    assert run.info["analyses"]["evaluation"] == {"status": "skipped", "reason": "it failed (ValueError: boom)"}
    assert run.info["analyses"]["gradients"]["status"] == "done" and not run.has("metrics.json")


def test_explain_with_a_method_that_does_not_apply_returns_the_others(tmp_path):
    from analyzers.__main__ import main
    from analyzers.engines.pipeline import run_analysis
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.runs import open_run

    out = run_analysis("sample:tabular", "sample:tabular", tmp_path / "run", analyses=[])
    ids = [str(i) for i in open_run(out).samples["id"][:2]]
    result = explain_run(out, ids, ["gradcam", "integrated_gradients", "saliency"], sanity=False)
    assert set(result.scores["method"]) == {"integrated_gradients", "saliency"}
    assert list(result.skipped) == ["gradcam"] and "tabular" in result.skipped["gradcam"]
    assert main(["explain", str(out), "--ids", ids[0], "--method", "gradcam,saliency"]) == 0
    with pytest.raises(AnalyzerError, match="gradcam"):
        explain_run(out, ids, ["gradcam"])


# --- 9. no misleading flags ---------------------------------------------------------------------------------------------

class TinyViT(nn.Module):
    """Tokens with a zero-initialised class token and position embeddings, as a ViT starts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 6, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position_embeddings
        return self.head(torch.relu(tokens)[:, 0] + tokens.mean(dim=1))


def test_a_class_token_is_never_flagged_as_exploding():
    torch.manual_seed(0)
    x, y = _data((5, 4), n=32)
    got = gradient_norm_traces(TinyViT().eval(), x, y, batch_size=16, num_batches=2)
    params = got.traces[got.traces["kind"] == "parameters"].set_index("layer")
    assert np.isinf(params.loc["cls_token", "ratio"]).all()  # zero weights: the ratio that misled
    assert "cls_token" not in got.flags["exploding"] and "position_embeddings" not in got.flags["exploding"]
    assert set(got.flags["ratio_exempt_layers"]) == {"cls_token", "position_embeddings"}


def test_an_error_free_model_gets_no_slices():
    from analyzers.evaluation.slices import find_slices

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    samples = pd.DataFrame({"id": np.arange(300), "label": labels, "pred": labels, "correct": True,
                            "confidence": 0.9, "loss": 0.1, "age": rng.integers(20, 80, 300)})
    table = find_slices(samples, embeddings=rng.standard_normal((300, 4)).astype(np.float32))
    assert table.empty
    assert not json.dumps(table.to_dict()).count("NaN")


# --- 8. run_analysis takes the wrapped module that predict and explain take ---------------------------------------

def test_run_analysis_accepts_a_wrapped_module_and_explains_it_when_given_again(tmp_path):
    from analyzers import wrap_module
    from analyzers.engines.pipeline import load_run_inputs, run_analysis
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.runs import open_run

    model = build("shared_relu").train()  # the user's module, in train mode: it comes back as it came
    x, y = _data(model.input_shape, n=40, classes=3)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    loaded = wrap_module(model, model.input_shape)
    run = open_run(run_analysis(loaded, str(tmp_path / "d.npz"), tmp_path / "run"))
    with torch.no_grad():
        direct = torch.softmax(model.eval()(torch.as_tensor(x)), 1).numpy()
    model.train()
    np.testing.assert_allclose(run.probs, direct, rtol=1e-5, atol=1e-6)
    assert run.info["model"]["source"] == "module" and model.training
    assert run.info["analyses"]["gradients"]["status"] == "done"
    # a plain module with its input shape is the same run (same weights, same data: reused)
    assert run_analysis(model, str(tmp_path / "d.npz"), tmp_path / "run", input_shape=model.input_shape) == run.path
    with pytest.raises(AnalyzerError, match="no file holds"):
        load_run_inputs(run)
    from analyzers.loading.datasets import load_dataset

    result = explain_run(run.path, [str(run.samples["id"][0])], ["saliency"], model=loaded, sanity=False,
                         dataset=load_dataset(str(tmp_path / "d.npz")))
    assert len(result.scores) == 1
    with pytest.raises(AnalyzerError, match="input_shape"):
        run_analysis(model, str(tmp_path / "d.npz"), tmp_path / "other")


# --- 4. an import-path architecture with keyword arguments, explained later ------------------------------------------

@pytest.mark.parametrize("arch, kwargs", [("shared_relu", {"classes": 3}), ("bottleneck", {"classes": 4})])
def test_a_state_dict_with_arch_kwargs_runs_and_is_explained_later(arch, kwargs, tmp_path, capsys):
    from safetensors.torch import save_file

    from analyzers.__main__ import main
    from analyzers.engines.pipeline import load_run_inputs
    from analyzers.loading.runs import open_run
    import architectures

    model = build(arch)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    x, y = _data(model.input_shape, n=40, classes=kwargs["classes"])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    class_name = type(model).__name__
    assert hasattr(architectures, class_name)
    shape = ",".join(map(str, model.input_shape))
    out = tmp_path / "run"
    assert main(["run", "--model", str(tmp_path / "weights.safetensors"), "--data", str(tmp_path / "d.npz"),
                 "--out", str(out), "--arch", f"architectures:{class_name}", "--arch-kwargs", json.dumps(kwargs),
                 "--input-shape", shape]) == 0
    run = open_run(out)
    assert run.info["model"]["arch_kwargs"] == kwargs and run.info["parameters"]["arch_kwargs"] == kwargs
    with torch.no_grad():
        np.testing.assert_allclose(run.probs, torch.softmax(model(torch.as_tensor(x)), 1).numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert main(["explain", str(out), "--ids", str(run.samples["id"][0]), "--method", "saliency,gradcam"]) == 0
    assert "gradcam" in capsys.readouterr().out
    with pytest.raises(AnalyzerError, match="only the command line rebuilds"):
        load_run_inputs(run)  # the dashboard's way in: it never imports code


def test_arch_kwargs_errors_are_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from analyzers.__main__ import main

    save_file(build("shared_relu").state_dict(), str(tmp_path / "w.safetensors"))
    x, y = _data((1, 12, 12), n=10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    base = ["run", "--model", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "d.npz"), "--out",
            str(tmp_path / "r"), "--input-shape", "1,12,12"]
    cases = [(["--arch", "architectures:build"], "with no arguments failed"),  # build(name) needs its name
             (["--arch", "architectures:SharedReluCNN", "--arch-kwargs", '{"colours": 3}'], "colours"),
             (["--arch", "digits", "--arch-kwargs", '{"classes": 3}'], "import-path architecture"),
             (["--arch", "architectures:SharedReluCNN", "--arch-kwargs", "[3]"], "not a JSON object")]
    for extra, words in cases:
        try:
            code = main(base + extra)
        except SystemExit as exc:  # argparse's own refusal: its usage line and one error line
            code = exc.code
        err = capsys.readouterr().err.strip()
        assert code != 0 and words in err and "Traceback" not in err, err


# --- 6 and 7. labels named the model's way, and images of any channel count -------------------------------------------

class AnyChannels(nn.Module):
    def __init__(self, channels: int, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _zip_of(path, members: dict):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _png(array: np.ndarray, mode: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_class_folders_are_matched_to_the_models_classes_never_by_sorted_order(tmp_path):
    from analyzers.loading.datasets import load_dataset
    from analyzers.loading.models import load_model

    torch.manual_seed(0)
    path = export_model(AnyChannels(1, classes=10), torch.zeros(2, 1, 8, 8), tmp_path / "ten.pt2")
    rng = np.random.default_rng(0)
    image = lambda: _png(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L")  # noqa: E731
    words = {"three": 3, "five": 5, "eight": 8}
    named = _zip_of(tmp_path / "named.zip", {f"{w}/{i}.png": image() for w in words for i in range(2)})
    by_index = _zip_of(tmp_path / "index.zip", {f"{k}/{i}.png": image() for k in words.values() for i in range(2)})
    model = load_model(str(path), isolation="process")
    with pytest.raises(AnalyzerError, match="--class-names"):
        load_dataset(str(named), model=model)  # not 0, 1, 2 in sorted order, silently
    assert sorted(set(load_dataset(str(by_index), model=model).y)) == [3, 5, 8]
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    named_model = load_model(str(path), isolation="process", class_names=names)
    loaded = load_dataset(str(named), model=named_model)
    assert {folder: int(label) for folder, label in zip(loaded.metadata["folder"], loaded.y)} == words


def test_text_labels_with_an_export_take_class_names_from_the_command_line(tmp_path, capsys):
    from analyzers.__main__ import main
    from analyzers.loading.runs import open_run

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    path = export_model(net, torch.zeros(2, 3), tmp_path / "mlp.pt2")
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    table["label"] = rng.choice(["cat", "dog"], 30)
    table.to_csv(tmp_path / "t.csv", index=False)
    base = ["run", "--model", str(path), "--data", str(tmp_path / "t.csv"), "--analyses", "evaluation"]
    assert main(base + ["--out", str(tmp_path / "r1")]) == 1
    assert "--class-names" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "r2"), "--class-names", "cat,dog"]) == 0
    run = open_run(tmp_path / "r2")
    assert run.class_names == ["cat", "dog"]
    assert (run.samples["label"].to_numpy() == (table["label"] == "dog").to_numpy()).all()


def test_a_model_file_carries_its_class_and_feature_names(tmp_path, capsys):
    """Names saved with the model (.pt2 extra_files, safetensors metadata) match text labels and table columns by
    name: a CSV whose columns come in another order is read in the model's order, never silently misaligned."""
    import zipfile

    from safetensors.torch import save_file

    from analyzers.__main__ import main
    from analyzers.loading.archive_policy import ArchivePolicyError, sanitize_export_archive
    from analyzers.loading.runs import open_run

    torch.manual_seed(0)
    net = nn.Linear(3, 2).eval()
    names = {"class_names.json": json.dumps(["cat", "dog"]), "feature_names.json": json.dumps(["a", "b", "c"])}
    program = torch.export.export(net, (torch.zeros(2, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "named.pt2"), extra_files=names)
    save_file(net.state_dict(), str(tmp_path / "named.safetensors"),
              metadata={k.removesuffix(".json"): v for k, v in names.items()})
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    table["label"] = rng.choice(["cat", "dog"], 30)
    table[["c", "label", "a", "b"]].to_csv(tmp_path / "shuffled.csv", index=False)
    with torch.no_grad():
        expected = torch.softmax(net(torch.as_tensor(table[["a", "b", "c"]].to_numpy().copy(), dtype=torch.float32)), 1)
    for model, extra in ((tmp_path / "named.pt2", []),
                         (tmp_path / "named.safetensors", ["--arch", "torch.nn:Linear", "--arch-kwargs",
                                                           '{"in_features": 3, "out_features": 2}',
                                                           "--input-shape", "3"])):
        out = tmp_path / model.suffix[1:]
        assert main(["run", "--model", str(model), "--data", str(tmp_path / "shuffled.csv"), "--out", str(out),
                     "--analyses", "evaluation", *extra]) == 0
        run = open_run(out)
        assert run.class_names == ["cat", "dog"] and run.info["dataset"]["feature_names"] == ["a", "b", "c"]
        assert "matched by name" in run.info["preprocessing"]["feature_order"]
        np.testing.assert_allclose(run.probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    table[["a", "c", "label"]].to_csv(tmp_path / "short.csv", index=False)
    assert main(["run", "--model", str(tmp_path / "named.pt2"), "--data", str(tmp_path / "short.csv"), "--out",
                 str(tmp_path / "r3")]) == 1
    err = capsys.readouterr().err
    assert "no column 'b'" in err and "Traceback" not in err

    # what an archive may carry is a list of names, nothing else: any other extra file is still refused
    data = (tmp_path / "named.pt2").read_bytes()
    assert sanitize_export_archive(data, "named.pt2").names == {"class_names": ("cat", "dog"),
                                                                "feature_names": ("a", "b", "c")}
    for member, content, words in (("feature_names.json", '{"a": 1}', "not a JSON list of names"),
                                   ("class_names.json", '["cat", "cat"]', "names something twice"),
                                   ("notes.txt", "hello", "extra files are not part of a model")):
        forged = tmp_path / "forged.pt2"
        with zipfile.ZipFile(tmp_path / "named.pt2") as src, zipfile.ZipFile(forged, "w") as dst:
            for info in src.infolist():
                if not info.filename.endswith(f"extra/{member}"):
                    dst.writestr(info, src.read(info))
            dst.writestr(zipfile.ZipInfo(f"{src.infolist()[0].filename.split('/')[0]}/extra/{member}"), content)
        with pytest.raises(ArchivePolicyError, match=words):
            sanitize_export_archive(forged.read_bytes(), "forged.pt2")


@pytest.mark.parametrize("channels, kind", [(2, "LA"), (4, "RGBA"), (6, "npy")])
def test_image_zips_for_any_channel_count(channels, kind, tmp_path):
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run
    from dashboard.figures import to_display_image

    torch.manual_seed(0)
    model = AnyChannels(channels).eval()
    path = export_model(model, torch.zeros(2, channels, 8, 8), tmp_path / "m.pt2")
    rng = np.random.default_rng(2)
    members, expected = {}, {}
    for i in range(12):
        pixels = rng.integers(0, 255, (8, 8, channels), dtype=np.uint8)
        name = f"{i % 3}/{i:02d}." + ("npy" if kind == "npy" else "png")
        if kind == "npy":
            members[name] = _npy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
        else:
            members[name] = _png(pixels, kind)
        expected[name] = pixels.transpose(2, 0, 1).astype(np.float32) / 255.0
    data = _zip_of(tmp_path / "bands.zip", members)
    mean, std = [0.5] * channels, [0.25] * channels
    run = open_run(run_analysis(str(path), str(data), tmp_path / "run", mean=mean, std=std, analyses=[]))
    x = np.stack([(expected[i] - 0.5) / 0.25 for i in run.samples["id"]])
    with torch.no_grad():
        direct = torch.softmax(model(torch.as_tensor(x)), 1).numpy()
    np.testing.assert_allclose(run.probs, direct, rtol=1e-5, atol=1e-6)
    shown = to_display_image(x[0], mean=mean, std=std)
    assert shown.shape == (8, 8, 3)  # a false-colour composite of bands, not one channel mean
    band = expected[run.samples["id"][0]][1]
    np.testing.assert_allclose(to_display_image(x[0], mean=mean, std=std, bands=1),
                               (band - band.min()) / (band.max() - band.min()), atol=1e-5)


def test_more_bands_than_an_image_file_holds_asks_for_npy(tmp_path):
    from analyzers.loading.datasets import load_dataset
    from analyzers.loading.models import wrap_module

    model = wrap_module(AnyChannels(6).eval(), (6, 8, 8))
    data = _zip_of(tmp_path / "rgb.zip", {f"{k}/a.png": _png(np.zeros((8, 8, 3), np.uint8), "RGB") for k in "012"})
    with pytest.raises(AnalyzerError, match=r"\.npy array of shape \(6, H, W\)"):
        load_dataset(str(data), model=model)
    bad = _zip_of(tmp_path / "short.zip", {"0/a.npy": _npy(np.zeros((6, 8, 8), np.float32))[:-40]})
    with pytest.raises(AnalyzerError, match="truncated"):
        load_dataset(str(bad), model=model)
