"""A multi-label model through the whole run (issue 12): the task is read from a multi-hot y and a K-output model,
recorded in run.json; metrics.json and multilabel.json equal scikit-learn and a brute-force count on the stored
probabilities and labels; samples.parquet names each sample's labels; the slices and the co-missed view find a
planted pair the model misses together; explanations explain one label; the refusals name the problem. In-process
and in the sandbox."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError
from analyzers.engines.pipeline import run_analysis
from analyzers.evaluation.multilabel import co_missed, per_label_report
from analyzers.loading.runs import open_run
from tests.conftest import export_model

NAMES = ("red", "green", "blue", "round")


def _planted_multilabel(n=1500, seed=0):
    """Label k is present when x_k > 0 (k < 4); x4 is a context feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, :4] > 0).astype(np.int64)


class _Planted(nn.Module):
    """Logits 8 x_k, right everywhere except where x4 > 1 (about 16%): there labels 0 and 1 are pushed to 'absent'
    together, so wherever both are present there, both are missed - the co-missed pair and the slice to find."""

    def forward(self, x):
        logits = 8 * x[:, :4]
        gate = torch.sigmoid(20 * (x[:, 4:5] - 1))
        return logits - 40 * gate * torch.tensor([1.0, 1.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def multilabel_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    x, y = _planted_multilabel()
    # a metadata column of where the model is wrong: the slices must name it
    np.savez(root / "tags.npz", x=x, y=y, class_names=np.array(NAMES), lighting=np.where(x[:, 4] > 1, "dim", "day"))
    export_model(_Planted().eval(), torch.zeros(2, 5), root / "tags.pt2")
    return root, x, y


@pytest.mark.parametrize("isolation", ["process", "auto"])
def test_a_multilabel_run_has_its_metrics_per_label_report_and_planted_pair(multilabel_files, tmp_path, isolation):
    from sklearn import metrics as skm

    root, x, y = multilabel_files
    run = open_run(run_analysis(str(root / "tags.pt2"), str(root / "tags.npz"), tmp_path / "run",
                                isolation=isolation))
    assert run.task == "multilabel" and run.class_names == list(NAMES)
    labels, probs = np.asarray(run.labels), np.asarray(run.probs)
    assert np.array_equal(labels, y)
    with torch.no_grad():  # the stored probabilities are each label's sigmoid
        expected = torch.sigmoid(_Planted()(torch.as_tensor(x))).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    pred = (probs >= 0.5).astype(int)
    m = run.read_json("metrics.json")
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"))
    assert m["average_precision_micro"] == pytest.approx(skm.average_precision_score(y, probs, average="micro"))
    report = skm.classification_report(y, pred, target_names=list(NAMES), output_dict=True, zero_division=0)
    for name in NAMES:
        assert m["classification_report"][name]["f1-score"] == pytest.approx(report[name]["f1-score"])
    assert run.info["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    # samples.parquet: the label sets as text, the Hamming error, what was missed
    s = run.samples
    first = np.flatnonzero(y[0])
    assert s["label"].iloc[0] == (" + ".join(NAMES[k] for k in first) or "none")
    np.testing.assert_allclose(s["hamming_error"], (pred != y).mean(axis=1))
    assert np.array_equal(s["correct"], (pred == y).all(axis=1))
    assert np.array_equal(s["labels_wrong"], (pred != y).sum(axis=1))
    # multilabel.json: each label's 2x2 matrix is scikit-learn's, and the planted pair is missed together most
    ml = run.read_json("multilabel.json")
    matrices = skm.multilabel_confusion_matrix(y, pred)
    for k, row in enumerate(ml["labels"]):
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == matrices[k].tolist()
        assert row["average_precision"] == pytest.approx(skm.average_precision_score(y[:, k], probs[:, k]))
    top = ml["co_missed"][0]
    assert (top["label_a"], top["label_b"]) == ("red", "green")
    planted = (x[:, 4] > 1) & (y[:, 0] == 1) & (y[:, 1] == 1)
    # every planted sample, and few more (the gate is soft right at x4 = 1)
    assert planted.sum() <= top["both_missed"] <= 1.1 * planted.sum()
    assert top["lift"] > 3
    # the top slice is the context where the model misses the pair
    slices = run.read_parquet("slices.parquet")
    assert 'lighting == "dim"' in slices["description"].iloc[0]


def test_per_label_report_and_co_missed_against_scikit_learn_and_a_brute_force_count():
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    y = (rng.random((400, 5)) < 0.4).astype(int)
    probs = np.clip(y * 0.6 + rng.normal(0.2, 0.25, y.shape), 0, 1)
    rows = per_label_report(y, probs, names=list("abcde"))
    p, r, f, support = skm.precision_recall_fscore_support(y, probs >= 0.5, zero_division=0)
    for k, row in enumerate(rows):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[k], r[k], f[k], support[k]))
        assert row["prevalence"] == pytest.approx(y[:, k].mean())
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, k], probs[:, k]))
        # the best-F1 threshold is the best of every cut (brute force over the distinct scores)
        best = max(skm.f1_score(y[:, k], probs[:, k] >= t, zero_division=0) for t in np.unique(probs[:, k]))
        assert row["best_f1"] == pytest.approx(best)
    pairs = co_missed(y, probs, names=list("abcde"))
    missed = (y == 1) & (probs < 0.5)
    for _, pair in pairs.iterrows():
        a, b = "abcde".index(pair["label_a"]), "abcde".index(pair["label_b"])
        both = sum(1 for i in range(len(y)) if missed[i, a] and missed[i, b])
        together = sum(1 for i in range(len(y)) if y[i, a] and y[i, b])
        assert (pair["both_missed"], pair["together"]) == (both, together)
        rate_a, rate_b = missed[:, a].sum() / y[:, a].sum(), missed[:, b].sum() / y[:, b].sum()
        assert pair["expected"] == pytest.approx(rate_a * rate_b * together)
    assert list(pairs["both_missed"]) == sorted(pairs["both_missed"], reverse=True)


