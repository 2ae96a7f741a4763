"""Runs over several splits: `--data train=A --data test=B`, or one file whose column names each row's split.

Every check is against something computed here: the digits sample's own train and test splits written to .npz
files (with a few labels flipped, so no split is trivially perfect), predicted by the sample's network directly, and
scored with scikit-learn on the rows of each split."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score

from analyzers.engines.pipeline import load_run_inputs, run_analysis
from analyzers.errors import AnalyzerError
from analyzers.loading.datasets import load_dataset
from analyzers.loading.models import load_model
from analyzers.loading.runs import open_run
from analyzers.loading.splits import SPLIT_COLUMN, parse_data_args, train_and_eval

ROOT = Path(__file__).resolve().parents[1]
FLIPPED = {"train": 12, "test": 9}  # labels planted wrong in each split: (y + 1) % 10 on these many rows
EVAL = ["evaluation"]


def _split(name: str) -> dict:
    from sample_models import get_sample

    data = get_sample("digits").load_data(name)
    y = np.asarray(data.y, dtype=np.int64).copy()
    rows = np.random.default_rng({"train": 1, "test": 2}[name]).choice(len(y), FLIPPED[name], replace=False)
    y[rows] = (y[rows] + 1) % 10
    return {"x": np.asarray(data.x, dtype=np.float32), "y": y, "ids": np.asarray(data.ids, dtype=np.int64),
            "ink": np.asarray(data.metadata["ink"], dtype=np.float64)}


def _predict(x: np.ndarray) -> np.ndarray:
    """The digits network's probabilities, computed here without the pipeline."""
    module = load_model("sample:digits").module.eval()
    with torch.no_grad():
        return torch.softmax(module(torch.as_tensor(x)), dim=1).numpy()


@pytest.fixture(scope="module")
def parts():
    return {"train": _split("train"), "test": _split("test")}


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("split-files")
    paths = {}
    for name, arrays in parts.items():
        paths[name] = str(root / f"{name}.npz")
        np.savez(paths[name], **arrays)
    return paths


@pytest.fixture(scope="module")
def split_run(files, tmp_path_factory) -> Path:
    return run_analysis("sample:digits", {"train": files["train"], "test": files["test"]},
                        tmp_path_factory.mktemp("split-run") / "run", analyses=EVAL)


# --- parse_data_args -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["sample:digits", "data/train.npz", "a=b.npz"])
def test_one_data_value_is_a_plain_spec(value):
    assert parse_data_args([value]) == value
    assert parse_data_args(value) == value


def test_several_data_values_are_named_splits_in_order():
    assert list(parse_data_args(["test=b.npz", "train=a.npz", "val=c=d.csv"]).items()) == \
        [("test", "b.npz"), ("train", "a.npz"), ("val", "c=d.csv")]


@pytest.mark.parametrize("values", [["a.npz", "b.npz"], ["train=a.npz", "b.npz"], ["train=a.npz", "test="]])
def test_several_data_values_must_each_name_their_split(values):
    with pytest.raises(AnalyzerError, match=r"NAME=FILE.*--data train=train\.npz --data test=test\.npz"):
        parse_data_args(values)


def test_a_split_given_twice_is_refused():
    with pytest.raises(AnalyzerError, match="'train' is given twice"):
        parse_data_args(["train=a.npz", "test=b.npz", "train=c.npz"])


@pytest.mark.parametrize("name", ["1st", "my split", "../x", "_train", "a" * 33, "tr/ain"])
def test_a_split_name_that_is_not_plain_is_refused(name):
    with pytest.raises(AnalyzerError, match="is not a plain name"):
        parse_data_args([f"{name}=a.npz", "test=b.npz"])


def test_nine_splits_are_too_many():
    with pytest.raises(AnalyzerError, match="2 to 8"):
        parse_data_args([f"s{i}=f{i}.npz" for i in range(9)])


def test_the_training_and_evaluation_splits_are_chosen_by_name_then_by_place():
    assert train_and_eval(["test", "train"]) == ("train", "test")
    assert train_and_eval(["a", "val", "b"]) == ("a", "val")
    assert train_and_eval(["a", "b", "c"]) == ("a", "c")
    assert train_and_eval(["Training", "extra", "Holdout"]) == ("Training", "Holdout")
    assert train_and_eval(["holdout", "fit"]) == ("fit", "holdout")  # an evaluation name is never the training side
    assert train_and_eval(["test", "val"]) == ("test", "val")  # unless every name is one
    assert train_and_eval(["only"]) == (None, None)


