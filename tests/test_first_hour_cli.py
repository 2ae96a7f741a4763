"""Issue 17's first-hour rough edges: a CLI run that prints no library warnings, an import-path architecture whose
input shape comes from the dataset, and SHAP that draws its background from the inputs when none is given."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError, explain
from analyzers.engines.inference import predict
from analyzers.loading.models import load_model, wrap_module
from conftest import TinyCNN, export_model

ROOT = Path(__file__).resolve().parents[1]
# a Python warning as the warnings module prints it ("...py:105: FutureWarning: ..."); the CLI's own notes are
# lower-case "warning: ..." lines
LIBRARY_WARNING = re.compile(r"\b[A-Z]\w*Warning\b:")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m analyzers ARGS` as a person runs it: the default warning filters, nothing from pytest's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return subprocess.run([sys.executable, "-m", "analyzers", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _library_warnings(stderr: str) -> list:
    return [line for line in stderr.splitlines() if LIBRARY_WARNING.search(line)]


# --- 1. no library noise -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One CLI run of each kind, made once: {name: (completed process, run directory)}."""
    root = tmp_path_factory.mktemp("first-hour")
    torch.manual_seed(0)
    model_path = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), root / "tiny.pt2")
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 40))
    runs = {}
    for name, model, data, extra in (
            ("digits", "sample:digits", "sample:digits", ()),
            ("pt2_sandboxed", str(model_path), str(root / "images.npz"), ()),
            ("pt2_in_process", str(model_path), str(root / "images.npz"), ("--isolation", "process"))):
        out = root / name
        runs[name] = (_cli("run", "--model", model, "--data", data, "--out", str(out), *extra), out)
    return runs


@pytest.mark.parametrize("name", ["digits", "pt2_sandboxed", "pt2_in_process"])
def test_a_cli_run_prints_no_library_warnings(cli_runs, name):
    done, out = cli_runs[name]
    assert done.returncode == 0, done.stderr
    assert "run stored at" in done.stdout and (out / "run.json").is_file()
    assert _library_warnings(done.stderr) == [], done.stderr


@pytest.mark.parametrize("name", ["digits", "pt2_sandboxed"])
def test_explain_prints_no_library_warnings(cli_runs, name):
    _, out = cli_runs[name]
    ids = pd.read_parquet(out / "samples.parquet")["id"].astype(str).tolist()[:2]
    done = _cli("explain", str(out), "--ids", ",".join(ids), "--method", "saliency,shap")
    assert done.returncode == 0, done.stderr
    assert "shap" in done.stdout
    assert _library_warnings(done.stderr) == [], done.stderr


def test_the_sandboxed_workers_log_holds_no_library_warnings(cli_runs, tmp_path):
    """A worker's stderr is its log, which the operator is shown when it fails: torch's deprecation notes about
    itself must not fill it."""
    model = load_model(str(cli_runs["pt2_sandboxed"][1].parent / "tiny.pt2"))
    try:
        predict(model, np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))
        log = model.worker._log.read_text(errors="replace")
    finally:
        model.close()
    assert _library_warnings(log) == [], log


def test_read_only_labels_predict_without_a_numpy_warning():
    model = wrap_module(TinyCNN().eval(), (1, 8, 8))
    x = np.zeros((5, 1, 8, 8), np.float32)
    y = np.array([0, 1, 2, 0, 1], dtype=np.int64)
    y.setflags(write=False)  # as a reloaded or received dataset's labels are
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loss = predict(model, x, y).loss
    assert np.isfinite(loss).all() and y.tolist() == [0, 1, 2, 0, 1]


# --- 2. the input shape from the dataset ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state_dict_and_images(tmp_path_factory):
    """An import-path architecture's weights (architectures:SharedReluCNN, which runs on 1x12x12 images only) and a
    dataset of such images."""
    from safetensors.torch import save_file

    from architectures import build

    root = tmp_path_factory.mktemp("input-shape")
    model = build("shared_relu")
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 1, 12, 12)).astype(np.float32)
    np.savez(root / "images.npz", x=x, y=rng.integers(0, 3, len(x)))
    return model, root, x


def _run_args(root: Path, out: Path, data: Path | None = None) -> list:
    return ["run", "--model", str(root / "weights.safetensors"), "--arch", "architectures:SharedReluCNN",
            "--data", str(data or root / "images.npz"), "--out", str(out), "--analyses", "evaluation"]


def test_an_import_path_architecture_takes_its_input_shape_from_the_dataset(state_dict_and_images, tmp_path):
    from analyzers.__main__ import main

    model, root, x = state_dict_and_images
    out = tmp_path / "run"
    assert main(_run_args(root, out)) == 0
    with torch.no_grad():
        direct = torch.softmax(model(torch.as_tensor(x)), dim=1).numpy()
    np.testing.assert_allclose(np.load(out / "probs.npy"), direct, rtol=1e-5, atol=1e-6)
    import json

    assert json.loads((out / "run.json").read_text())["model"]["input_shape"] == [1, 12, 12]


