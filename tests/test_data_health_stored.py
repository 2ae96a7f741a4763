"""Robustness curves and the inference profile of a stored run, kept in its health/ folder, and the rules every reader
applies to the data-health files of a run (duplicates, outliers, shift, inputs, the problems list).

The run is the `drift` sample's (2100 rows: 1500 train, 600 test); each test writes into its own copy of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score

from analyzers.data_health import stored
from analyzers.data_health.stored import (DEFAULT_STRENGTHS, PROFILE_FILE, ROBUSTNESS_DIR, curve_rows, run_profile,
                                          run_robustness, stored_profile, stored_robustness)
from analyzers.errors import AnalyzerError, InvalidOption
from analyzers.loading.models import load_model
from analyzers.loading.run_checks import RunDamaged
from analyzers.loading.runs import check_run_files, open_run
from analyzers.loading.splits import SPLIT_COLUMN


@pytest.fixture(scope="module")
def drift(sample_run_dir) -> Path:
    return sample_run_dir("drift")


@pytest.fixture
def run_copy(drift, tmp_path) -> Path:
    """A copy of the drift run to write into (the session's run stays as it was made)."""
    copy = tmp_path / "run"
    shutil.copytree(drift, copy)
    return copy


def _never(*args, **kwargs):
    raise AssertionError("computed again: the kept result was not read back")


# --- robustness ----------------------------------------------------------------------------------------------------

def test_a_curve_runs_on_a_seeded_subset_and_starts_at_the_runs_own_accuracy(run_copy):
    curve, ids = run_robustness(run_copy, perturbation="gaussian_noise", max_samples=200)
    samples = open_run(run_copy).samples
    rows = curve_rows(len(samples), 200, 0)
    assert len(rows) == 200 == len(np.unique(rows)) and np.all(np.diff(rows) > 0) and rows.max() < len(samples)
    np.testing.assert_array_equal(rows, np.sort(np.random.default_rng(0).choice(len(samples), 200, replace=False)))
    assert ids == samples["id"].iloc[rows].tolist()
    assert curve.num_samples == 200 and curve.perturbation == "gaussian_noise" and curve.seed == 0
    np.testing.assert_array_equal(curve.strengths, [0.0, *DEFAULT_STRENGTHS["gaussian_noise"]])
    picked = samples.iloc[rows]
    assert curve.values[0] == pytest.approx(accuracy_score(picked["label"], picked["pred"]), abs=1e-12)
    assert curve.flip_rate[0] == 0
    # each split is a curve of its own, starting at that split's accuracy on the subset
    for name in ("train", "test"):
        index = curve.slice_names.index(f"split: {name}")
        part = picked[picked[SPLIT_COLUMN] == name]
        assert curve.slice_counts[index] == len(part) > 0
        assert curve.slice_values[index, 0] == pytest.approx(accuracy_score(part["label"], part["pred"]), abs=1e-12)
    # and so is each of the run's top error slices, on its members among the rows
    slices = open_run(run_copy).read_parquet("slices.parquet").head(stored.SLICES)
    for row in slices.itertuples():
        name = f"slice: {row.description}"
        members = picked[picked["id"].astype(str).isin([str(i) for i in row.ids])]
        if not len(members):
            assert name not in curve.slice_names
            continue
        index = curve.slice_names.index(name)
        assert curve.slice_counts[index] == len(members)
        assert curve.slice_values[index, 0] == pytest.approx(members["correct"].mean(), abs=1e-12)


def test_every_row_is_used_when_the_run_has_fewer(run_copy):
    assert curve_rows(50, 200, 3).tolist() == list(range(50))
    curve, ids = run_robustness(run_copy, perturbation="brightness", strengths=[1.0], max_samples=5000)
    samples = open_run(run_copy).samples
    assert ids == samples["id"].tolist() and curve.num_samples == len(samples)
    assert curve.values[0] == pytest.approx(samples["correct"].mean(), abs=1e-12)


def test_a_curve_is_kept_and_read_back(run_copy, monkeypatch):
    curve, ids = run_robustness(run_copy, perturbation="gaussian_noise", max_samples=200)
    kept = list((run_copy / ROBUSTNESS_DIR).glob("*.npz"))
    assert len(kept) == 1
    mtime = kept[0].stat().st_mtime_ns
    from analyzers.data_health import robustness
    from analyzers.engines import pipeline

    monkeypatch.setattr(robustness, "robustness_curve", _never)
    monkeypatch.setattr(pipeline, "load_run_inputs", _never)
    again, again_ids = run_robustness(run_copy, perturbation="gaussian_noise", max_samples=200)
    assert kept[0].stat().st_mtime_ns == mtime and again_ids == ids
    for name in ("strengths", "values", "flip_rate", "class_values", "slice_values", "first_flip"):
        np.testing.assert_array_equal(getattr(again, name), getattr(curve, name))
    assert again.slice_names == curve.slice_names
    listed = stored_robustness(run_copy)
    assert len(listed) == 1
    key, listed_curve, listed_ids = listed[0]
    assert key["perturbation"] == "gaussian_noise" and key["max_samples"] == 200
    assert key["strengths"] == list(DEFAULT_STRENGTHS["gaussian_noise"])
    assert listed_ids == ids
    np.testing.assert_array_equal(listed_curve.values, curve.values)
    monkeypatch.undo()
    # other strengths are another curve, kept beside the first; the newest is listed first
    other, _ = run_robustness(run_copy, perturbation="gaussian_noise", strengths=[0.5], max_samples=200)
    assert len(list((run_copy / ROBUSTNESS_DIR).glob("*.npz"))) == 2
    listed = stored_robustness(run_copy)
    assert [entry[0]["strengths"] for entry in listed] == [[0.5], list(DEFAULT_STRENGTHS["gaussian_noise"])]
    np.testing.assert_array_equal(other.strengths, [0.0, 0.5])
    assert other.values[0] == curve.values[0]


def test_an_unknown_perturbation_or_a_bad_sample_count_is_refused(run_copy):
    with pytest.raises(InvalidOption, match="unknown perturbation 'rain'"):
        run_robustness(run_copy, perturbation="rain")
    with pytest.raises(AnalyzerError, match="max_samples"):
        run_robustness(run_copy, perturbation="blur", max_samples=0)
    assert not (run_copy / ROBUSTNESS_DIR).exists()


# --- the model handed in is left as it was ------------------------------------------------------------------------

def test_the_model_handed_in_is_left_untouched(run_copy, monkeypatch):
    from analyzers.engines import pipeline

    model, dataset = pipeline.load_run_inputs(open_run(run_copy))
    module = model.module
    module.train()
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    modes = {name: m.training for name, m in module.named_modules()}
    grads = {name: p.requires_grad for name, p in module.named_parameters()}
    assert all(modes.values())
    monkeypatch.setattr(pipeline, "load_run_inputs", _never)  # the model and data handed in are the ones used
    curve, _ = run_robustness(run_copy, perturbation="gaussian_noise", max_samples=100, model=model, dataset=dataset)
    profile = run_profile(run_copy, batch_sizes=(1, 4), repeats=2, model=model, dataset=dataset)
    assert curve.num_samples == 100 and profile.batch_sizes.tolist() == [1, 4]
    after = module.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], weights[k]) for k in weights)
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert {name: p.requires_grad for name, p in module.named_parameters()} == grads
    assert all(p.grad is None for p in module.parameters())