# --- combining split files -----------------------------------------------------------------------------------------

def test_split_files_are_concatenated_with_their_split_named(files, parts):
    dataset = load_dataset({"train": files["train"], "test": files["test"]})
    np.testing.assert_array_equal(dataset.x, np.concatenate([parts["train"]["x"], parts["test"]["x"]]))
    np.testing.assert_array_equal(dataset.y, np.concatenate([parts["train"]["y"], parts["test"]["y"]]))
    np.testing.assert_array_equal(dataset.ids, np.concatenate([parts["train"]["ids"], parts["test"]["ids"]]))
    n_train = len(parts["train"]["y"])
    assert dataset.metadata[SPLIT_COLUMN].tolist() == ["train"] * n_train + ["test"] * len(parts["test"]["y"])
    assert [(s["name"], s["spec"], s["num_samples"]) for s in dataset.split_sources] == \
        [("train", files["train"], n_train), ("test", files["test"], len(parts["test"]["y"]))]


def _tiny_npz(path: Path, n: int, seed: int, **columns) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, 1, 8, 8), dtype=np.float32), y=np.arange(n) % 3, **columns)
    return str(path)


def test_ids_repeated_across_splits_are_named_by_their_split(tmp_path):
    a = _tiny_npz(tmp_path / "a.npz", 5, 0, ids=np.arange(5))
    b = _tiny_npz(tmp_path / "b.npz", 4, 1, ids=np.arange(4))
    dataset = load_dataset({"fit": a, "check": b})
    assert dataset.ids.tolist() == [f"fit/{i}" for i in range(5)] + [f"check/{i}" for i in range(4)]
    assert dataset.metadata[SPLIT_COLUMN].tolist() == ["fit"] * 5 + ["check"] * 4


def test_metadata_columns_are_the_union_of_the_splits(tmp_path):
    a = _tiny_npz(tmp_path / "a.npz", 5, 0, site=np.array(["x"] * 5))
    b = _tiny_npz(tmp_path / "b.npz", 4, 1, scanner=np.array(["s1", "s2", "s1", "s2"]))
    meta = load_dataset({"fit": a, "check": b}).metadata
    assert meta["site"].iloc[:5].tolist() == ["x"] * 5 and meta["site"].iloc[5:].isna().all()
    assert meta["scanner"].iloc[:5].isna().all() and meta["scanner"].iloc[5:].tolist() == ["s1", "s2", "s1", "s2"]
    assert meta[SPLIT_COLUMN].tolist() == ["fit"] * 5 + ["check"] * 4


@pytest.mark.parametrize("with_column", ["first", "second"])
def test_a_metadata_column_only_one_split_has_is_missing_in_the_others_rows(tmp_path, with_column):
    site = {"site": np.array(["x"] * 5)}
    a = _tiny_npz(tmp_path / "a.npz", 5, 0, **(site if with_column == "first" else {}))
    b = _tiny_npz(tmp_path / "b.npz", 5, 1, **(site if with_column == "second" else {}))
    meta = load_dataset({"fit": a, "check": b}).metadata
    assert len(meta) == 10 and meta[SPLIT_COLUMN].tolist() == ["fit"] * 5 + ["check"] * 5
    filled = slice(0, 5) if with_column == "first" else slice(5, 10)
    assert meta["site"].iloc[filled].tolist() == ["x"] * 5 and meta["site"].isna().sum() == 5


def test_splits_of_different_kinds_of_data_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.random((5, 1, 8, 8), dtype=np.float32), y=np.arange(5) % 3)
    np.savez(tmp_path / "b.npz", x=rng.random((5, 1, 4, 4), dtype=np.float32), y=np.arange(5) % 3)
    with pytest.raises(AnalyzerError, match="split 'test' differs from split 'train' in its sample shape"):
        load_dataset({"train": str(tmp_path / "a.npz"), "test": str(tmp_path / "b.npz")})


def test_a_split_file_with_its_own_split_column_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", x=rng.random((4, 1, 8, 8), dtype=np.float32), y=np.arange(4) % 3,
                 **({"split": np.array(["x", "y", "x", "y"])} if name == "b" else {}))
    with pytest.raises(AnalyzerError, match="split 'test' already has a 'split' column"):
        load_dataset({"train": str(tmp_path / "a.npz"), "test": str(tmp_path / "b.npz")})


# --- a run over two files ------------------------------------------------------------------------------------------