def test_an_explicit_input_shape_wins_over_the_datasets(state_dict_and_images, tmp_path, capsys):
    from analyzers.__main__ import main

    _, root, _ = state_dict_and_images
    # the architecture runs on 12x12 only: a run with the flag's 8x8 fails where the dataset's 12x12 would not
    assert main(_run_args(root, tmp_path / "run") + ["--input-shape", "1,8,8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "(3, 1, 8, 8)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_no_input_shape_from_anywhere_is_one_line_naming_the_flag(state_dict_and_images, tmp_path, capsys):
    from analyzers.__main__ import main

    _, root, _ = state_dict_and_images
    # text labels are read through the model's class names: without the model the dataset says no shape
    table = pd.DataFrame(np.random.default_rng(0).standard_normal((6, 4)), columns=[f"f{i}" for i in range(4)])
    table["label"] = ["cat", "dog"] * 3
    table.to_csv(tmp_path / "named.csv", index=False)
    assert main(_run_args(root, tmp_path / "run", data=tmp_path / "named.csv")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input shape is unknown" in err and "--input-shape" in err, err


# --- 3. SHAP's default background ----------------------------------------------------------------------------------

def _seeded_rows(n: int, seed: int, size: int = 64) -> np.ndarray:
    """The rows the default background is documented to be: default_rng(seed) draws min(size, n), kept in order."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = np.random.default_rng(5).random((70, 1, 8, 8), dtype=np.float32)  # more rows than a background holds
    return model, x


def test_shap_without_background_draws_it_from_the_inputs_and_says_so(images):
    model, x = images
    drawn = explain(model, x, None, "shap", seed=4, details=True)
    assert len(drawn.notes) == 1 and "64 of the 70 inputs" in drawn.notes[0] and "seed 4" in drawn.notes[0]
    given = explain(model, x, None, "shap", seed=4, details=True, background=x[_seeded_rows(len(x), 4)])
    assert given.notes == ()  # an explicit background is the caller's: nothing to say
    np.testing.assert_array_equal(drawn.attributions, given.attributions)
    np.testing.assert_array_equal(drawn.nsamples, given.nsamples)
    np.testing.assert_array_equal(drawn.completeness_gap, given.completeness_gap)
    assert drawn.settings == given.settings and drawn.settings["background_size"] == 64
    # without details: the same maps; unchecked: the same draws
    np.testing.assert_array_equal(explain(model, x, None, "shap", seed=4), given.attributions)
    unchecked = explain(model, x, None, "shap", seed=4, check_completeness=False, details=True)
    assert unchecked.notes == drawn.notes
    np.testing.assert_array_equal(unchecked.attributions, explain(
        model, x, None, "shap", seed=4, check_completeness=False, background=x[_seeded_rows(len(x), 4)]))


def test_shap_of_a_linear_model_is_its_weights_times_the_distance_from_the_drawn_backgrounds_mean():
    weights, bias = np.array([2.0, -1.0, 0.5]), 0.3
    model = nn.Linear(3, 2)  # two logits, the second the first's negative: class 0's score is w.x + b itself
    with torch.no_grad():
        model.weight[:] = torch.tensor(np.stack([weights, -weights]), dtype=torch.float32)
        model.bias[:] = torch.tensor([bias, -bias])
    model = wrap_module(model.eval(), (3,))
    # feature 0 is the row's index: which rows make the background moves its mean by several units
    x = np.random.default_rng(2).normal(size=(120, 3)).astype(np.float32)
    x[:, 0] = np.arange(120) / 10
    result = explain(model, x[:12], 0, "shap", seed=9, nsamples=6400, check_completeness=False, details=True,
                     batch_size=4096)
    background = x[:12][_seeded_rows(12, 9)]  # 12 inputs: every one of them is the background
    expected = weights * (x[:12] - background.mean(axis=0))
    # SHAP's mean over 6400 draws of background rows: within 5 of its standard errors of the exact mean
    tolerance = 5 * np.abs(weights) * background.std(axis=0) / np.sqrt(6400)
    assert (np.abs(result.attributions - expected) <= tolerance).all()

    drawn = explain(model, x, 0, "shap", seed=9, nsamples=6400, check_completeness=False, details=True,
                    batch_size=4096)
    background = x[_seeded_rows(len(x), 9)]  # 64 of the 120 rows
    expected = weights * (x - background.mean(axis=0))
    tolerance = 5 * np.abs(weights) * background.std(axis=0) / np.sqrt(6400)
    assert (np.abs(drawn.attributions - expected) <= tolerance).all()
    # averaged over the rows, 120 x 6400 draws: close enough to tell which rows the background is
    tight = 5 * np.abs(weights) * background.std(axis=0) / np.sqrt(6400 * len(x))
    assert (np.abs(drawn.attributions.mean(axis=0) - expected.mean(axis=0)) <= tight).all()
    # every input as the background would miss feature 0 by more than that
    assert np.abs(weights * (x.mean(axis=0) - background.mean(axis=0)))[0] > tight[0]


def test_shap_of_one_input_without_background_is_refused_in_one_line(images):
    model, x = images
    with pytest.raises(AnalyzerError, match="one input is no background: pass background="):
        explain(model, x[:1], None, "shap")
    with pytest.raises(AnalyzerError, match="seed must be a whole number"):
        explain(model, x, None, "shap", seed=-1)
    # an explicit background is unchanged: one input against it is fine
    assert explain(model, x[:1], None, "shap", background=x[:8]).shape == x[:1].shape
