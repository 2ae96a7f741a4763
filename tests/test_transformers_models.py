"""Hugging Face `transformers` models (issue 11), built from configs with random weights (no download): ResNet
(bottleneck blocks), ConvNeXt and ViT on images, and a BERT sequence classifier on token ids plus an attention mask.
Each is exported as the README says and also run as a state dict with --arch and --arch-kwargs, through every stage
and every method that applies; token attributions are checked against the eager model's own gradients."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_architectures import text_classifier, vision_classifier  # noqa: E402

LENGTH = 12


def _state_dict_run(model, arch: str, kwargs: dict, data, out, extra=()) -> "object":
    from safetensors.torch import save_file

    from analyzers.__main__ import main
    from analyzers.loading.runs import open_run

    weights = out.parent / f"{out.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    assert main(["run", "--model", str(weights), "--data", str(data), "--out", str(out), "--arch", arch,
                 "--arch-kwargs", json.dumps(kwargs), "--analyses", "evaluation", *extra]) == 0
    return open_run(out)


# Each takes 1-2.5 minutes on 2 busy cores (every explanation method on a real architecture): the suite keeps the
# vision transformer, the one architecture no sample shares, and `make bench` (pytest -m benchmark) runs the two
# convolutional ones, so the suite stays within its 20 minutes.
@pytest.mark.parametrize("name", [pytest.param("resnet", marks=pytest.mark.benchmark),
                                  pytest.param("convnext", marks=pytest.mark.benchmark), "vit"])
def test_a_transformers_vision_model_through_every_stage_and_method(name, tmp_path):
    from analyzers.engines.pipeline import run_analysis
    from analyzers.explanations.attributions import list_methods
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.runs import open_run
    from conftest import export_model

    model = vision_classifier(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    np.savez(tmp_path / "images.npz", x=x, y=y)
    path = export_model(model, torch.zeros(2, 3, 32, 32), tmp_path / f"{name}.pt2")
    run = open_run(run_analysis(str(path), str(tmp_path / "images.npz"), tmp_path / "run"))
    assert {stage: s["status"] for stage, s in run.info["analyses"].items()} == {
        "evaluation": "done", "data_health": "done", "projections": "done", "gradients": "done"}
    with torch.no_grad():
        direct = torch.softmax(model(torch.as_tensor(x)), dim=1).numpy()
    np.testing.assert_allclose(run.probs, direct, rtol=1e-4, atol=1e-6)
    assert run.info["accuracy"] == pytest.approx(float((direct.argmax(1) == y).mean()))
    flags = run.read_json("gradients/flags.json")
    assert not [layer for layer in flags["exploding"] if "cls_token" in layer or "position" in layer]

    # LIME's 200 perturbed copies per sample tripled this test on the resnet (77 s): tests/test_lime.py checks it,
    # and the token test below runs it on an exported BERT in the sandbox
    methods = [m.name for m in list_methods("image") if m.name != "lime"]
    ids = [str(i) for i in run.samples["id"][:2]]
    result = explain_run(run.path, ids, methods, sanity=False)
    # an export's activations are graph operations, not nn.ReLU modules: guided backprop is skipped, saying so
    skipped = dict(result.skipped)
    assert "nn.ReLU" in skipped.pop("guided_backprop")
    if name != "vit":  # a convolutional net has no attention to roll out; the ViT's is its map
        assert "no attention in this model" in skipped.pop("attention_rollout")
    if name == "vit":  # its only convolution is the patch embedding: Grad-CAM on its tokens is asked for by name
        assert list(skipped) == ["gradcam"] and "patch embedding" in skipped["gradcam"]
        assert "model.vit" in skipped["gradcam"]  # it names a token layer to choose
        tokens = explain_run(run.path, ids, ["gradcam"], layer="model.vit.layers.1", sanity=False).scores
        assert len(tokens) == 2 and not tokens["degenerate"].any()
        with np.load(run.path / "explanations/gradcam/pred.npz") as stored:
            assert stored["attributions"].shape == (2, 3, 32, 32)  # the 4x4 patch grid upsampled onto the image
    else:
        assert not skipped
        gradcam = result.scores[result.scores["method"] == "gradcam"]
        assert len(gradcam) == 2 and not gradcam["degenerate"].any()  # the default layer's maps are not constant
    assert set(result.scores["method"]) == set(methods) - set(result.skipped)

    # the same weights as a state dict, rebuilt by an import-path architecture with keyword arguments
    again = _state_dict_run(model, "hf_architectures:vision_classifier", {"kind": name}, tmp_path / "images.npz",
                            tmp_path / "from-weights", extra=("--input-shape", "3,32,32"))
    np.testing.assert_allclose(again.probs, run.probs, rtol=1e-4, atol=1e-6)
    assert again.info["model"]["arch_kwargs"] == {"kind": name}  # explained later: test_real_architectures, item 4


# --- token ids plus an attention mask --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A BERT classifier exported with two int64 inputs, and 40 padded sequences saved under the inputs' names."""
    root = tmp_path_factory.mktemp("bert")
    model = text_classifier()
    batch = torch.export.Dim("batch")
    example = (torch.ones(2, LENGTH, dtype=torch.long), torch.ones(2, LENGTH, dtype=torch.long))
    program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(root / "bert.pt2"))
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, LENGTH + 1, 40)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, (40, LENGTH)) * mask  # padded with id 0 after each sequence
    y = rng.integers(0, 3, 40)
    np.savez(root / "text.npz", input_ids=ids, attention_mask=mask, y=y)
    return model, root, ids, mask, y