def test_refusals_name_the_problem(multilabel_files, tmp_path):
    root, x, y = multilabel_files
    np.savez(tmp_path / "one.npz", x=x, y=y[:, 0])  # (N,) labels for a 4-output model declared multi-label
    with pytest.raises(AnalyzerError, match=r"multi-hot array \(samples, 4\)"):
        run_analysis(str(root / "tags.pt2"), str(tmp_path / "one.npz"), tmp_path / "a", task="multilabel",
                     isolation="process")
    bad = y.astype(float)
    bad[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=bad)
    with pytest.raises(AnalyzerError, match="NaN or infinite, the first in row 5"):
        run_analysis(str(root / "tags.pt2"), str(tmp_path / "nan.npz"), tmp_path / "b", isolation="process")
    np.savez(tmp_path / "three.npz", x=x, y=y[:, :3])  # three label columns for four outputs
    with pytest.raises(AnalyzerError, match="one 0/1 column per model output"):
        run_analysis(str(root / "tags.pt2"), str(tmp_path / "three.npz"), tmp_path / "c", isolation="process")
    twos = y.copy()
    twos[0, 0] = 2
    np.savez(tmp_path / "twos.npz", x=x, y=twos)
    with pytest.raises(AnalyzerError, match="must be 0 or 1"):
        run_analysis(str(root / "tags.pt2"), str(tmp_path / "twos.npz"), tmp_path / "d", task="multilabel",
                     isolation="process")


def test_a_label_map_explains_that_label_and_its_ground_truth_is_that_label_mask(tmp_path, sample_run_dir):
    """On the scenes sample, a map of label k is scored against label k's own mask."""
    from analyzers.explanations.explain_run import ground_truth_mask, sample_map
    from analyzers.loading.datasets import load_dataset

    run = open_run(sample_run_dir("scenes"))
    dataset = load_dataset("sample:scenes")
    row = int(np.flatnonzero(dataset.y.sum(axis=1) >= 2)[0])
    present = np.flatnonzero(dataset.y[row])
    masks = ground_truth_mask(dataset, np.array([row, row]), targets=present[:2])
    assert np.array_equal(masks[0], dataset.extras["mask"][row, present[0]])
    assert not np.array_equal(masks[0], masks[1])
    explanation = sample_map(run, dataset.ids[row], "saliency", target=int(present[0]))
    assert explanation.target_class == present[0] and explanation.display.shape == (32, 32)
