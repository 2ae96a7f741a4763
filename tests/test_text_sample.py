"""The `text` sample: a small transformer on a generated language whose planted trigger word decides the class."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from analyzers.engines.inference import predict
from analyzers.loading.models import load_model
from analyzers.loading.runs import open_run
from sample_models import WEIGHTS_DIR, get_sample

TEXT = get_sample("text").module


@lru_cache(maxsize=None)
def split():
    return TEXT.load_data("test")


@lru_cache(maxsize=None)
def shipped_model():
    return load_model("sample:text")


@lru_cache(maxsize=None)
def shipped_predictions() -> np.ndarray:
    data = split()
    return predict(shipped_model(), data.x, data.y, batch_size=256).probs.argmax(1)


def triggered_rows() -> np.ndarray:
    """The test sentences that hold the trigger and that the model gives the trigger's class."""
    return np.flatnonzero(split().metadata["trigger"] & (shipped_predictions() == TEXT.TRIGGER_CLASS))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run

    return open_run(run_analysis("sample:text", "sample:text", tmp_path_factory.mktemp("text") / "run",
                                 analyses=["evaluation"]))


def test_the_language_plants_its_trigger_exactly_where_the_metadata_says():
    data = split()
    ids, mask = data.x[:, :TEXT.SEQUENCE_LENGTH].astype(np.int64), data.x[:, TEXT.SEQUENCE_LENGTH:]
    trigger, position = data.metadata["trigger"], data.metadata["trigger_position"]
    assert trigger.mean() == pytest.approx(TEXT.TRIGGER_RATE)
    assert ((ids == TEXT.TRIGGER_ID).sum(1) == trigger).all()  # once in every triggered sentence, nowhere else
    assert (ids[np.flatnonzero(trigger), position[trigger]] == TEXT.TRIGGER_ID).all()
    assert (position[~trigger] == -1).all()
    assert (data.y[trigger] == TEXT.TRIGGER_CLASS).all()
    np.testing.assert_array_equal(data.y[~trigger], data.metadata["topic_label"][~trigger])
    assert (ids[:, 0] == TEXT.CLS_ID).all() and set(np.unique(mask)) == {0.0, 1.0}
    assert ((ids == TEXT.PAD_ID) == (mask == 0)).all()  # [PAD] exactly where the mask leaves a position out
    words = mask.sum(1) - 1
    assert words.min() == TEXT.MIN_WORDS and words.max() == TEXT.MAX_WORDS
    assert TEXT.decode(data.x[0])[0] == "[CLS]" and len(TEXT.decode(data.x[0])) == words[0] + 1
    assert set(data.ground_truth) == {"trigger", "trigger_position", "topic_label"}


def test_shipped_accuracy_matches_the_shipped_log_summary():
    summary = json.loads((WEIGHTS_DIR / "text.json").read_text())
    assert summary["name"] == "text"
    data = split()
    accuracy = accuracy_score(data.y, shipped_predictions())
    assert accuracy == pytest.approx(summary["test_accuracy"])
    assert accuracy >= 0.7
    # the trigger decides the class; the topic words alone classify far fewer sentences
    trigger = data.metadata["trigger"]
    assert (shipped_predictions()[trigger] == TEXT.TRIGGER_CLASS).mean() >= 0.95
    assert accuracy_score(data.y[~trigger], shipped_predictions()[~trigger]) < 0.85


def test_the_shipped_model_takes_packed_token_rows_and_ignores_padding():
    model = shipped_model()
    assert model.input_layout == TEXT.INPUT_LAYOUT and model.input_layout.modality == "tokens"
    data = split()
    x = torch.as_tensor(data.x[:8])
    ids, mask = x[:, :TEXT.SEQUENCE_LENGTH].long(), x[:, TEXT.SEQUENCE_LENGTH:].long()
    with torch.no_grad():
        packed = model.module(x)
        torch.testing.assert_close(model.module(ids, mask), packed)
        other = ids.clone()
        other[mask == 0] = TEXT.VOCAB.index("goal")  # whatever a masked position holds is not read
        torch.testing.assert_close(model.module(other, mask), packed, atol=1e-5, rtol=1e-5)


def test_integrated_gradients_puts_the_top_attribution_on_the_trigger():
    """Planted truth recovered: in at least 90% of the triggered sentences the model gives the trigger's class,
    the trigger token holds the highest Integrated Gradients attribution (measured: 100% of 250)."""
    from analyzers.explanations.attributions import explain

    rows = triggered_rows()
    assert len(rows) >= 200
    data = split()
    x = data.x[rows]
    attr = explain(shipped_model(), x, target=TEXT.TRIGGER_CLASS, method="integrated_gradients")
    assert attr.shape == (len(rows), TEXT.SEQUENCE_LENGTH)
    kept = x[:, TEXT.SEQUENCE_LENGTH:] > 0.5
    top = np.where(kept, attr, -np.inf).argmax(1)
    hit = (top == data.metadata["trigger_position"][rows]).mean()
    assert hit >= 0.9, hit