@pytest.fixture(scope="module")
def text_run(text_model):
    """One run of the exported BERT, every stage, shared by the tests that read it (in runs/bert)."""
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run

    _, root, *_ = text_model
    return open_run(run_analysis(str(root / "bert.pt2"), str(root / "text.npz"), root / "runs" / "bert"))


def _eager_scores(model, ids, mask, embeds=None):
    kwargs = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": torch.as_tensor(ids)}
    return model.model(attention_mask=torch.as_tensor(mask), return_dict=False, **kwargs)[0]


def test_a_token_model_with_a_mask_runs_every_stage(text_model, text_run, tmp_path):
    model, root, ids, mask, y = text_model
    run = text_run
    assert {stage: s["status"] for stage, s in run.info["analyses"].items()} == {
        "evaluation": "done", "data_health": "done", "projections": "done", "gradients": "done"}
    with torch.no_grad():  # the program was given the int64 ids and mask it was exported with
        direct = torch.softmax(_eager_scores(model, ids, mask), dim=1).numpy()
    np.testing.assert_allclose(run.probs, direct, rtol=1e-4, atol=1e-6)
    assert run.info["dataset"]["modality"] == "tokens"
    assert [(i["name"], i["dtype"], i["shape"]) for i in run.info["model"]["inputs"]["inputs"]] == [
        ("input_ids", "int64", [LENGTH]), ("attention_mask", "int64", [LENGTH])]

    # the same weights as a state dict: the import-path architecture's inputs are declared with --inputs
    again = _state_dict_run(model, "hf_architectures:text_classifier", {"num_labels": 3}, root / "text.npz",
                            tmp_path / "from-weights",
                            extra=("--inputs", f"input_ids:int64:{LENGTH},attention_mask:int64:{LENGTH}"))
    np.testing.assert_allclose(again.probs, direct, rtol=1e-4, atol=1e-6)
    from analyzers.explanations.explain_run import explain_run

    result = explain_run(again.path, ["0"], ["integrated_gradients"], sanity=False, allow_import=True)
    assert float(result.scores["completeness_gap"].fillna(0).iloc[0]) < 0.01


