"""The inputs as the model receives them (analyzers.data_health.input_stats): channel statistics against numpy, the
drift sample's planted corrupted images found and nothing else, clean shapes flagged for nothing, unnormalised inputs
flagged, the grid seeded and per class."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analyzers.data_health.input_stats import input_stats
from analyzers.errors import AnalyzerError


@pytest.fixture(scope="module")
def drift_inputs():
    from sample_models import drift

    train, test = drift.load_data("train"), drift.load_data("test")
    x = np.concatenate([train.x, test.x])
    planted = np.concatenate([train.metadata["planted"], test.metadata["planted"]]).astype(str)
    split = np.r_[np.zeros(len(train.x), bool), np.ones(len(test.x), bool)]
    return x, np.concatenate([train.y, test.y]), planted, split


def test_channel_statistics_are_numpys_in_float64_whatever_the_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[[[3.0]], [[-1.0]]], scale=[[[2.0]], [[0.5]]], size=(101, 2, 5, 4)).astype(np.float32)
    stats = input_stats(x, batch_size=7)
    values = np.moveaxis(x, 1, 0).reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(stats.channels["mean"], values.mean(1), rtol=1e-10)
    np.testing.assert_allclose(stats.channels["std"], values.std(1), rtol=1e-8)
    np.testing.assert_array_equal(stats.channels["min"], values.min(1))
    np.testing.assert_array_equal(stats.channels["max"], values.max(1))


def test_the_drift_samples_corrupted_images_are_found_and_nothing_else(drift_inputs):
    x, y, planted, _ = drift_inputs
    stats = input_stats(x, labels=y)
    found = set(stats.corrupted["row"].tolist())
    truth = set(np.flatnonzero(np.char.startswith(planted, "corrupted-")).tolist())
    assert len(truth) == 8 and found == truth
    reasons = stats.corrupted.groupby("row")["reason"].apply(set).to_dict()
    expected = {"corrupted-constant": "constant", "corrupted-saturated": "saturated", "corrupted-noise": "noise",
                "corrupted-unnormalised": "out-of-scale"}
    for row in truth:
        assert expected[planted[row]] in reasons[row], (planted[row], reasons[row])
    assert reasons[min(r for r in truth if planted[r] == "corrupted-constant")] == {"constant"}
    codes = [f["code"] for f in stats.flags]
    assert codes.count("range-0-255") == 1
    assert "2 inputs" in next(f["message"] for f in stats.flags if f["code"] == "range-0-255")


@pytest.mark.parametrize("name", ["shapes", "digits", "dna", "scenes", "multispectral", "audio", "tabular"])
def test_the_other_samples_clean_inputs_get_no_flag_and_no_corrupted_row(name):
    """No false alarm on real inputs of every kind: 8x8 digits (coarse, mostly black), one-hot DNA (independent
    letters), scenes with empty quadrants (flat and faintly noisy), multispectral bands with a long tail, audio
    spectrograms, a raw table."""
    from sample_models import get_sample

    sample = get_sample(name)
    data = sample.load_data("test")
    labels = data.y if data.y.ndim == 1 else None
    stats = input_stats(data.x, labels=labels)
    assert stats.flags == [] and stats.corrupted.empty, (stats.flags, stats.corrupted)
    if name == "shapes":
        assert stats.per_row["roughness"].max() < 0.5  # far from the noise threshold: the margin the rule relies on


def test_8_bit_pixels_never_divided_by_255_are_flagged_as_such():
    from sample_models import shapes

    x = np.round(shapes.load_data("test").x[:200] * 255.0)
    stats = input_stats(x)
    assert [f["code"] for f in stats.flags] == ["range-0-255"]
    assert "8-bit" in stats.flags[0]["message"]
    assert stats.corrupted.empty  # every row on the same scale: none is out of scale


def test_the_reference_rows_give_the_expected_means_and_a_shifted_source_is_flagged(drift_inputs):
    x, _, planted, split = drift_inputs
    from sample_models import shapes

    clean = shapes.load_data("test").x
    halves = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    assert input_stats(clean, reference=halves).flags == []
    keep = ~np.char.startswith(planted, "corrupted-")  # the shift alone
    stats = input_stats(x[keep], reference=~split[keep])
    moved = {f["channel"] for f in stats.flags if f["code"] == "mean-far"}
    assert moved == {0, 1, 2}  # a near-white background moves every channel's mean
    train_mean = x[keep][~split[keep]].astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(stats.expected["mean"], train_mean, rtol=1e-9)
    assert stats.expected["source"] == "reference rows"


def test_a_nan_row_is_non_finite_and_text_is_refused():
    x = np.random.default_rng(1).random((20, 1, 8, 8))
    x[3, 0, 2, 2] = np.nan
    stats = input_stats(x)
    assert stats.corrupted.to_dict("records") == [{"row": 3, "reason": "non-finite"}]
    with pytest.raises(AnalyzerError, match="text"):
        input_stats(np.array([["a b"], ["c"]], dtype=object))


def test_the_grid_holds_each_classs_rows_seeded(drift_inputs):
    x, y, _, _ = drift_inputs
    names = ["circle", "square", "triangle"]
    a = input_stats(x[:600], labels=y[:600], class_names=names, per_class=5, seed=3)
    b = input_stats(x[:600], labels=y[:600], class_names=names, per_class=5, seed=3)
    assert a.grid == b.grid and set(a.grid) == set(names)
    for index, name in enumerate(names):
        assert len(a.grid[name]) == 5 and all(y[r] == index for r in a.grid[name])
    record = json.loads(json.dumps(a.to_json()))
    assert record["grid"] == a.grid and len(record["channels"]) == 3
