"""Feature maps and the samples that activate a unit most (issue 13): a hand-built convolution whose filters detect
a horizontal bar, a vertical bar and a bright dot finds exactly the images planted with each pattern, where the
pattern lies; the running top-k over batches equals a brute-force ranking of every sample; linear units and token
outputs likewise; the model is left as it was; a run keeps the result and reads it back."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analyzers import AnalyzerError
from analyzers.errors import InvalidOption
from analyzers.explanations.feature_maps import layer_activations, run_top_activating, top_activating
from analyzers.guard import _hook_count

SIZE = 12
PLANTED = 10  # images per pattern


def _pattern_filters() -> torch.Tensor:
    horizontal = torch.tensor([[-1.0, -1, -1], [2, 2, 2], [-1, -1, -1]])
    vertical = horizontal.T.clone()
    dot = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]])
    return torch.stack([horizontal, vertical, dot]).unsqueeze(1)  # (3, 1, 3, 3)


def _detector() -> nn.Module:
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 3, 3, padding=1, bias=False), relu=nn.ReLU(),
                                      pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(3, 2)))
    with torch.no_grad():
        model.conv.weight.copy_(_pattern_filters())
    return model


def _planted_images(seed=0):
    """300 images of faint noise; rows 0-9 hold a horizontal bar, 10-19 a vertical bar, 20-29 a single bright dot,
    each at a random place (recorded)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.05, size=(300, 1, SIZE, SIZE)).astype(np.float32)
    where = []
    for i in range(3 * PLANTED):
        r, c = rng.integers(2, SIZE - 2, size=2)
        if i < PLANTED:
            x[i, 0, r, 2:SIZE - 2] = 1.0
        elif i < 2 * PLANTED:
            x[i, 0, 2:SIZE - 2, c] = 1.0
        else:
            x[i, 0, r, c] = 1.0
        where.append((int(r), int(c)))
    order = rng.permutation(len(x))  # the planted images anywhere in the dataset, not first
    inverse = np.argsort(order)
    return x[order], {p: np.sort(inverse[p * PLANTED:(p + 1) * PLANTED]) for p in range(3)}, where, inverse


def test_the_top_samples_of_each_filter_are_the_images_planted_with_its_pattern():
    x, planted, where, inverse = _planted_images()
    model = _detector().train()  # a model in training mode stays in it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    top = top_activating(model, x, layer="relu", k=PLANTED, batch_size=7)  # batches that split the planted rows
    assert top.kind == "conv" and top.rows.shape == (3, PLANTED) and top.map_shape == (SIZE, SIZE)
    for channel in range(3):
        assert np.array_equal(np.sort(top.rows[channel]), planted[channel]), channel
    # where the maximum of the horizontal filter's map lies: on the planted bar's row
    for row, position in zip(top.rows[0], top.positions[0]):
        planted_index = int(np.flatnonzero(inverse == row)[0])
        assert position // SIZE == where[planted_index][0]
    # the dot filter's maximum is at the dot itself
    for row, position in zip(top.rows[2], top.positions[2]):
        planted_index = int(np.flatnonzero(inverse == row)[0])
        assert divmod(int(position), SIZE) == where[planted_index]
    assert model.training and _hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_running_top_k_equals_a_brute_force_ranking_of_every_sample():
    x, _, _, _ = _planted_images(seed=1)
    model = _detector().eval()
    with torch.no_grad():  # the reference: every sample's every map at once, by torch's own convolution
        maps = F.relu(F.conv2d(torch.as_tensor(x), _pattern_filters(), padding=1)).numpy()
    for reduce, reference in (("max", maps.max(axis=(2, 3))), ("mean", maps.mean(axis=(2, 3)))):
        top = top_activating(model, x, layer="relu", k=25, batch_size=16, reduce=reduce)
        for channel in range(3):
            expected = np.argsort(-reference[:, channel], kind="stable")[:25]
            np.testing.assert_allclose(top.scores[channel], reference[expected, channel], rtol=1e-5, atol=1e-6)
            assert set(top.rows[channel][:20]) == set(expected[:20])  # ties only at the tail
        np.testing.assert_allclose(top.mean_response, reference.mean(axis=0), rtol=1e-4)
    acts = layer_activations(model, x[:4], layer="conv")
    with torch.no_grad():
        raw = F.conv2d(torch.as_tensor(x[:4]), _pattern_filters(), padding=1).numpy()
    np.testing.assert_allclose(acts.activations, raw, atol=1e-6)
    np.testing.assert_allclose(acts.strength, raw.mean(axis=(2, 3)), atol=1e-6)
    assert np.array_equal(acts.order, np.argsort(-raw.mean(axis=(2, 3)), axis=1, kind="stable"))