def test_token_attributions_match_the_eager_models_gradients(text_model):
    """Per-token scores through the embedding layer, against the eager model fed `inputs_embeds` (no Captum)."""
    from analyzers.explanations.attributions import explain, token_embedding_layer
    from analyzers.explanations.completeness import ig_completeness
    from analyzers.explanations.perturbation import deletion_insertion
    from analyzers.loading.datasets import load_dataset
    from analyzers.loading.models import load_model

    model, root, ids, mask, _ = text_model
    loaded = load_model(str(root / "bert.pt2"), isolation="process")
    data = load_dataset(str(root / "text.npz"), model=loaded)
    rows = np.arange(6)
    x = data.x[rows]
    assert token_embedding_layer(loaded, x) == "model.bert.embeddings.word_embeddings"
    targets = np.asarray([0, 1, 2, 0, 1, 2])
    embeddings = model.model.bert.embeddings.word_embeddings(torch.as_tensor(ids[rows])).detach().requires_grad_()
    score = _eager_scores(model, ids[rows], mask[rows], embeds=embeddings).gather(1, torch.as_tensor(targets)[:, None])
    grad, = torch.autograd.grad(score.sum(), embeddings)
    expected = (grad * embeddings).sum(-1).detach().numpy()
    ours = explain(loaded, x, targets, "input_x_gradient")
    assert ours.shape == (6, LENGTH)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7)
    saliency = explain(loaded, x, targets, "saliency")
    np.testing.assert_allclose(saliency, grad.abs().sum(-1).numpy(), rtol=1e-4, atol=1e-7)

    # occlusion: the drop in the class score when one token becomes the pad id (0), the mask kept
    occlusion = explain(loaded, x, targets, "occlusion")
    with torch.no_grad():
        base = _eager_scores(model, ids[rows], mask[rows]).gather(1, torch.as_tensor(targets)[:, None])[:, 0]
        for j in (0, 3, LENGTH - 1):
            removed = ids[rows].copy()
            removed[:, j] = 0
            drop = base - _eager_scores(model, removed, mask[rows]).gather(1, torch.as_tensor(targets)[:, None])[:, 0]
            np.testing.assert_allclose(occlusion[:, j], drop.numpy(), rtol=1e-4, atol=1e-6)

    # Integrated Gradients from the pad tokens: they sum to f(x) - f(pads), with the mask kept
    completeness = ig_completeness(loaded, x, targets)
    with torch.no_grad():
        pads = _eager_scores(model, np.zeros_like(ids[rows]), mask[rows]).gather(1, torch.as_tensor(targets)[:, None])
    np.testing.assert_allclose(completeness.difference, (base - pads[:, 0]).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(completeness.attributions.sum(1), completeness.difference, rtol=0.02, atol=1e-6)

    # deletion: every token removed leaves the model on all-pad input; insertion starts there
    curves = deletion_insertion(loaded, x, ours, targets)
    with torch.no_grad():
        pad_probs = torch.softmax(_eager_scores(model, np.zeros_like(ids[rows]), mask[rows]), 1).numpy()
    np.testing.assert_allclose(curves.deletion[:, -1], pad_probs[rows, targets], rtol=1e-4)
    np.testing.assert_allclose(curves.insertion[:, 0], pad_probs[rows, targets], rtol=1e-4)

    # Grad-CAM on tokens is an explicit choice: one score per token from a named layer, never a default
    from analyzers.errors import AnalyzerError

    with pytest.raises(AnalyzerError, match="explicit choice.*--layer"):
        explain(loaded, x, targets, "gradcam")
    cam = explain(loaded, x, targets, "gradcam", layer="model.bert.encoder.layer.0")
    assert cam.shape == (6, LENGTH) and (cam >= 0).all() and (np.ptp(cam, axis=1) > 0).all()
    with pytest.raises(AnalyzerError, match="not one vector per token"):
        explain(loaded, x, targets, "gradcam", layer="model.bert.pooler")


def test_every_token_method_runs_through_explain_run(text_run):
    from analyzers.engines.pipeline import load_run_inputs
    from analyzers.explanations.attributions import list_methods
    from analyzers.explanations.explain_run import explain_run, explain_sample

    run = text_run
    methods = [m.name for m in list_methods("tokens")]
    assert set(methods) == {"saliency", "input_x_gradient", "integrated_gradients", "occlusion", "gradcam", "lime",
                            "attention_rollout"}
    model, dataset = load_run_inputs(run)  # one sandboxed worker for every call below
    try:
        result = explain_run(run.path, ["0", "1"], methods, layer="model.bert.encoder.layer.0", sanity=False,
                             model=model, dataset=dataset)
        assert not result.skipped and set(result.scores["method"]) == set(methods)
        checked = explain_run(run.path, ["0", "1"], ["saliency"], sanity=True, model=model, dataset=dataset).scores
        assert checked["sanity_rank_corr"].notna().all()  # the randomisation cascade over every layer
        with np.load(run.path / "explanations/integrated_gradients/pred.npz") as stored:
            assert stored["attributions"].shape == (2, LENGTH)
        one = explain_sample(run, "1", "integrated_gradients", sanity=False, model=model, dataset=dataset)
        assert one.display.shape == (LENGTH,) and one.scores["deletion_auc"] is not None
    finally:
        model.close()


def test_token_inputs_are_read_by_name_and_checked(text_model, tmp_path):
    import pandas as pd

    from analyzers.errors import AnalyzerError
    from analyzers.loading.datasets import load_dataset
    from analyzers.loading.models import load_model

    _, root, ids, mask, y = text_model
    loaded = load_model(str(root / "bert.pt2"), isolation="process")
    reference = load_dataset(str(root / "text.npz"), model=loaded)
    np.testing.assert_array_equal(reference.x[:, :LENGTH], ids)
    columns = {**{f"input_ids_{i}": ids[:, i] for i in range(LENGTH)},
               **{f"attention_mask_{i}": mask[:, i] for i in range(LENGTH)}, "label": y}
    pd.DataFrame(columns).to_csv(tmp_path / "text.csv", index=False)
    table = load_dataset(str(tmp_path / "text.csv"), model=loaded)
    np.testing.assert_array_equal(table.x, reference.x)
    cases = [({"input_ids": ids, "y": y}, "no array 'attention_mask'"),
             ({"input_ids": ids + 0.5, "attention_mask": mask, "y": y}, "not integers"),
             ({"input_ids": ids + 2 ** 25, "attention_mask": mask, "y": y}, "below 2\\*\\*24"),
             ({"input_ids": ids[:, :5], "attention_mask": mask, "y": y}, "has shape \\(40, 5\\)")]
    for arrays, words in cases:
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(AnalyzerError, match=words):
            load_dataset(str(tmp_path / "bad.npz"), model=loaded)


def test_a_model_output_names_the_return_dict_fix(tmp_path):
    """A transformers model exported as it is returns a ModelOutput: its pytree error was hidden."""
    from analyzers.errors import AnalyzerError
    from analyzers.loading.models import load_model

    bert = text_classifier().model
    ids = torch.randint(0, 50, (2, LENGTH))
    raw = torch.export.export(bert, (), {"input_ids": ids}, dynamic_shapes={"input_ids": {0: torch.export.Dim("b")}},
                              strict=False)
    torch.export.save(raw, str(tmp_path / "raw.pt2"))
    with pytest.raises(AnalyzerError, match="return_dict=False"):
        load_model(str(tmp_path / "raw.pt2"))


def test_the_dashboard_shows_a_token_model(text_model, text_run, tmp_path, monkeypatch):
    """Galleries and the Explain page draw token ids and one score per token; Grad-CAM waits for a token layer."""
    from streamlit.testing.v1 import AppTest

    from test_dashboard_app import APP, _ok, _plain

    _, root, ids, mask, _ = text_model
    monkeypatch.setenv("DASHBOARD_RUNS_DIR", str(text_run.path.parent))
    monkeypatch.setenv("DASHBOARD_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("DASHBOARD_RUN", str(text_run.path))
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["sample"] = "3"
    at.session_state["explain-sanity"] = False  # the randomisation cascade is tested above; here, the drawing
    at.run()
    at.switch_page("views/explain.py").run()
    _ok(at)
    shown = " ".join(str(h.body) for h in at.get("html"))
    visible = [str(t) for t in ids[3][mask[3] == 1]]
    assert "token ids:" in shown and all(f">{t}<" in shown for t in visible)
    at.multiselect(key="explain-methods").set_value(["integrated_gradients", "gradcam"]).run()
    _ok(at)
    assert any("choose that layer" in _plain(i.value) for i in at.info)
    assert at.selectbox(key="explain-layer").value is None
    at.selectbox(key="explain-layer").set_value("model.bert.encoder.layer.0").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    maps = [c for c in at.get("plotly_chart") if '"heatmap"' in str(c.proto.spec)]
    assert len(maps) >= 2  # one per-token strip for each method