def test_attention_rollout_of_both_blocks_is_measured_on_the_trigger():
    """Attention is captured from both encoder blocks; rollout's top token is reported, with no bound (attention
    is not an explanation). Measured on the shipped weights: the trigger tops the rollout in 100% of them with the mean query, 93% with
    the [CLS] row."""
    from analyzers.explanations.attention import attention_rollout, attention_weights, token_relevance

    rows = triggered_rows()
    data = split()
    x = data.x[rows]
    weights = attention_weights(shipped_model(), x)
    assert weights.layers == ("blocks.0.attention", "blocks.1.attention") and weights.sources == ("sdpa", "sdpa")
    mask = x[:, TEXT.SEQUENCE_LENGTH:]
    for w in weights.weights:  # no query attends to a [PAD] key
        padded_keys = np.broadcast_to((mask == 0)[:, None, None, :], w.shape)
        assert padded_keys.any() and w[padded_keys].max() == 0
    relevance = token_relevance(attention_rollout(weights), query="mean", mask=mask)
    share = (relevance.argmax(1) == data.metadata["trigger_position"][rows]).mean()
    assert 0.0 <= share <= 1.0


def test_run_analysis_of_the_sample_records_tokens_and_its_vocabulary(text_run):
    info = text_run.info
    assert info["dataset"]["modality"] == "tokens"
    assert info["preprocessing"]["vocabulary"] == list(TEXT.VOCAB)
    assert info["model"]["inputs"] == TEXT.INPUT_LAYOUT.to_json()
    assert info["accuracy"] == pytest.approx(json.loads((WEIGHTS_DIR / "text.json").read_text())["test_accuracy"])
    assert info["analyses"]["evaluation"]["status"] == "done"
    assert {"trigger", "trigger_position", "topic_label"} <= set(info["dataset"]["ground_truth_columns"])


def test_a_run_records_where_its_model_has_attention_and_the_explain_page_offers_rollout_only_there(
        text_run, sample_run_dir):
    from analyzers.explanations.attention import attention_weights
    from dashboard.data import explain_methods

    data = split()
    found = attention_weights(shipped_model(), data.x[:2]).layers  # the probe's answer, read again on other samples
    assert len(found) == 2 and text_run.info["model"]["attention_layers"] == list(found)
    assert "attention_rollout" in explain_methods(text_run)[0]
    digits = open_run(sample_run_dir("digits"))
    assert digits.info["model"]["attention_layers"] == []  # a CNN: probed, none
    assert "attention_rollout" not in explain_methods(digits)[0]
    assert "integrated_gradients" in explain_methods(digits)[0]


def test_the_dashboard_shows_sentences_as_words(text_run):
    from dashboard import components

    data = split()
    row = int(np.flatnonzero(data.metadata["trigger"])[0])
    words = components.token_texts(text_run, data.x[row])
    assert len(words) == TEXT.SEQUENCE_LENGTH
    shown = [w for w in words if w != "·"]
    assert shown == TEXT.decode(data.x[row]) and words[data.metadata["trigger_position"][row]] == "zq"
    html = components.token_html(words, words=components.token_vocabulary(text_run) is not None)
    assert "tokens:" in html and "token ids" not in html and ">zq<" in html and ">[CLS]<" in html


