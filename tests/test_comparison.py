"""Comparing two runs, the evaluation files a run holds, CSV exports, and the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import binomtest

from analyzers.__main__ import main
from analyzers.evaluation.comparison import compare_predictions, compare_runs
from analyzers.errors import AnalyzerError
from analyzers.evaluation.stage import errors_csv, slices_csv, suspects_csv
from analyzers.loading.runs import open_run

ROOT = Path(__file__).resolve().parents[1]


def test_compare_predictions_counts_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    a = np.eye(3)[[0, 0, 1, 0, 2, 1]] * 0.7 + 0.1  # right on 0, 1, 2, 4
    b = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.7 + 0.1  # right on 0, 2, 3, 4
    slices = pd.DataFrame({"description": ["label == 1", "label == 0"], "ids": [[12, 13], [10, 11]],
                           "source": "features", "run": "a"})
    c = compare_predictions(np.arange(10, 16), labels, a, b, slices=slices, names=("old", "new"))
    s = c.summary
    assert (s["accuracy_a"], s["accuracy_b"]) == (4 / 6, 4 / 6)
    assert (s["both_right"], s["only_a_right"], s["only_b_right"], s["both_wrong"]) == (3, 1, 1, 1)
    assert s["disagree"] == 3 and s["both_wrong_differently"] == 1
    assert s["mcnemar_p"] == pytest.approx(binomtest(1, 2, 0.5).pvalue)
    assert list(c.disagreements["id"]) == [11, 13, 15] and list(c.disagreements["right"]) == ["a", "b", "neither"]
    row = c.per_class.set_index("class").loc[1]
    assert (row["recall_a"], row["recall_b"], row["recall_delta"]) == (0.5, 1.0, 0.5)
    sl = c.per_slice.set_index("description")
    assert sl.loc["label == 1", "error_rate_a"] == 0.5 and sl.loc["label == 1", "error_rate_b"] == 0.0
    assert sl.loc["label == 0", "error_rate_delta"] == 0.5
    # issue 18, item 9: slices of two runs are matched by their samples (Jaccard of member ids), not their names
    both = pd.DataFrame({"description": ["cluster of a", "other of a", "cluster of b"],
                         "ids": [[10, 11, 12], [14, 15], [11, 12, 13]], "source": "embeddings", "run": ["a", "a", "b"]})
    matched = compare_predictions(np.arange(10, 16), labels, a, b, slices=both).per_slice.set_index("description")
    assert matched.loc["cluster of a", "closest_in_other_run"] == "cluster of b"
    assert matched.loc["cluster of a", "overlap"] == pytest.approx(2 / 4)
    assert pd.isna(matched.loc["other of a", "closest_in_other_run"]) and matched.loc["other of a", "overlap"] == 0
    assert matched.loc["cluster of b", "closest_in_other_run"] == "cluster of a"
    with pytest.raises(AnalyzerError, match="different numbers of classes"):
        compare_predictions(np.arange(6), labels, a, np.full((6, 4), 0.25))


@pytest.fixture(scope="module")
def two_digit_runs(tmp_path_factory, sample_run_dir):
    """The digits sample's run, and a run of the same model with its last layer perturbed."""
    from analyzers.engines.pipeline import run_analysis
    from sample_models import get_sample

    root = tmp_path_factory.mktemp("compare")
    sample = get_sample("digits")
    model = sample.build_model()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(sample.weights_path)))
    torch.manual_seed(0)
    with torch.no_grad():
        model.fc2.weight.add_(torch.randn_like(model.fc2.weight) * 0.3)
    weights = root / "perturbed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run_b = run_analysis(str(weights), "sample:digits", root / "b", arch="digits", analyses=["evaluation"])
    return sample_run_dir("digits"), run_b