def test_the_samples_carry_each_rows_split_in_order(split_run, parts):
    samples = open_run(split_run).samples
    n_train, n_test = len(parts["train"]["y"]), len(parts["test"]["y"])
    assert samples[SPLIT_COLUMN].tolist() == ["train"] * n_train + ["test"] * n_test
    np.testing.assert_array_equal(samples["id"], np.concatenate([parts["train"]["ids"], parts["test"]["ids"]]))
    np.testing.assert_array_equal(samples["label"], np.concatenate([parts["train"]["y"], parts["test"]["y"]]))
    probs = _predict(np.concatenate([parts["train"]["x"], parts["test"]["x"]]))
    np.testing.assert_array_equal(samples["pred"], probs.argmax(1))
    np.testing.assert_allclose(open_run(split_run).probs, probs, rtol=1e-5, atol=1e-6)


def test_metrics_per_split_are_each_splits_own(split_run, parts, files, tmp_path):
    run = open_run(split_run)
    samples, metrics = run.samples, run.read_json("metrics.json")
    assert list(metrics["splits"]) == ["train", "test"]
    for name, arrays in parts.items():
        rows = samples[samples[SPLIT_COLUMN] == name]
        by_hand = accuracy_score(rows["label"], rows["pred"])
        independent = accuracy_score(arrays["y"], _predict(arrays["x"]).argmax(1))
        entry = metrics["splits"][name]
        assert entry["accuracy"] == pytest.approx(by_hand, abs=1e-12) == pytest.approx(independent, abs=1e-12)
        assert entry["num_samples"] == len(arrays["y"])
        assert entry["error_rate"] == pytest.approx(1 - by_hand, abs=1e-12)
        assert entry["mean_loss"] == pytest.approx(rows["loss"].to_numpy(np.float64).mean(), rel=1e-9)
        alone = open_run(run_analysis("sample:digits", files[name], tmp_path / f"alone-{name}", analyses=EVAL))
        assert entry["accuracy"] == pytest.approx(alone.read_json("metrics.json")["accuracy"], abs=1e-12)
        assert entry["log_loss"] == pytest.approx(alone.read_json("metrics.json")["log_loss"], rel=1e-6)
    # the run's headline is over every row
    assert metrics["accuracy"] == pytest.approx(accuracy_score(samples["label"], samples["pred"]), abs=1e-12)
    assert metrics["splits"]["train"]["accuracy"] != metrics["splits"]["test"]["accuracy"]


def test_the_split_gap_is_the_evaluation_split_less_the_training_split(split_run):
    run = open_run(split_run)
    metrics = run.read_json("metrics.json")
    gap = metrics["split_gap"]
    assert (gap["train"], gap["eval"]) == ("train", "test")
    assert {"accuracy", "error_rate", "mean_loss"} <= set(gap["metrics"])
    for key, entry in gap["metrics"].items():
        train, test = metrics["splits"]["train"][key], metrics["splits"]["test"][key]
        assert (entry["train"], entry["eval"]) == (pytest.approx(train), pytest.approx(test))
        assert entry["gap"] == pytest.approx(test - train, abs=1e-12)
    assert run.info["analyses"]["evaluation"]["split_gap"] == gap


def test_run_json_describes_each_split_file(split_run, files, parts):
    info = open_run(split_run).info
    assert info["dataset"]["spec"] == f"train={files['train']}, test={files['test']}"
    assert info["dataset"]["name"] == "train=train.npz, test=test.npz"
    assert [(s["name"], s["spec"], s["num_samples"]) for s in info["dataset"]["split_sources"]] == \
        [(name, files[name], len(parts[name]["y"])) for name in ("train", "test")]
    assert info["num_samples"] == sum(len(p["y"]) for p in parts.values())


def test_a_split_column_cannot_be_given_with_split_files(files, tmp_path):
    with pytest.raises(AnalyzerError, match="--split-column reads the splits of one file"):
        run_analysis("sample:digits", dict(files), tmp_path / "run", analyses=EVAL, split_column="part")
    assert not (tmp_path / "run").exists()


# --- the command line ----------------------------------------------------------------------------------------------