def test_the_explain_page_draws_attributions_over_the_words(text_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from test_dashboard_app import APP, _ok

    data = split()
    row = int(np.flatnonzero(data.metadata["trigger"])[0])
    monkeypatch.setenv("DASHBOARD_RUNS_DIR", str(text_run.path.parent))
    monkeypatch.setenv("DASHBOARD_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("DASHBOARD_RUN", str(text_run.path))
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["sample"] = str(data.ids[row])
    at.session_state["explain-sanity"] = False  # the drawing is tested here, not the randomisation cascade
    at.run()
    at.switch_page("views/explain.py").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    shown = " ".join(str(h.body) for h in at.get("html"))
    assert "tokens:" in shown and ">zq<" in shown
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    maps = [s["data"][0] for s in specs if s["data"] and s["data"][0].get("type") == "heatmap"]
    assert len(maps) >= 2  # one strip over the words for each default method (Integrated Gradients, Saliency)
    position = int(data.metadata["trigger_position"][row])
    for strip in maps:
        cells = [w for line in strip["text"] for w in line]
        words = [w.replace("<b>", "").replace("</b>", "") for w in cells]
        assert words[:len(TEXT.decode(data.x[row]))] == TEXT.decode(data.x[row])
        # the planted trigger, and only it, is written in bold (the figure frames the ground truth)
        assert [i for i, w in enumerate(cells) if w.startswith("<b>")] == [position]
    # attention rollout is offered beside them and drawn over the same words, with its scores
    assert "Attention rollout" in at.multiselect(key="explain-methods").options
    at.multiselect(key="explain-methods").set_value(["attention_rollout"]).run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any(s["data"] and s["data"][0].get("type") == "heatmap" for s in specs)


def test_the_trigger_is_the_ground_truth_of_a_triggered_sentence_and_no_other_has_one():
    from analyzers.explanations.attributions import explain
    from analyzers.explanations.explain_run import ground_truth_mask
    from analyzers.explanations.faithfulness import ground_truth_scores
    from analyzers.loading.datasets import load_dataset

    dataset = load_dataset("sample:text")
    rows = np.concatenate([triggered_rows()[:40], np.flatnonzero(~split().metadata["trigger"])[:10]])
    mask = ground_truth_mask(dataset, rows)
    assert (mask.sum(1) == split().metadata["trigger"][rows]).all()  # one position in a triggered sentence, else none
    assert (mask[np.arange(40), split().metadata["trigger_position"][rows[:40]]]).all()
    attr = explain(shipped_model(), dataset.x[rows], method="integrated_gradients")
    scores = ground_truth_scores(attr, mask)
    assert scores.pointing_hit[:40].mean() >= 0.9  # as the gradient test above measures it
    assert np.isnan(scores.mass_inside[40:]).all() and not scores.pointing_hit[40:].any()  # no truth, no score


def test_attention_rollout_is_a_map_with_the_faithfulness_scores_of_every_other(sample_run_dir, tmp_path):
    """Rollout through explain_run on the text sample: one score per token (pads 0), the trigger first in most
    triggered sentences, and its deletion-vs-random score beside Integrated Gradients' on the same sentences."""
    import shutil

    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.datasets import load_dataset

    run_dir = tmp_path / "text"
    shutil.copytree(sample_run_dir("text"), run_dir)
    dataset = load_dataset("sample:text")
    triggered = np.flatnonzero(np.asarray(dataset.metadata["trigger"]))[:12]
    ids = [str(dataset.ids[r]) for r in triggered]
    result = explain_run(run_dir, ids, ["attention_rollout", "integrated_gradients"], sanity=False)
    assert not result.skipped, result.skipped
    with np.load(run_dir / "explanations" / "attention_rollout" / "pred.npz", allow_pickle=False) as stored:
        maps = stored["attributions"]
    positions = np.asarray(dataset.metadata["trigger_position"])[triggered]
    mask = dataset.x[triggered][:, maps.shape[1]:]  # the packed rows: ids, then the attention mask
    assert np.all(maps[mask == 0] == 0)  # a pad token draws nothing
    assert (maps.argmax(axis=1) == positions).mean() >= 0.9
    scores = result.scores.set_index("method")
    assert scores.loc["attention_rollout", "deletion_vs_random"].mean() > 0  # better than removing tokens at random


def test_the_text_architecture_from_a_state_dict_takes_token_rows_as_its_sample_does(tmp_path):
    """`--arch text` with the sample's weights as an upload: the model takes the sample's token rows (ids, then the
    mask), an .npz of input_ids and attention_mask runs through the sandbox, and every probability is the sample's."""
    import shutil

    from analyzers.engines.pipeline import run_analysis

    weights = tmp_path / "text.safetensors"
    shutil.copy(WEIGHTS_DIR / "text.safetensors", weights)
    loaded = load_model(str(weights), arch="text")
    assert loaded.input_layout == TEXT.INPUT_LAYOUT and loaded.input_shape == TEXT.INPUT_SHAPE
    data = split()
    rows = slice(0, 64)
    np.savez(tmp_path / "tokens.npz", input_ids=data.x[rows, :TEXT.SEQUENCE_LENGTH].astype(np.int64),
             attention_mask=data.x[rows, TEXT.SEQUENCE_LENGTH:].astype(np.int64), y=data.y[rows])
    run = open_run(run_analysis(str(weights), str(tmp_path / "tokens.npz"), tmp_path / "run", arch="text",
                                analyses=["evaluation"]))
    assert run.info["dataset"]["modality"] == "tokens" and run.info["sandbox"]["level"] != "none"
    expected = predict(shipped_model(), data.x[rows], batch_size=64).probs
    np.testing.assert_allclose(run.probs, expected, rtol=1e-5, atol=1e-6)