# --- the inference profile -----------------------------------------------------------------------------------------

def test_the_profile_is_consistent_and_kept(run_copy, monkeypatch):
    assert stored_profile(run_copy) is None
    profile = run_profile(run_copy, batch_sizes=(8, 1), repeats=3)
    module = load_model("sample:drift").module
    assert profile.batch_sizes.tolist() == [1, 8] and profile.repeats == 3 and profile.device == "cpu"
    np.testing.assert_allclose(profile.throughput, profile.batch_sizes / profile.latency_p50, rtol=1e-9)
    assert np.all(profile.latency_p50 > 0) and np.all(profile.latency_p50 <= profile.latency_p95)
    assert profile.profiled_time > 0
    np.testing.assert_allclose(profile.share, profile.time / profile.profiled_time, rtol=1e-9)
    assert profile.num_params == sum(p.numel() for p in module.parameters())
    assert profile.param_bytes == sum(p.numel() * p.element_size() for p in module.parameters())
    assert profile.model_bytes == profile.param_bytes + profile.buffer_bytes
    assert list(profile.layers) == [name for name, _ in module.named_modules() if name]
    assert profile.params.sum() == profile.num_params  # each layer's own parameters, the container holding none
    layer = dict(zip(profile.layers, profile.params))
    assert layer["fc"] == module.fc.weight.numel() + module.fc.bias.numel() and layer["relu1"] == 0
    # kept in the run, and read back without profiling again
    assert (run_copy / PROFILE_FILE).is_file()
    kept = stored_profile(run_copy)
    for name in ("batch_sizes", "latency_p50", "throughput", "time", "share", "params"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(profile, name))
    assert kept.layers == profile.layers and kept.num_params == profile.num_params
    from analyzers.data_health import profile as profile_module
    from analyzers.engines import pipeline

    monkeypatch.setattr(profile_module, "inference_profile", _never)
    monkeypatch.setattr(pipeline, "load_run_inputs", _never)
    np.testing.assert_array_equal(run_profile(run_copy, batch_sizes=(1, 8), repeats=3).latency_p50,
                                  profile.latency_p50)
    monkeypatch.undo()
    # other options replace the one kept
    run_profile(run_copy, batch_sizes=(2,), repeats=2)
    assert stored_profile(run_copy).batch_sizes.tolist() == [2]


