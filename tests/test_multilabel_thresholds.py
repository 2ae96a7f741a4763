"""A multi-label run's own threshold per label (issue 12): stored in thresholds.json, it decides the label sets, the
rankings and their export, the metrics and the per-label report, each equal to scikit-learn on the probabilities cut
label by label; the Confusion page stores one label's cut or every label's best-F1 cut; damaged files are refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from analyzers import AnalyzerError
from analyzers.evaluation.multilabel import multilabel_report
from analyzers.evaluation.tasks import MultiLabel
from analyzers.evaluation.thresholds import THRESHOLDS, samples_at, save_label_thresholds, task_at
from analyzers.loading.run_checks import RunDamaged
from analyzers.loading.runs import open_run


def _labels_and_probs(n=600, k=4, seed=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.35).astype(np.int64)
    # label 0 is under-confident (its positives sit near 0.3) and label 2 over-confident: each needs its own cut
    shift = np.array([-0.25, 0.0, 0.25, 0.0])
    probs = np.clip(0.2 + 0.55 * y + shift + rng.normal(0, 0.12, y.shape), 0, 1)
    return y, probs


def test_a_task_cut_per_label_predicts_metrics_and_report_as_scikit_learn_does():
    from sklearn import metrics as skm

    y, probs = _labels_and_probs()
    cuts = (0.3, 0.5, 0.8, 0.45)
    task = MultiLabel(4, threshold=cuts)
    pred = np.column_stack([probs[:, k] >= cuts[k] for k in range(4)]).astype(int)  # label by label
    np.testing.assert_array_equal(task.predictions(probs), pred)
    m = task.metrics(y, probs, names=list("abcd"))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    # each label's own cut beats one cut of 0.5 for every label on this data (labels 0 and 2 are shifted)
    assert m["hamming_loss"] < MultiLabel(4).metrics(y, probs)["hamming_loss"]
    report = multilabel_report(y, probs, names=list("abcd"), threshold=cuts)
    assert report["threshold"] == list(cuts)
    matrices = skm.multilabel_confusion_matrix(y, pred)
    for k, row in enumerate(report["labels"]):
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == matrices[k].tolist()
    missed = ((y == 1) & (pred == 0)).astype(int)
    assert report["co_missed_matrix"] == (missed.T @ missed).tolist()
    assert task.to_json()["threshold"] == list(cuts)
    for bad in ((0.5, 0.5), (0.5, 0.5, 0.5, 1.5), float("nan")):
        with pytest.raises(AnalyzerError, match="one per label|must be a number in"):
            MultiLabel(4, threshold=bad)


def test_stored_cuts_decide_the_samples_table_and_their_ranking(tmp_path):
    from analyzers.evaluation.metrics import rank_errors

    y, probs = _labels_and_probs()
    names = list("abcd")
    base = MultiLabel(4)
    samples = __import__("pandas").DataFrame({"id": [str(i) for i in range(len(y))], "loss": np.zeros(len(y)),
                                             **base.sample_columns(y, probs, names)})
    record = save_label_thresholds(tmp_path, [0.3, 0.5, 0.8, 0.45], names=names, cost_fn=3)
    assert json.loads((tmp_path / THRESHOLDS).read_text()) == record
    assert record == {"per_label": [0.3, 0.5, 0.8, 0.45], "labels": names, "cost_fp": 1.0, "cost_fn": 3.0}
    decided = samples_at(samples, probs, task=base, stored=record, labels=y, names=names)
    pred = probs >= np.array(record["per_label"])
    np.testing.assert_array_equal(decided["labels_wrong"], (pred != y).sum(axis=1))
    np.testing.assert_array_equal(decided["correct"], (pred == y).all(axis=1))
    assert not decided["labels_wrong"].equals(samples["labels_wrong"])  # the cuts changed which samples are wrong
    top = rank_errors(decided, by="labels_wrong", limit=5)
    assert top["labels_wrong"].iloc[0] == (pred != y).sum(axis=1).max()
    assert task_at(base, record).threshold == (0.3, 0.5, 0.8, 0.45)
    assert task_at(base, None) is base
    with pytest.raises(AnalyzerError, match="3 thresholds for 4 labels"):
        save_label_thresholds(tmp_path, [0.3, 0.5, 0.8], names=names)
    with pytest.raises(AnalyzerError, match=r"label 'c' must be a number in \[0, 1\]"):
        save_label_thresholds(tmp_path, [0.3, 0.5, 1.8, 0.5], names=names)


@pytest.fixture
def scenes_run(tmp_path, sample_run_dir):
    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir("scenes"), runs / "scenes")
    return runs, runs / "scenes"


@pytest.mark.parametrize("damage, why", [
    (lambda t: {"per_label": [0.5, 0.5]}, "'per_label' holds 2 entries"),
    (lambda t: {"per_label": [0.5] * (len(t) - 1) + [1.5]}, r"outside \[0, 1\]"),
    (lambda t: {"per_label": "0.5"}, "'per_label' is not a list of numbers"),
    (lambda t: {"positive": 1, "threshold": 0.4}, "has no 'per_label'"),
])
def test_a_damaged_thresholds_file_is_refused_by_name(scenes_run, damage, why):
    _, path = scenes_run
    names = open_run(path).class_names
    (path / THRESHOLDS).write_text(json.dumps(damage(names)))
    with pytest.raises(RunDamaged, match=f"thresholds.json .*{why}"):
        open_run(path).read_json(THRESHOLDS)


@pytest.mark.parametrize("damage, why", [
    (lambda ml: ml["labels"][0].pop("tp"), r"labels\[0\].'tp'"),
    (lambda ml: ml.update(co_missed_matrix="eye"), "'co_missed_matrix' is not a matrix"),
    (lambda ml: ml["co_missed_matrix"].pop(), "'co_missed_matrix' holds"),
    (lambda ml: ml["co_missed"][0].update(both_missed="many"), r"co_missed\[0\].'both_missed' is not an integer"),
])
def test_a_damaged_multilabel_file_is_refused_by_name(scenes_run, damage, why):
    _, path = scenes_run
    ml = json.loads((path / "multilabel.json").read_text())
    damage(ml)
    (path / "multilabel.json").write_text(json.dumps(ml))
    with pytest.raises(RunDamaged, match=f"multilabel.json .*{why}"):
        open_run(path).read_json("multilabel.json")


def test_the_confusion_page_stores_one_labels_cut_and_every_best_f1_cut_for_the_other_pages(scenes_run,
                                                                                             monkeypatch):
    from sklearn import metrics as skm

    from tests.test_dashboard_app import _app, _ok, _text

    runs, path = scenes_run
    run = open_run(path)
    names, y, probs = run.class_names, np.asarray(run.labels), np.asarray(run.probs)
    at = _app(monkeypatch, runs, path).run()
    at.switch_page("views/confusion.py").run()
    _ok(at)
    at.selectbox(key="label-threshold-label").set_value(1).run()
    at.slider(key="label-threshold-value-1").set_value(0.2).run()
    at.button(key="label-threshold-save").click().run()
    _ok(at)
    stored = json.loads((path / THRESHOLDS).read_text())
    assert stored["labels"] == names
    assert stored["per_label"] == pytest.approx([0.5, 0.2] + [0.5] * (len(names) - 2))
    at.button(key="label-threshold-best").click().run()
    _ok(at)
    stored = json.loads((path / THRESHOLDS).read_text())
    for k, cut in enumerate(stored["per_label"]):  # each label's cut is its best F1 over every distinct score
        best = max(skm.f1_score(y[:, k], probs[:, k] >= t, zero_division=0) for t in np.unique(probs[:, k]))
        assert skm.f1_score(y[:, k], probs[:, k] >= cut) == pytest.approx(best)
    pred = (probs >= np.array(stored["per_label"])).astype(int)
    # the Overview's metrics are at the stored cuts, and say so
    at.switch_page("views/overview.py").run()
    _ok(at)
    assert "own threshold for each label" in _text(at)
    shown = next(m.value for m in at.metric if m.label == "Subset accuracy")
    assert shown == f"{skm.accuracy_score(y, pred):.3f}" != f"{run.read_json('metrics.json')['subset_accuracy']:.3f}"
    # the rankings count wrong labels at the stored cuts
    at.switch_page("views/errors.py").run()
    at.segmented_control(key="errors-section").set_value("Error rankings").run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert "own threshold for each label" in _text(at)


def test_the_dashboards_decided_table_is_built_once_per_stored_cut(scenes_run, monkeypatch):
    """The label sets are rebuilt row by row: every page that reads them shares one build per stored cut, and a new
    cut is a new build that equals samples_at's."""
    import analyzers.evaluation.thresholds as thresholds
    from analyzers.loading.runs import open_run
    from dashboard import data

    _, path = scenes_run
    run = open_run(path)
    names = list(run.class_names)
    builds = []
    real = thresholds.samples_at
    monkeypatch.setattr(thresholds, "samples_at", lambda *a, **k: builds.append(1) or real(*a, **k))
    data.forget_runs()
    assert data.decided_samples(run) is run.sample_table and not builds  # no stored cut: the table as stored
    for cut in (0.3, 0.7):
        record = save_label_thresholds(path, [cut] * len(names), names=names)
        data.forget_runs()  # as the Confusion page does once it stored a cut
        first, again = data.decided_samples(run), data.decided_samples(run)
        expected = real(run.samples, run.probs, task=MultiLabel(len(names)), stored=record, labels=run.labels,
                        names=names)
        __import__("pandas").testing.assert_frame_equal(first, expected)
        __import__("pandas").testing.assert_frame_equal(again, expected)
    assert len(builds) == 2