def test_linear_units_and_token_outputs_rank_their_samples():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    linear = nn.Sequential(OrderedDict(fc=nn.Linear(6, 4), out=nn.Linear(4, 2))).eval()
    top = top_activating(linear, x, layer="fc", k=5, batch_size=32)
    with torch.no_grad():
        units = linear.fc(torch.as_tensor(x)).numpy()
    assert top.kind == "linear" and top.map_shape == ()
    for unit in range(4):
        assert list(top.rows[unit]) == list(np.argsort(-units[:, unit], kind="stable")[:5])

    class Tokens(nn.Module):
        """(N, T) inputs; `embed` gives (N, T, D) token outputs, then a mean over tokens and a classifier."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(1, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, t):
            return self.head(self.embed(t.unsqueeze(-1)).mean(dim=1))

    tokens = Tokens().eval()
    seq = rng.normal(size=(150, 7)).astype(np.float32)
    top = top_activating(tokens, seq, layer="embed", k=4, batch_size=40)
    with torch.no_grad():
        out = tokens.embed(torch.as_tensor(seq).unsqueeze(-1)).numpy()  # (N, T, D)
    assert top.kind == "tokens" and top.map_shape == (7,)
    for unit in range(3):
        response = out[:, :, unit].max(axis=1)
        assert list(top.rows[unit]) == list(np.argsort(-response, kind="stable")[:4])
        assert list(top.positions[unit]) == [int(out[r, :, unit].argmax()) for r in top.rows[unit]]


def test_options_are_checked_and_a_layer_that_does_not_run_is_named():
    x, _, _, _ = _planted_images()
    model = _detector()
    with pytest.raises(InvalidOption, match="reduce must be one of max, mean"):
        top_activating(model, x, layer="relu", reduce="median")
    with pytest.raises(InvalidOption, match="k .* at least 1"):
        top_activating(model, x, layer="relu", k=0)
    with pytest.raises(AnalyzerError, match="no layer 'nope'"):
        top_activating(model, x, layer="nope")
    model.fc.unused = nn.Linear(2, 2)  # a submodule that nn.Linear's forward never calls
    with pytest.raises(AnalyzerError, match="did not run during the forward pass"):
        layer_activations(model, x[:2], layer="fc.unused")
    assert _hook_count(model) == 0


def test_a_run_keeps_the_top_samples_and_reads_them_back(sample_run_dir, tmp_path, monkeypatch):
    import shutil

    from analyzers.explanations import feature_maps
    from analyzers.loading.runs import open_run

    run_dir = tmp_path / "shapes"
    shutil.copytree(sample_run_dir("shapes"), run_dir)
    result, ids = run_top_activating(run_dir, layer="relu3", k=6, batch_size=128)
    run = open_run(run_dir)
    assert result.rows.shape == (32, 6) and len(ids) == 32 and len(ids[0]) == 6
    assert (run_dir / "network" / "top_activating" / "relu3.npz").exists()
    known = set(run.samples["id"].astype(str))
    assert all(i in known for row in ids for i in row)
    # read back, not recomputed, while model, data and options are the same
    monkeypatch.setattr(feature_maps, "top_activating", lambda *a, **k: pytest.fail("recomputed"))
    again, ids_again = run_top_activating(run_dir, layer="relu3", k=6)
    assert np.array_equal(again.rows, result.rows) and ids_again == ids
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # other options are computed afresh
        run_top_activating(run_dir, layer="relu3", k=3)


@pytest.mark.parametrize("sample, kind", [("shapes", "conv"), ("tabular", "linear")])
def test_the_network_page_draws_a_samples_maps_and_a_channels_top_samples(sample, kind, sample_run_dir, tmp_path,
                                                                          monkeypatch):
    import json
    import shutil

    from analyzers.explanations.feature_maps import run_top_activating
    from tests.test_dashboard_app import _app, _ok, _text

    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir(sample), runs / sample)
    at = _app(monkeypatch, runs, runs / sample).run()
    at.switch_page("views/network.py").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    layer = at.selectbox(key="network-layer").value
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    traces = {t.get("type") for chart in charts for t in chart["data"]}
    assert ("heatmap" in traces) if kind == "conv" else ("bar" in traces)
    channel = at.selectbox(key="network-channel").value
    top, ids = run_top_activating(runs / sample, layer=layer, k=12)  # what the page stored, read back
    assert f"whose map of channel #{channel} reaches the highest value" in _text(at)
    shown = f"{top.scores[channel][0]:.3g}"
    assert shown in _text(at)
    assert (runs / sample / "network" / "top_activating").is_dir()
    if sample == "shapes":  # the planted cue as a concept: green backgrounds push towards "square" at relu3
        at.selectbox(key="tcav-column").set_value("background").run()
        at.selectbox(key="tcav-value").set_value("green").run()
        at.selectbox(key="tcav-class").set_value(1).run()
        at.multiselect(key="tcav-layers").set_value(["relu3"]).run()
        at.button(key="tcav-run").click().run()
        _ok(at)
        table = next(d.value for d in at.dataframe if "null_score" in d.value.columns)
        row = table.iloc[0]
        assert row["layer"] == "relu3" and bool(row["significant"]) and row["score"] > 0.7, row.to_dict()
        assert (runs / sample / "network" / "tcav").is_dir()  # kept in the run, and listed below
        kept = next(d.value for d in at.dataframe if "concept" in d.value.columns)
        assert kept.iloc[0][["concept", "class", "layer"]].tolist() == ["background = green", "square", "relu3"]

        # the selection as the concept (made on the Embeddings page: here the run's green-background samples)
        from analyzers.loading.runs import open_run

        green = open_run(runs / sample).samples.query("background == 'green'")["id"].astype(str).tolist()
        at = _app(monkeypatch, runs, runs / sample, sel="ids:" + ",".join(green)).run()
        at.switch_page("views/network.py").run()
        at.radio(key="tcav-source").set_value("the selected samples").run()
        assert f"The {len(green):,} samples of the current selection" in _text(at)
        at.selectbox(key="tcav-class").set_value(1).run()
        at.multiselect(key="tcav-layers").set_value(["relu3"]).run()
        at.button(key="tcav-run").click().run()
        _ok(at)
        scored = next(d.value for d in at.dataframe if "null_score" in d.value.columns).iloc[0]
        assert bool(scored["significant"]) and scored["score"] > 0.7
        kept = next(d.value for d in at.dataframe if "concept" in d.value.columns)
        assert f"a selection of {len(green)} samples" in kept["concept"].tolist() and len(kept) == 2


def test_the_network_page_shows_the_text_samples_attention_and_its_rollout_score(sample_run_dir, tmp_path,
                                                                                 monkeypatch):
    """The text sample attends through scaled_dot_product_attention: the page shows each layer's weights, the
    rollout, the tokens drawn on most (words, from the sample's vocabulary) and the rollout's deletion score."""
    import shutil

    from tests.test_dashboard_app import _app, _ok, _text

    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir("text"), runs / "text")
    at = _app(monkeypatch, runs, runs / "text").run()
    at.switch_page("views/network.py").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    layers = at.selectbox(key="network-attention-layer").options
    assert len(layers) == 2 and all(name.startswith(("blocks.0.attention", "blocks.1.attention")) for name in layers)
    text = _text(at)
    assert "not an explanation" in text and "Most drawn-on tokens" in text
    assert "Faithfulness of the rollout" in text and "deletion vs a random order" in text