def test_kept_results_are_for_the_model_and_data_as_they_are(run_copy):
    run_robustness(run_copy, perturbation="gaussian_noise", strengths=[0.5], max_samples=50)
    run_profile(run_copy, batch_sizes=(1,), repeats=2)
    assert len(stored_robustness(run_copy)) == 1 and stored_profile(run_copy) is not None
    info = json.loads((run_copy / "run.json").read_text())
    info["dataset"]["sha256"] = "0" * 64  # another dataset of the same shape
    (run_copy / "run.json").write_text(json.dumps(info))
    assert stored_robustness(run_copy) == [] and stored_profile(run_copy) is None


def _kept_file(run_copy: Path, which: str) -> tuple[Path, object]:
    if which == "profile":
        run_profile(run_copy, batch_sizes=(1,), repeats=2)
        return run_copy / PROFILE_FILE, stored_profile
    run_robustness(run_copy, perturbation="gaussian_noise", strengths=[0.5], max_samples=50)
    return next((run_copy / ROBUSTNESS_DIR).glob("*.npz")), stored_robustness


@pytest.mark.parametrize("which", ["profile", "robustness"])
@pytest.mark.parametrize("damage", ["not an array file", "no key", "truncated", "zip header then garbage"])
def test_a_damaged_kept_result_is_one_line_naming_it(run_copy, which, damage):
    path, read = _kept_file(run_copy, which)
    if damage == "not an array file":
        path.write_bytes(b"not an npz")
    elif damage == "no key":
        np.savez(path, values=np.zeros(3))
    elif damage == "truncated":
        _truncate(path)
    else:
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(AnalyzerError) as info:
        read(run_copy)
    message = str(info.value)
    assert message.startswith(f"{path.name} in the run's {path.parent.name} folder cannot be read") and \
        "delete it and compute it again" in message and "\n" not in message, message


# --- the run-file rules of the data-health files -------------------------------------------------------------------

def _rewrite_parquet(path: Path, change) -> None:
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _set(key, value):
    def change(obj):
        obj[key] = value
    return change


def _set_in_first(key, field, value=None, drop=False):
    def change(obj):
        assert obj[key], f"the drift run's {key} is empty: nothing to damage"
        if drop:
            del obj[key][0][field]
        else:
            obj[key][0][field] = value
    return change


def _drop(key):
    def change(obj):
        del obj[key]
    return change