def test_a_run_holds_the_evaluation_files(two_digit_runs):
    run = open_run(two_digit_runs[0])
    metrics = run.read_json("metrics.json")
    for key in ("accuracy", "balanced_accuracy", "log_loss", "roc_auc_ovr", "top_k_accuracy", "ece",
                "classification_report", "calibration"):
        assert key in metrics
    assert metrics["accuracy"] == pytest.approx(run.info["accuracy"])
    assert set(metrics["calibration"]) == {"uniform", "quantile"}
    assert set(metrics["calibration"]["uniform"]["per_class"]) == set(run.class_names)
    conf = run.read_json("confusion.json")
    assert np.sum(conf["counts"]) == run.info["num_samples"]
    assert sum(len(c["ids"]) for c in conf["cells"]) == run.info["num_samples"]
    slices = run.read_parquet("slices.parquet")
    assert {"description", "size", "error_rate", "lift", "ids", "source", "score", "ece"} <= set(slices.columns)
    assert set(slices["source"]) <= {"features", "embeddings"}
    assert "embeddings" in set(slices["source"])  # digits has no features: embedding clusters still slice it
    noise = run.read_parquet("label_noise.parquet")
    assert list(noise.columns[:4]) == ["id", "label", "suggested_label", "score"]
    assert run.info["analyses"]["evaluation"]["num_slices"] == len(slices)


def test_csv_exports(two_digit_runs, tmp_path):
    run = open_run(two_digit_runs[0])
    slices = run.read_parquet("slices.parquet")
    text = slices_csv(slices, tmp_path / "slices.csv")
    back = pd.read_csv(tmp_path / "slices.csv")
    assert text == (tmp_path / "slices.csv").read_text() and len(back) == len(slices)
    assert [int(v) for v in back["ids"].iloc[0].split()] == list(slices["ids"].iloc[0])
    errors = pd.read_csv(pd.io.common.StringIO(errors_csv(run.samples, run.probs, by="confident_wrong",
                                                          class_names=run.class_names)))
    assert len(errors) == (~run.samples["correct"]).sum() and (errors["label_name"] != errors["pred_name"]).all()
    suspects = pd.read_csv(pd.io.common.StringIO(suspects_csv(run.read_parquet("label_noise.parquet"),
                                                              class_names=run.class_names)))
    assert {"label_name", "suggested_name"} <= set(suspects.columns)
    with pytest.raises(AnalyzerError, match="not a slices table"):
        slices_csv(run.samples)


def test_compare_runs_and_command(two_digit_runs, tmp_path, capsys):
    a, b = two_digit_runs
    c = compare_runs(a, b)
    sa, sb = open_run(a).samples, open_run(b).samples
    assert c.summary["accuracy_a"] == pytest.approx(sa["correct"].mean())
    assert c.summary["accuracy_b"] == pytest.approx(sb["correct"].mean())
    assert c.summary["disagree"] == (sa["pred"].to_numpy() != sb["pred"].to_numpy()).sum() > 0
    assert set(c.per_slice["run"]) <= {"a", "b"}
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "disagree on" in printed and "McNemar" in printed
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["disagree"] == c.summary["disagree"]
    assert len(pd.read_csv(tmp_path / "cmp" / "disagreements.csv")) == c.summary["disagree"]
    assert (tmp_path / "cmp" / "per_class.csv").exists() and (tmp_path / "cmp" / "per_slice.csv").exists()
    # samples in another order still match by id
    from analyzers.evaluation.comparison import compare_command

    assert compare_command(Namespace(run_a=str(b), run_b=str(a), out=None)) == 0


def test_compare_refuses_runs_on_different_data(two_digit_runs, sample_run_dir):
    a, _ = two_digit_runs
    with pytest.raises(AnalyzerError, match="different samples"):
        compare_runs(a, sample_run_dir("tabular"))


def test_cli_run_in_a_subprocess_then_compare(tmp_path, capsys):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "analyzers", "run", "--model", "sample:dna", "--data", "sample:dna",
                           "--out", str(out), "--analyses", "evaluation"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("metrics.json", "confusion.json", "slices.parquet", "label_noise.parquet"):
        assert (out / name).exists()
    assert main(["compare", str(out), str(out)]) == 0
    assert "disagree on 0 of 600" in capsys.readouterr().out
    assert main(["compare", str(out), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