def _cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analyzers", "run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _flat(value, prefix: str = "") -> dict:
    """A nested JSON value as {path: leaf}, for a tolerant comparison of its numbers."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def test_the_command_line_makes_the_same_run(split_run, files, tmp_path):
    out = tmp_path / "cli-run"
    done = _cli("--model", "sample:digits", "--data", f"train={files['train']}", "--data", f"test={files['test']}",
                "--out", str(out), "--analyses", "evaluation", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"run stored at {out}" in done.stdout
    here, there = open_run(split_run), open_run(out)
    pd.testing.assert_frame_equal(there.samples, here.samples)
    # the same metrics, to the last bits a float sum may differ in between two processes' thread pools
    mine, theirs = here.read_json("metrics.json")["splits"], there.read_json("metrics.json")["splits"]
    assert _flat(theirs) == pytest.approx(_flat(mine), rel=1e-9, abs=1e-12)
    assert there.info["dataset"]["split_sources"] == here.info["dataset"]["split_sources"]


def test_the_command_line_says_how_to_name_several_data_values(files, tmp_path):
    done = _cli("--model", "sample:digits", "--data", files["train"], "--data", files["test"],
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "NAME=FILE" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --- one file whose column names the splits ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_file(parts, tmp_path_factory):
    """Both splits in one .npz, rows shuffled, with the split in a column `part`; and its order of rows."""
    order = np.random.default_rng(5).permutation(sum(len(p["y"]) for p in parts.values()))
    joined = {key: np.concatenate([parts["train"][key], parts["test"][key]])[order] for key in ("x", "y", "ids")}
    part = np.asarray(["train"] * len(parts["train"]["y"]) + ["test"] * len(parts["test"]["y"]))[order]
    root = tmp_path_factory.mktemp("one-file")
    np.savez(root / "part.npz", **joined, part=part)
    np.savez(root / "split.npz", **joined, split=part)
    return root, joined, part


def test_a_split_column_names_each_rows_split(one_file, tmp_path):
    root, joined, part = one_file
    out = run_analysis("sample:digits", str(root / "part.npz"), tmp_path / "run", analyses=EVAL,
                       split_column="part")
    run = open_run(out)
    samples = run.samples
    assert samples[SPLIT_COLUMN].tolist() == part.tolist() and "part" not in samples.columns
    np.testing.assert_array_equal(samples["id"], joined["ids"])
    metrics = run.read_json("metrics.json")
    first = part[0]
    assert list(metrics["splits"]) == [first, "test" if first == "train" else "train"]  # order of first rows
    for name in ("train", "test"):
        rows = part == name
        assert metrics["splits"][name]["accuracy"] == pytest.approx(
            accuracy_score(joined["y"][rows], _predict(joined["x"][rows]).argmax(1)), abs=1e-12)
    assert (metrics["split_gap"]["train"], metrics["split_gap"]["eval"]) == ("train", "test")
    assert run.info["parameters"]["split_column"] == "part"
    # reloaded, the dataset is read with the same column
    model, dataset = load_run_inputs(run)
    assert dataset.metadata[SPLIT_COLUMN].tolist() == part.tolist()
    np.testing.assert_array_equal(dataset.x, joined["x"])


def test_a_column_called_split_is_read_unasked(one_file):
    root, joined, part = one_file
    dataset = load_dataset(str(root / "split.npz"))
    assert dataset.metadata[SPLIT_COLUMN].tolist() == part.tolist()
    assert list(dataset.metadata.columns) == [SPLIT_COLUMN]
    # a file whose split column has another name is one dataset until asked
    plain = load_dataset(str(root / "part.npz"))
    assert SPLIT_COLUMN not in plain.metadata.columns and plain.metadata["part"].tolist() == part.tolist()


def test_a_csv_column_called_split_makes_a_run_over_splits(tmp_path):
    from sample_models import get_sample

    sample = get_sample("tabular")
    frames = []
    for name in ("train", "test"):
        data = sample.load_data(name)
        frames.append(pd.DataFrame(data.x, columns=list(data.feature_names)).assign(label=data.y, key=data.ids,
                                                                                    split=name))
    table = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=3).reset_index(drop=True)
    table.to_csv(tmp_path / "table.csv", index=False)
    run = open_run(run_analysis("sample:tabular", str(tmp_path / "table.csv"), tmp_path / "run", analyses=EVAL,
                                id_column="key"))
    assert run.samples[SPLIT_COLUMN].tolist() == table["split"].tolist()
    np.testing.assert_array_equal(run.samples["id"], table["key"])
    metrics = run.read_json("metrics.json")
    for name in ("train", "test"):
        rows = run.samples[run.samples[SPLIT_COLUMN] == name]
        assert metrics["splits"][name]["num_samples"] == int((table["split"] == name).sum())
        assert metrics["splits"][name]["accuracy"] == pytest.approx(accuracy_score(rows["label"], rows["pred"]))


def test_an_unknown_split_column_is_named(one_file, tmp_path):
    root, _, _ = one_file
    with pytest.raises(AnalyzerError, match=r"no column 'fold' to read splits from .*part"):
        load_dataset(str(root / "part.npz"), split_column="fold")
    with pytest.raises(AnalyzerError, match="no column 'fold'"):
        run_analysis("sample:digits", str(root / "part.npz"), tmp_path / "run", analyses=EVAL, split_column="fold")
    assert not (tmp_path / "run").exists()


def test_a_split_column_with_a_bad_name_or_a_gap_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 1, 8, 8), dtype=np.float32), np.arange(4) % 3
    np.savez(tmp_path / "bad.npz", x=x, y=y, split=np.array(["train", "2nd", "train", "2nd"]))
    with pytest.raises(AnalyzerError, match="'2nd' is not a plain name"):
        load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "gap.npz", x=x, y=y, fold=np.array([1.0, np.nan, 2.0, 1.0]))
    with pytest.raises(AnalyzerError, match="leaves 1 rows without a split"):
        load_dataset(str(tmp_path / "gap.npz"), split_column="fold")


# --- reloading a run over split files ------------------------------------------------------------------------------

def test_a_run_over_split_files_reloads_its_inputs(split_run, parts):
    run = open_run(split_run)
    model, dataset = load_run_inputs(run)
    np.testing.assert_array_equal(dataset.ids, run.samples["id"].to_numpy())
    np.testing.assert_array_equal(dataset.x, np.concatenate([parts["train"]["x"], parts["test"]["x"]]))
    np.testing.assert_array_equal(dataset.y, run.samples["label"].to_numpy())
    assert dataset.metadata[SPLIT_COLUMN].tolist() == run.samples[SPLIT_COLUMN].tolist()
    assert dataset.sha256 == run.info["dataset"]["sha256"]


def test_a_split_file_changed_since_the_run_is_refused_on_reload(parts, tmp_path):
    paths = {}
    for name in ("train", "test"):
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], **{k: v[:40] for k, v in parts[name].items()})
    run = open_run(run_analysis("sample:digits", paths, tmp_path / "run", analyses=EVAL))
    arrays = {k: v[:40].copy() for k, v in parts["test"].items()}
    arrays["x"][0] = 1.0 - arrays["x"][0]
    np.savez(paths["test"], **arrays)
    with pytest.raises(AnalyzerError, match="changed since the run was made"):
        load_run_inputs(run)


# --- an untrusted model: the run is made in the sandboxed worker ---------------------------------------------------

def test_a_split_run_of_an_exported_model_in_the_worker_gets_its_split_column(split_run, files, parts, tmp_path):
    from analyzers.loading.sandbox import SandboxedModel, sandbox_support

    support = sandbox_support()
    if support.level != "full" and os.environ.get("CI") != "true":
        pytest.skip(f"the full sandbox is not available here: {support.reason}")
    from conftest import export_model

    module = load_model("sample:digits").module.eval()
    model_path = export_model(module, torch.zeros(2, 1, 8, 8), tmp_path / "digits.pt2")
    shutil.copy(files["train"], tmp_path / "train.npz")
    shutil.copy(files["test"], tmp_path / "test.npz")
    out = run_analysis(str(model_path), {"train": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npz")},
                       tmp_path / "run", analyses=EVAL)
    run, here = open_run(out), open_run(split_run)
    assert run.info["sandbox"]["level"] == "full"
    assert run.samples[SPLIT_COLUMN].tolist() == here.samples[SPLIT_COLUMN].tolist()
    np.testing.assert_array_equal(run.samples["id"], here.samples["id"])
    np.testing.assert_array_equal(run.samples["pred"], here.samples["pred"])
    assert [s["num_samples"] for s in run.info["dataset"]["split_sources"]] == [len(parts["train"]["y"]),
                                                                               len(parts["test"]["y"])]
    splits, expected = run.read_json("metrics.json")["splits"], here.read_json("metrics.json")["splits"]
    assert {k: v["accuracy"] for k, v in splits.items()} == {k: v["accuracy"] for k, v in expected.items()}
    model, dataset = load_run_inputs(run)  # the worker decodes each split file again
    try:
        assert isinstance(model, SandboxedModel)
        np.testing.assert_array_equal(dataset.ids, run.samples["id"].to_numpy())
        np.testing.assert_array_equal(dataset.x, np.concatenate([parts["train"]["x"], parts["test"]["x"]]))
        assert dataset.metadata[SPLIT_COLUMN].tolist() == run.samples[SPLIT_COLUMN].tolist()
    finally:
        model.close()
