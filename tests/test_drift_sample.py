"""The drift sample's planted data problems, found by a plain run of it (`analyzers run --data sample:drift`): the shift
to a near-white background, exact and near leaks across the splits, copies with conflicting labels, and corrupted
inputs, each checked against the `planted` and `copy_of` columns the sample writes (ground truth, never a feature)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sample_models import WEIGHTS_DIR, drift


@pytest.fixture(scope="module")
def run(sample_run_dir):
    from analyzers.loading.runs import open_run

    return open_run(sample_run_dir("drift"))


@pytest.fixture(scope="module")
def truth(run):
    """The planted pairs by kind (frozensets of two ids), and the ids of each planted problem."""
    samples = run.samples
    planted = samples["planted"].astype(str).to_numpy()
    ids, copy_of = samples["id"].to_numpy(), samples["copy_of"].to_numpy()
    pairs = {kind: {frozenset((int(i), int(c))) for i, c, p in zip(ids, copy_of, planted) if p == kind}
             for kind in ("exact-leak", "near-leak", "conflicting-label")}
    blank = ids[planted == "corrupted-constant"]
    pairs["blank"] = {frozenset(int(i) for i in blank)}  # two all-zero frames: byte copies of each other
    rows = {kind: set(ids[planted == kind].tolist()) for kind in drift.PLANTED}
    return pairs, rows


def _found(run, kind: str) -> set:
    table = run.read_parquet("duplicates.parquet")
    chosen = table[table["kind"] == kind]
    return {frozenset((int(a), int(b))) for a, b in zip(chosen["id_a"], chosen["id_b"])}


def _recall_precision(found: set, planted: set) -> tuple[float, float]:
    return len(found & planted) / len(planted), (len(found & planted) / len(found) if found else float("nan"))


def test_the_planted_counts_are_what_the_sample_says(run, truth):
    _, rows = truth
    assert len(rows["new-background"]) == drift.NEW_BACKGROUND_COUNT == 532
    assert len(rows["exact-leak"]) == drift.EXACT_LEAKS and len(rows["near-leak"]) == drift.NEAR_LEAKS
    assert len(rows["conflicting-label"]) == drift.CONFLICTING_COPIES
    assert run.samples["split"].value_counts().to_dict() == drift.SPLIT_SIZES


def test_exact_copies_are_all_found_and_near_ones_at_least_nine_in_ten(run, truth):
    pairs, _ = truth
    exact_planted = pairs["exact-leak"] | pairs["conflicting-label"] | pairs["blank"]
    recall, precision = _recall_precision(_found(run, "exact"), exact_planted)
    print(f"exact: recall {recall:.3f}, precision {precision:.3f}")
    assert recall == 1.0 and precision == 1.0  # no natural image is a byte copy of another
    recall, precision = _recall_precision(_found(run, "near"), pairs["near-leak"])
    print(f"near: recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.9 and precision == 1.0
    leaks = _found(run, "leak")
    recall, precision = _recall_precision(leaks, pairs["exact-leak"] | pairs["near-leak"])
    print(f"leaks: recall {recall:.3f}, precision {precision:.3f}")
    assert pairs["exact-leak"] <= leaks and recall >= 0.95 and precision == 1.0
    # a conflicting label is a copy whose labels differ: the 10 planted ones, and nothing else
    assert _found(run, "conflicting-label") == pairs["conflicting-label"]


def test_the_shift_is_found_on_the_embeddings_and_the_channels(run):
    from analyzers.data_health.shift import embedding_shift

    shift = json.loads(run.file("shift.json").read_text())
    pair = shift["pairs"][0]
    assert (shift["train"], pair["a"], pair["b"]) == ("train", "train", "test")
    assert pair["domain_auc"] > 0.9 and pair["mmd_p"] < 0.05
    shifted = {f["feature"] for f in pair["features"] if f["shifted"]}
    assert {"channel 0 mean", "channel 1 mean", "channel 2 mean", "background"} <= shifted
    # the null: two random halves of the training split, on the same embeddings
    emb = np.load(run.file(f"embeddings/{run.info['embedding_layer']}.npy"))
    train = np.flatnonzero(run.samples["split"].to_numpy() == "train")
    halves = np.random.default_rng(0).permutation(train)
    null = embedding_shift(emb[halves[:750]], emb[halves[750:]], permutations=0)
    assert abs(null.domain_auc - 0.5) < 0.08
    # the slices that grew: the near-white background, absent from the training split
    slices = pd.DataFrame(pair["slices"])
    white = slices[slices["description"].str.contains('background == "white"')]
    assert len(white) and (white["size_a"] == 0).all() and (white["change"] == "absent").all()


def test_the_corrupted_inputs_and_the_unscaled_ones_are_named(run, truth):
    _, rows = truth
    inputs = json.loads(run.file("inputs.json").read_text())
    corrupted = {int(c["id"]) for c in inputs["corrupted_ids"]}
    planted = set().union(*(rows[f"corrupted-{kind}"] for kind in drift.CORRUPTIONS))
    assert corrupted == planted
    flag = [f for f in inputs["flags"] if f["code"] == "range-0-255"]
    assert len(flag) == 1 and flag[0]["message"].startswith("2 inputs")


def test_the_sparse_region_the_model_fails_on_is_the_new_background(run, truth):
    _, rows = truth
    outliers = json.loads(run.file("outliers.json").read_text())
    assert outliers["reference_rows"] == drift.SPLIT_SIZES["train"]  # measured against the training split
    named = [r for r in outliers["regions"] if r["low_density_high_error"]]
    assert named
    for region in named:
        ids = {int(i) for i in region["ids"]}
        assert len(ids & rows["new-background"]) / len(ids) >= 0.9
        assert region["error_rate"] > 2 * region["overall_error_rate"]


def test_data_health_json_names_every_planted_problem(run, truth):
    pairs, rows = truth
    record = json.loads(run.file("data_health.json").read_text())
    assert record["skipped"] == {}
    problems = {p["kind"]: p for p in record["problems"]}
    assert {"shift", "duplicates:leak", "duplicates:near", "duplicates:exact", "duplicates:conflicting-label",
            "inputs:range-0-255", "inputs:corrupted"} <= set(problems)
    corrupted = set().union(*(rows[f"corrupted-{kind}"] for kind in drift.CORRUPTIONS))
    assert set(problems["inputs:corrupted"]["ids"]) == corrupted
    assert set(problems["inputs:range-0-255"]["ids"]) == rows["corrupted-unnormalised"]
    conflicting = set().union(*pairs["conflicting-label"])
    assert set(problems["duplicates:conflicting-label"]["ids"]) == conflicting
    leak_ids = set(problems["duplicates:leak"]["ids"])
    assert rows["exact-leak"] <= leak_ids and len(rows["near-leak"] & leak_ids) >= 27
    assert all(p["page"] == "health" for p in record["problems"])


def test_the_model_fails_on_the_new_background_and_not_on_the_leaks(run, truth):
    _, rows = truth
    samples = run.samples.set_index("id")
    test = samples[samples["split"] == "test"]
    new = samples.loc[sorted(rows["new-background"]), "correct"].mean()
    leaks = samples.loc[sorted(rows["exact-leak"] | rows["near-leak"]), "correct"].mean()
    assert new < 0.85 and leaks == 1.0
    shipped = json.loads((WEIGHTS_DIR / "drift.json").read_text())
    assert test["correct"].mean() == pytest.approx(shipped["test_accuracy"])


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    """The drift model run on each split alone, each split an .npz of its own: two runs of one model over
    different data, as a dataset that arrives after the test run would be."""
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run

    root = tmp_path_factory.mktemp("drift-split-runs")
    runs = {}
    for split in drift.RUN_SPLITS:
        data = drift.load_data(split)
        np.savez(root / f"{split}.npz", x=data.x, y=data.y, ids=data.ids,
                 background=np.asarray(data.metadata["background"], dtype=str))
        runs[split] = open_run(run_analysis("sample:drift", str(root / f"{split}.npz"), root / split,
                                            analyses=["evaluation"]))
    return runs


def test_shift_between_two_runs_is_the_split_runs_shift(run, split_runs):
    """run_shift of the two single-split runs against the split run's own shift.json: the same embeddings give the
    same AUC and MMD, and the label's chi-square is scipy's on the two label counts."""
    from scipy.stats import chi2_contingency

    from analyzers.data_health.shift import run_shift

    pair = run_shift(split_runs["train"], split_runs["test"])
    stored = json.loads(run.file("shift.json").read_text())["pairs"][0]
    assert (pair["a"], pair["b"]) == ("train", "test")
    assert pair["domain_auc"] == pytest.approx(stored["domain_auc"], abs=1e-9) and pair["domain_auc"] > 0.9
    assert pair["mmd"] == pytest.approx(stored["mmd"], rel=1e-6) and pair["mmd_p"] == stored["mmd_p"]
    features = {f["feature"]: f for f in pair["features"]}
    assert features["background"]["shifted"]
    counts = [np.bincount(split_runs[s].samples["label"], minlength=3) for s in drift.RUN_SPLITS]
    assert features["label (class)"]["p_value"] == pytest.approx(chi2_contingency(counts, correction=False)[1])
    test_ids = set(split_runs["test"].samples["id"].tolist())
    assert {e["id"] for e in pair["embedding"]["top_b"]} <= test_ids


def test_shift_between_runs_needs_one_model_and_two_datasets(split_runs):
    import copy

    from analyzers.data_health.shift import run_shift
    from analyzers.errors import AnalyzerError

    with pytest.raises(AnalyzerError, match="same data"):
        run_shift(split_runs["test"], split_runs["test"])
    other = copy.copy(split_runs["test"])
    object.__setattr__(other, "info", {**other.info, "model": {**other.info["model"], "sha256": "0" * 64}})
    with pytest.raises(AnalyzerError, match="different models"):
        run_shift(split_runs["train"], other)
