"""A multi-label dataset read from a table: `--label-column circle,square,triangle` names three 0/1 (or true/false)
columns, which become the (N, 3) multi-hot labels in that order and the label names, and are neither features nor
metadata. A run of a 3-logit tabular model on such a CSV stores the columns as labels.npy, the column names as class
names, metrics equal to scikit-learn's, and the feature columns in samples.parquet; in-process and in the sandbox.
Refusals name the column: a value other than 0/1, a missing column, a declared single-label task, a model whose
output count differs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError
from analyzers.engines.pipeline import run_analysis
from analyzers.loading.datasets import load_dataset
from analyzers.loading.runs import open_run
from tests.conftest import export_model

LABELS = ("circle", "square", "triangle")
FEATURES = ("f0", "f1", "f2", "f3")


def _table(n=900, seed=0) -> pd.DataFrame:
    """Label k is present when f_k > 0; f3 is a context feature, `region` a text column. Label columns sit between
    the features, and triangle is stored as true/false."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    present = x[:, :3] > 0
    return pd.DataFrame({"f0": x[:, 0], "circle": present[:, 0].astype(int), "f1": x[:, 1],
                         "square": present[:, 1].astype(int), "f2": x[:, 2], "triangle": present[:, 2],
                         "f3": x[:, 3], "region": np.where(x[:, 3] > 1, "north", "south")})


class _Shapes(nn.Module):
    """Logits 8 f_k for the three labels, except where f3 > 1 (about 16%): there circle is pushed to 'absent'."""

    def forward(self, x):
        logits = 8 * x[:, :3]
        gate = torch.sigmoid(20 * (x[:, 3:4] - 1))
        return logits - 40 * gate * torch.tensor([1.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def table_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel-table")
    table = _table()
    table.to_csv(root / "shapes.csv", index=False)
    export_model(_Shapes().eval(), torch.zeros(2, 4), root / "shapes.pt2")
    return root, table


@pytest.mark.parametrize("isolation", ["process", "auto"])  # auto: an uploaded .pt2 runs in the sandbox
def test_a_table_with_three_label_columns_is_a_multilabel_run(table_files, tmp_path, isolation):
    from sklearn import metrics as skm

    root, table = table_files
    run_dir = run_analysis(str(root / "shapes.pt2"), str(root / "shapes.csv"), tmp_path / "run",
                           label_column="circle,square,triangle", isolation=isolation)
    run = open_run(run_dir)
    y = table[list(LABELS)].to_numpy().astype(np.int64)
    assert run.task == "multilabel" and run.class_names == list(LABELS)
    assert np.array_equal(np.load(run_dir / "labels.npy"), y)
    assert np.array_equal(np.asarray(run.labels), y)
    probs = np.asarray(run.probs)
    with torch.no_grad():
        expected = torch.sigmoid(_Shapes()(torch.as_tensor(table[list(FEATURES)].to_numpy().copy()))).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    pred = (probs >= 0.5).astype(int)
    assert 0 < (pred != y).sum() < y.size  # the planted misses
    m = run.read_json("metrics.json")
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert run.info["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    # the features (and the text column) are there for the slices; the label columns are labels only
    s = run.samples
    np.testing.assert_allclose(s["f3"], table["f3"], rtol=1e-6)
    assert list(s["region"]) == list(table["region"])
    assert not set(LABELS) & set(s.columns)
    assert np.array_equal(s["label_square"], y[:, 1] == 1)
    assert run.info["dataset"]["feature_names"] == list(FEATURES)
    # the top slice is where circle is pushed away: a rule on the feature f3
    assert "f3 >" in run.read_parquet("slices.parquet")["description"].iloc[0]


def test_label_columns_load_from_csv_and_parquet_without_a_model(table_files, tmp_path):
    root, table = table_files
    table.to_parquet(tmp_path / "shapes.parquet")  # triangle is a bool column here
    for path in (root / "shapes.csv", tmp_path / "shapes.parquet"):
        data = load_dataset(str(path), label_column="triangle, circle")  # spaces allowed; order is the given one
        assert data.task == "multilabel" and data.class_names == ("triangle", "circle")
        assert np.array_equal(data.y, table[["triangle", "circle"]].to_numpy().astype(np.int64))
        # a 0/1 column not named as a label (square) stays a feature; the label columns are neither
        assert data.feature_names == ("f0", "f1", "square", "f2", "f3")
        assert list(data.metadata.columns) == ["region"]


def test_refusals_name_the_column(table_files, tmp_path):
    root, table = table_files
    model, spec = str(root / "shapes.pt2"), "circle,square,triangle"
    twos = table.copy()
    twos.loc[7, "square"] = 2
    twos.to_csv(tmp_path / "twos.csv", index=False)
    with pytest.raises(AnalyzerError, match=r"label column 'square' in 'twos.csv' holds 2 \(row 7\), not 0/1") as e:
        run_analysis(model, str(tmp_path / "twos.csv"), tmp_path / "a", label_column=spec, isolation="process")
    assert "\n" not in str(e.value)
    words = table.assign(circle=np.where(table["circle"] == 1, "yes", "no"))
    words.to_csv(tmp_path / "words.csv", index=False)
    with pytest.raises(AnalyzerError, match="label column 'circle' in 'words.csv' holds '(yes|no)' \\(row 0\\)"):
        load_dataset(str(tmp_path / "words.csv"), label_column=spec)
    with pytest.raises(AnalyzerError, match=r"no label column 'hexagon' \(columns: f0, circle, f1, square, f2, "
                                            r"triangle, f3, region\)"):
        run_analysis(model, str(root / "shapes.csv"), tmp_path / "b", label_column="circle,hexagon",
                     isolation="process")
    with pytest.raises(AnalyzerError, match=r"2 label columns \(circle, square\) make a multi-label dataset, not "
                                            r"regression: pass --task multilabel"):
        run_analysis(model, str(root / "shapes.csv"), tmp_path / "c", label_column="circle,square",
                     task="regression", isolation="process")
    with pytest.raises(AnalyzerError, match=r"2 label columns \(circle, square\) but the model has 3 outputs"):
        run_analysis(model, str(root / "shapes.csv"), tmp_path / "d", label_column="circle,square",
                     isolation="process")
    with pytest.raises(AnalyzerError, match="is both a label column and a feature"):
        load_dataset(str(root / "shapes.csv"), label_column=spec, features=["f0", "circle", "f2", "f3"])


def test_a_refusal_in_the_sandbox_names_the_column(table_files, tmp_path):
    root, table = table_files
    twos = table.copy()
    twos.loc[3, "circle"] = 2
    twos.to_csv(tmp_path / "twos.csv", index=False)
    with pytest.raises(AnalyzerError, match=r"label column 'circle' in 'twos.csv' holds 2 \(row 3\)"):
        run_analysis(str(root / "shapes.pt2"), str(tmp_path / "twos.csv"), tmp_path / "a",
                     label_column="circle,square,triangle", isolation="auto")