# name -> (damage, the file the one line must name)
DAMAGE = {
    "duplicates without kind": (lambda p: _rewrite_parquet(p / "duplicates.parquet",
                                                           lambda t: t.drop(columns=["kind"])), "duplicates.parquet"),
    "duplicate distances as text": (lambda p: _rewrite_parquet(p / "duplicates.parquet",
                                                               lambda t: t.assign(distance=t["distance"].astype(str))),
                                    "duplicates.parquet"),
    "truncated duplicates": (lambda p: _truncate(p / "duplicates.parquet"), "duplicates.parquet"),
    "outliers of fewer rows": (lambda p: _rewrite_parquet(p / "outliers.parquet", lambda t: t.iloc[:-3]),
                               "outliers.parquet"),
    "outliers without score": (lambda p: _rewrite_parquet(p / "outliers.parquet", lambda t: t.drop(columns=["score"])),
                               "outliers.parquet"),
    "truncated outliers": (lambda p: _truncate(p / "outliers.parquet"), "outliers.parquet"),
    "shift without train": (lambda p: _edit_json(p / "shift.json", _drop("train")), "shift.json"),
    "shift pairs not a list": (lambda p: _edit_json(p / "shift.json", _set("pairs", {"a": "train"})), "shift.json"),
    "shift pair without domain_auc": (lambda p: _edit_json(p / "shift.json",
                                                           _set_in_first("pairs", "domain_auc", drop=True)),
                                      "shift.json"),
    "shift pair with a text mmd": (lambda p: _edit_json(p / "shift.json", _set_in_first("pairs", "mmd", "big")),
                                   "shift.json"),
    "outliers summary without method": (lambda p: _edit_json(p / "outliers.json", _drop("method")), "outliers.json"),
    "outlier region of text size": (lambda p: _edit_json(p / "outliers.json", _set_in_first("regions", "size", "9")),
                                    "outliers.json"),
    "outlier region ids not a list": (lambda p: _edit_json(p / "outliers.json",
                                                           _set_in_first("regions", "ids", "1 2 3")), "outliers.json"),
    "inputs without grid_ids": (lambda p: _edit_json(p / "inputs.json", _drop("grid_ids")), "inputs.json"),
    "input flag without code": (lambda p: _edit_json(p / "inputs.json", _set_in_first("flags", "code", drop=True)),
                                "inputs.json"),
    "corrupted ids not objects": (lambda p: _edit_json(p / "inputs.json", _set("corrupted_ids", ["1", "2"])),
                                  "inputs.json"),
    "problems missing": (lambda p: _edit_json(p / "data_health.json", _drop("problems")), "data_health.json"),
    "problem ids not a list": (lambda p: _edit_json(p / "data_health.json", _set_in_first("problems", "ids", "1,2")),
                               "data_health.json"),
    "problem without a page": (lambda p: _edit_json(p / "data_health.json",
                                                    _set_in_first("problems", "page", drop=True)), "data_health.json"),
    "garbage data_health.json": (lambda p: (p / "data_health.json").write_text("[1, 2, "), "data_health.json"),
    "data_health.json a list": (lambda p: (p / "data_health.json").write_text("[]"), "data_health.json"),
}


def test_the_intact_run_passes_every_data_health_rule(drift):
    run = open_run(drift)
    for name in ("shift.json", "outliers.json", "inputs.json", "data_health.json"):
        assert isinstance(run.read_json(name), dict)
    assert len(run.read_parquet("outliers.parquet")) == run.num_samples
    assert len(run.read_parquet("duplicates.parquet")) > 0
    check_run_files(drift, num_samples=run.num_samples, num_classes=len(run.class_names))


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_damaged_data_health_file_is_refused_naming_it(kind, drift, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(drift, run)
    damage, relpath = DAMAGE[kind]
    damage(run)
    with pytest.raises(RunDamaged) as info:
        open_run(run)
    message = str(info.value)
    assert message.startswith(f"{relpath} in the run at") and "\n" not in message, message
    assert "--overwrite" in message and info.value.relpath == relpath
    # the same rules refuse what a sandboxed worker wrote, before the run is stored
    with pytest.raises(AnalyzerError, match=rf"damaged {relpath.replace('.', '[.]')} .*nothing was stored"):
        check_run_files(run, num_samples=2100, num_classes=3)


# what the rules allow: a measure that could not be computed is null, ids of any type, an optional part absent
ALLOWED = {
    "shift pair without a domain AUC": (lambda p: _edit_json(p / "shift.json", _set_in_first("pairs", "domain_auc"))),
    "region without an error rate": (lambda p: _edit_json(p / "outliers.json", _set_in_first("regions", "error_rate"))),
    "problem ids as text": (lambda p: _edit_json(p / "data_health.json", _set_in_first("problems", "ids", ["a", "b"]))),
    "no skipped parts": (lambda p: _edit_json(p / "data_health.json", _drop("skipped"))),
    "no flags": (lambda p: _edit_json(p / "inputs.json", _set("flags", []))),
    "no duplicates": (lambda p: _rewrite_parquet(p / "duplicates.parquet", lambda t: t.iloc[:0])),
}


@pytest.mark.parametrize("kind", ALLOWED)
def test_what_the_data_health_rules_allow_still_opens(kind, drift, tmp_path):
    run = tmp_path / "edited"
    shutil.copytree(drift, run)
    ALLOWED[kind](run)
    open_run(run)
