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
    assert (s["both_right"], s["better_a"], s["better_b"], s["both_wrong"]) == (3, 1, 1, 1)
    assert s["disagree"] == 3 and s["both_wrong_differently"] == 1
    assert s["paired_p"] == pytest.approx(binomtest(1, 2, 0.5).pvalue) and s["paired_test"] == "McNemar"
    assert s["headline_a"]["accuracy"] == 4 / 6 and s["mean_error_b"] == pytest.approx(2 / 6)
    assert list(c.disagreements["id"]) == [11, 13, 15] and list(c.disagreements["better"]) == ["a", "b", "neither"]
    row = c.per_class.set_index("class").loc[1]
    assert (row["recall_a"], row["recall_b"], row["recall_delta"]) == (0.5, 1.0, 0.5)
    sl = c.per_slice.set_index("description")
    assert sl.loc["label == 1", "error_a"] == 0.5 and sl.loc["label == 1", "error_b"] == 0.0
    assert sl.loc["label == 0", "error_delta"] == 0.5
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


def test_a_regression_comparison_is_by_absolute_error_with_the_sign_test():
    from sklearn.metrics import mean_absolute_error, r2_score

    from analyzers.evaluation.tasks import Regression

    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    a = y + rng.normal(0, 0.5, 300)
    b = y + rng.normal(0, 0.5, 300)
    b[:100] = y[:100] + rng.normal(0, 0.05, 100)  # b is far better on the first 100 samples, like a on the rest
    slices = pd.DataFrame({"description": ["first hundred"], "ids": [list(range(100))], "source": "features",
                           "run": "a"})
    c = compare_predictions(np.arange(300), y, a, b, task=Regression(1), slices=slices)
    s = c.summary
    assert s["headline_a"]["mae"] == pytest.approx(mean_absolute_error(y, a))
    assert s["headline_b"]["r2"] == pytest.approx(r2_score(y, b))
    ea, eb = np.abs(a - y), np.abs(b - y)
    assert (s["better_a"], s["better_b"]) == ((ea < eb).sum(), (eb < ea).sum())
    assert s["paired_p"] == pytest.approx(binomtest(int((ea < eb).sum()), int((ea != eb).sum())).pvalue)
    assert s["paired_test"] == "sign test" and "both_right" not in s and "accuracy_a" not in s
    assert c.per_class.empty
    row = c.per_slice.iloc[0]
    assert row["error_a"] == pytest.approx(ea[:100].mean()) and row["error_b"] == pytest.approx(eb[:100].mean())
    d = c.disagreements  # every prediction differs; the largest change of error first
    assert len(d) == 300 and d["error_delta"].abs().is_monotonic_decreasing
    first = int(d["id"].iloc[0])
    assert d["error_delta"].iloc[0] == pytest.approx(eb[first] - ea[first])
    assert d["better"].iloc[0] == ("b" if eb[first] < ea[first] else "a")


def test_a_multilabel_comparison_is_per_label_and_by_hamming_error():
    from sklearn.metrics import hamming_loss, precision_recall_fscore_support

    from analyzers.evaluation.tasks import MultiLabel

    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.4).astype(int)
    a = np.clip(y * 0.7 + rng.normal(0.15, 0.2, y.shape), 0, 1)
    b = a.copy()
    b[:, 2] = 1 - b[:, 2]  # b gets label 2 backwards
    c = compare_predictions(np.arange(200), y, a, b, task=MultiLabel(3), class_names=["x", "y", "z"])
    s = c.summary
    assert s["headline_b"]["hamming_loss"] == pytest.approx(hamming_loss(y, b >= 0.5))
    ha, hb = ((a >= 0.5) != y).mean(1), ((b >= 0.5) != y).mean(1)
    assert (s["better_a"], s["better_b"]) == ((ha < hb).sum(), (hb < ha).sum())
    assert s["both_right"] == ((ha == 0) & (hb == 0)).sum()
    _, recall_b, f1_b, _ = precision_recall_fscore_support(y, b >= 0.5, zero_division=0)
    per_label = c.per_class.set_index("name")
    np.testing.assert_allclose(per_label["f1_b"], f1_b)
    assert per_label["recall_delta"].abs().idxmax() == "z"
    differ = ((a >= 0.5) != (b >= 0.5)).any(1)
    assert set(c.disagreements["id"]) == set(np.flatnonzero(differ))
    assert c.disagreements["label"].iloc[0] in {"none", "x", "y", "z"} or " + " in c.disagreements["label"].iloc[0]


@pytest.fixture(scope="module")
def two_digit_runs(tmp_path_factory, sample_run_dir):
    """The digits sample's run, and a run of the same model with its last layer perturbed."""
    from conftest import perturbed_digits_run

    run_b = perturbed_digits_run(tmp_path_factory.mktemp("compare"), scale=0.3)
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
    assert "predict differently on" in printed and "McNemar" in printed
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
    assert "predict differently on 0 of 600" in capsys.readouterr().out
    assert main(["compare", str(out), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("sample", ["prices", "scenes"])
def test_the_compare_page_reads_a_regression_or_multilabel_pair_by_its_own_metrics(sample, tmp_path, monkeypatch,
                                                                                   sample_run_dir):
    """A second run of the sample's model with perturbed weights: the Compare page shows the task's headline
    metrics of both runs (equal to compare_runs) and the samples they predict differently, without a class panel."""
    import shutil

    from safetensors.torch import load_file

    from analyzers.engines.pipeline import run_analysis
    from sample_models import get_sample
    from tests.test_dashboard_app import _app, _ok, _text

    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir(sample), runs / "a")
    model = get_sample(sample).build_model()
    model.load_state_dict(load_file(str(get_sample(sample).weights_path)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    weights = tmp_path / "perturbed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run_analysis(str(weights), f"sample:{sample}", runs / "b", arch=sample, analyses=["evaluation"])
    c = compare_runs(runs / "a", runs / "b")
    assert c.summary["task"] == open_run(runs / "a").task and c.summary["disagree"] > 0
    at = _app(monkeypatch, runs, runs / "a").run()
    at.switch_page("views/compare.py").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    key = next(iter(c.summary["headline_b"]))
    assert any(m.value == f"{c.summary['headline_b'][key]:.3f}" for m in at.metric), [m.value for m in at.metric]
    assert "Where they disagree" in _text(at) and "Per class" not in _text(at)
    assert ("Per label" in _text(at)) == (sample == "scenes")
