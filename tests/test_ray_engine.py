"""`--engine ray`: inference in a Ray Data actor pool gives the run an in-process run gives, on one file or shards.

Ray runs on one local cluster for this file (`ray.init(num_cpus=2)`), and the last test on a simulated cluster of two
nodes (`ray.cluster_utils.Cluster`), whose actors load the model from bytes in the object store.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, confusion_matrix

from analyzers.engines.pipeline import run_analysis
from analyzers.errors import AnalyzerError
from analyzers.evaluation.aggregates import PartialAggregates
from analyzers.evaluation.tasks import Classification
from analyzers.loading.datasets import load_dataset
from analyzers.loading.models import load_model
from analyzers.loading.run_checks import RunDamaged
from analyzers.loading.runs import SAMPLES, SAMPLES_DIR, open_run

try:
    import ray
except ImportError:  # the extra is installed by `make test`; a plain set-up skips here, CI must not
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("Ray is not installed (pip install -r requirements-ray.txt)", allow_module_level=True)

EVAL = ["evaluation"]


@pytest.fixture(scope="module")
def local_ray():
    from analyzers.engines.ray_engine import local_options

    if not ray.is_initialized():
        ray.init(**local_options(2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_runs(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-digits")
    here = run_analysis("sample:digits", "sample:digits", root / "process")
    there = run_analysis("sample:digits", "sample:digits", root / "ray", engine="ray")
    return open_run(here), open_run(there)


def test_a_ray_run_stores_the_samples_probabilities_and_analyses_of_an_in_process_run(digits_runs):
    here, there = digits_runs
    assert there.info["engine"]["name"] == "ray" and here.info["engine"]["name"] == "in-process"
    engine = there.info["engine"]  # where the pipeline's time went, for the benchmark's note
    assert 0 < engine["actor_compute_s"] <= engine["inference_s"] and 0 < engine["blocks_s"] < engine["first_block_s"]
    assert engine["first_block_s"] <= engine["inference_s"]
    assert 0 < engine["actor_init_start_s"] <= engine["actor_init_end_s"] <= engine["first_block_s"]
    assert there.sharded and not (there.path / SAMPLES).exists() and (there.path / SAMPLES_DIR).is_dir()
    pd.testing.assert_frame_equal(there.samples, here.samples)
    np.testing.assert_array_equal(there.probs, here.probs)
    layer = here.info["embedding_layer"]
    np.testing.assert_array_equal(there.read_npy(f"embeddings/{layer}.npy"), here.read_npy(f"embeddings/{layer}.npy"))
    assert {k: v["status"] for k, v in there.info["analyses"].items()} == \
        {k: v["status"] for k, v in here.info["analyses"].items()}
    assert there.read_json("metrics.json") == here.read_json("metrics.json")
    assert there.info["accuracy"] == here.info["accuracy"]


def test_the_aggregates_of_one_pass_match_scikit_learn_over_every_row(digits_runs):
    here, there = digits_runs
    stored = there.read_json("aggregates.json")
    labels, probs = here.samples["label"].to_numpy(), np.asarray(here.probs)
    pred = probs.argmax(1)
    assert stored["count"] == len(labels)
    np.testing.assert_array_equal(stored["confusion"], confusion_matrix(labels, pred, labels=range(probs.shape[1])))
    assert stored["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert stored["mean_loss"] == pytest.approx(here.samples["loss"].mean(), rel=1e-6)
    # calibration: scikit-learn's curve keeps the filled bins only
    observed, predicted = calibration_curve(pred == labels, probs.max(1), n_bins=len(stored["calibration"]["count"]))
    filled = [i for i, c in enumerate(stored["calibration"]["count"]) if c]
    np.testing.assert_allclose([stored["calibration"]["observed"][i] for i in filled], observed, rtol=1e-9)
    np.testing.assert_allclose([stored["calibration"]["mean_predicted"][i] for i in filled], predicted, rtol=1e-6)
    wrong = ~here.samples["correct"]
    by_ink = here.samples.assign(wrong=wrong).groupby(here.samples["ink"].astype(str))["wrong"].agg(["size", "sum"])
    if stored["groups"].get("ink") is not None:  # a measurement of many values is not a grouping
        assert {k: (v["count"], v["error_sum"]) for k, v in stored["groups"]["ink"].items()} == \
            {k: (int(r["size"]), float(r["sum"])) for k, r in by_ink.iterrows()}


def test_partial_aggregates_merge_in_any_order_to_the_partial_of_all_rows():
    rng = np.random.default_rng(3)
    n, k = 1000, 4
    logits = rng.normal(size=(n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, k, n)
    loss = -np.log(probs[np.arange(n), labels])
    site = rng.choice(["north", "south", "east"], n)
    task = Classification(k)
    whole = PartialAggregates.of(task, labels, probs, loss, groups={"site": site})
    cuts = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    pieces = [PartialAggregates.of(task, labels[a:b], probs[a:b], loss[a:b], groups={"site": site[a:b]})
              for a, b in zip([0, *cuts], [*cuts, n])]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged = merged.merge(piece)
    backwards = pieces[-1]
    for piece in reversed(pieces[:-1]):
        backwards = piece.merge(backwards)
    for result in (merged, backwards):
        np.testing.assert_array_equal(result.confusion, confusion_matrix(labels, probs.argmax(1)))
        np.testing.assert_array_equal(result.bin_count, whole.bin_count)
        np.testing.assert_allclose(result.bin_correct_sum, whole.bin_correct_sum)
        assert result.loss_sum == pytest.approx(loss.sum())
        wrong = pd.Series(probs.argmax(1) != labels).groupby(site).agg(["size", "sum"])
        assert result.groups["site"] == {k: [int(r["size"]), float(r["sum"])] for k, r in wrong.iterrows()}
    from analyzers.evaluation.metrics import top_label_bins

    assert merged.calibration.ece == pytest.approx(top_label_bins(labels, probs).ece)


def _write_npz_shards(dataset, directory, cuts):
    directory.mkdir()
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(dataset)])):
        np.savez(directory / f"part-{i}.npz", x=dataset.x[a:b], y=dataset.y[a:b])


def test_shards_in_a_directory_or_a_glob_give_the_run_of_the_one_file_they_were_cut_from(local_ray, tmp_path):
    whole = load_dataset("sample:tabular")
    np.savez(tmp_path / "whole.npz", x=whole.x, y=whole.y)
    cuts = [50, 51, 130]  # parts of 50, 1, 79 and 41 rows: no part a whole number of batches
    _write_npz_shards(whole, tmp_path / "shards", cuts)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(whole)])):
        np.save(pairs / f"p{i}.x.npy", whole.x[a:b])
        np.save(pairs / f"p{i}.y.npy", whole.y[a:b])
    here = open_run(run_analysis("sample:tabular", str(tmp_path / "whole.npz"), tmp_path / "here", batch_size=32,
                                 analyses=EVAL))
    for spec in (str(tmp_path / "shards"), str(pairs / "*.x.npy")):
        there = open_run(run_analysis("sample:tabular", spec, tmp_path / f"ray-{len(spec)}", batch_size=32,
                                      analyses=EVAL, engine="ray", ray_actors=1))
        pd.testing.assert_frame_equal(there.samples, here.samples)
        assert there.samples["id"].tolist() == list(range(len(whole)))  # shards without ids: rows numbered
        assert there.info["dataset"]["spec"] == spec
    # the in-process engine reads the same shards as the same dataset
    again = open_run(run_analysis("sample:tabular", str(tmp_path / "shards"), tmp_path / "again", batch_size=32,
                                  analyses=EVAL))
    pd.testing.assert_frame_equal(again.samples, here.samples)


def test_a_npy_pair_is_read_memory_mapped_and_shard_ids_must_not_repeat(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    np.save(tmp_path / "a.x.npy", x)
    np.save(tmp_path / "a.y.npy", np.arange(20) % 2)
    dataset = load_dataset(str(tmp_path / "a.x.npy"))
    assert isinstance(dataset.x, np.memmap) or isinstance(dataset.x.base, np.memmap)
    np.testing.assert_array_equal(dataset.x, x)
    (tmp_path / "a.y.npy").unlink()
    with pytest.raises(AnalyzerError, match="no 'a.y.npy' beside it"):
        load_dataset(str(tmp_path / "a.x.npy"))
    shards = tmp_path / "ided"
    shards.mkdir()
    for i in range(2):
        np.savez(shards / f"s{i}.npz", x=x[:5], y=np.zeros(5, int), ids=np.array(["a", "b", "c", "d", "e"]))
    with pytest.raises(AnalyzerError, match="ids repeat across the shards"):
        load_dataset(str(shards))
    with pytest.raises(AnalyzerError, match="matches no dataset files"):
        load_dataset(str(tmp_path / "nothing-*.npz"))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_input_blocks_are_the_rows_of_a_mapped_npy_and_the_driver_keeps_none_of_its_pages(local_ray, tmp_path):
    """The driver puts a memory-mapped .npy's rows into the object store a block at a time and hands each block's
    pages back: at 1M rows it had held the whole 256 MB file beside the store's copy."""
    from analyzers.engines.ray_engine import _input_blocks
    from conftest import mapped_rss_kib

    x = np.random.default_rng(0).normal(size=(65_536, 64)).astype(np.float32)  # 16 MiB
    np.save(tmp_path / "big.x.npy", x)
    np.save(tmp_path / "big.y.npy", np.arange(len(x)) % 3)
    dataset = load_dataset(str(tmp_path / "big.x.npy"))
    blocks, step = _input_blocks(local_ray, dataset, batch_size=1024, min_blocks=4)
    assert step % 1024 == 0 and len(blocks) == -(-len(x) // step) >= 4
    assert mapped_rss_kib(tmp_path / "big.x.npy") <= 2 * step * x[:1].nbytes // 1024
    float(np.asarray(dataset.x).sum())  # the control: a plain read of the same map holds every page
    assert mapped_rss_kib(tmp_path / "big.x.npy") >= 0.9 * x.nbytes // 1024
    tables = local_ray.get(blocks)
    np.testing.assert_array_equal(np.concatenate([t.column("x").combine_chunks().to_numpy_ndarray()
                                                  for t in tables]), x)
    np.testing.assert_array_equal(np.concatenate([t.column("row").to_numpy() for t in tables]), np.arange(len(x)))
    np.testing.assert_array_equal(np.concatenate([t.column("y").to_numpy() for t in tables]), np.arange(len(x)) % 3)


def test_a_regression_run_whose_rows_depend_on_each_other_is_the_same_on_ray(local_ray, tmp_path):
    here = open_run(run_analysis("sample:prices", "sample:prices", tmp_path / "here", analyses=EVAL))
    there = open_run(run_analysis("sample:prices", "sample:prices", tmp_path / "ray", analyses=EVAL, engine="ray"))
    pd.testing.assert_frame_equal(there.samples, here.samples)  # wrong: the top 10% of every row's error
    assert there.read_json("aggregates.json")["mean_error"] == pytest.approx(here.samples["abs_error"].mean())


def test_an_exported_model_runs_in_each_actors_sandbox_and_a_hostile_one_never_reaches_ray(local_ray, tmp_path):
    from analyzers.loading.sandbox import sandbox_support
    from conftest import export_model
    from crafted_archives import CRAFTED, EXPECTED

    support = sandbox_support()
    if support.level != "full" and os.environ.get("CI") != "true":
        pytest.skip(f"the full sandbox is not available here: {support.reason}")
    module = load_model("sample:digits").module.eval()
    path = export_model(module, torch.zeros(2, 1, 8, 8), tmp_path / "digits.pt2")
    here = open_run(run_analysis(str(path), "sample:digits", tmp_path / "here", analyses=EVAL))
    there = open_run(run_analysis(str(path), "sample:digits", tmp_path / "ray", analyses=EVAL, engine="ray"))
    assert there.info["sandbox"]["level"] == "full"
    pd.testing.assert_frame_equal(there.samples, here.samples)
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_text("untouched")
    hostile = tmp_path / "hostile.pt2"
    hostile.write_bytes(CRAFTED["expr_str in a size"](path.read_bytes(), marker, victim))
    with pytest.raises(AnalyzerError, match=EXPECTED["expr_str in a size"]):
        run_analysis(str(hostile), "sample:digits", tmp_path / "hostile-run", engine="ray")
    assert not marker.exists() and victim.read_text() == "untouched" and not (tmp_path / "hostile-run").exists()


def test_the_command_line_runs_on_ray_and_refuses_ray_options_without_it(local_ray, tmp_path, capsys):
    from analyzers.__main__ import main

    out = tmp_path / "cli"
    assert main(["run", "--model", "sample:tabular", "--data", "sample:tabular", "--out", str(out), "--engine", "ray",
                 "--ray-actors", "1", "--analyses", "evaluation"]) == 0
    assert open_run(out).info["engine"]["actors"] == 1
    assert main(["run", "--model", "sample:tabular", "--data", "sample:tabular", "--out", str(tmp_path / "x"),
                 "--ray-actors", "2"]) == 1
    assert "apply to --engine ray only" in capsys.readouterr().err
    assert main(["run", "--model", "sample:tabular", "--data", "sample:tabular", "--out", str(tmp_path / "y"),
                 "--engine", "ray", "--ray-actors", "0"]) == 1
    assert "--ray-actors must be a whole number of at least 1" in capsys.readouterr().err


def test_a_damaged_part_of_a_sharded_run_is_named_in_one_line(digits_runs, tmp_path):
    _, there = digits_runs
    copy = tmp_path / "copy"
    shutil.copytree(there.path, copy)
    part = sorted((copy / SAMPLES_DIR).glob("part-*.parquet"))[0]
    part.write_bytes(b"PAR1garbage")
    with pytest.raises(RunDamaged, match=f"{SAMPLES_DIR} in the run at .* is damaged"):
        open_run(copy)


def test_on_two_nodes_the_actors_share_the_work_and_give_the_same_run(local_ray, tmp_path):
    """Last in the file: it replaces the local Ray with a simulated cluster of a head and a worker node."""
    from ray.cluster_utils import Cluster

    from analyzers.engines.ray_engine import init_options

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, **init_options())
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # batches of 16: 8 blocks, which the two actors share
        there = open_run(run_analysis("sample:digits", "sample:digits", tmp_path / "two", engine="ray",
                                      ray_actors=2, batch_size=16, analyses=EVAL))
        here = open_run(run_analysis("sample:digits", "sample:digits", tmp_path / "here", batch_size=16,
                                     analyses=EVAL))
        assert there.info["engine"]["nodes"] == 2 and there.info["engine"]["blocks"] == 8  # an actor on each node
        pd.testing.assert_frame_equal(there.samples, here.samples)
        np.testing.assert_array_equal(there.probs, here.probs)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_explanations_of_chosen_ids_on_ray_are_the_in_process_ones(local_ray, digits_runs, tmp_path, monkeypatch):
    """`explain --engine ray`: an actor pool computes the maps and scores of chosen samples in blocks (here two of
    24 samples, in batches of 8) and the run stores what an in-process explanation stores: the same maps, ids and
    targets, the same faithfulness and sanity scores, for deterministic methods and for the random ones, whose
    draws are each sample's own (in-process, one call explains all 40 samples; on Ray, one call per block)."""
    from analyzers.explanations.explain_run import EXPLANATIONS, FAITHFULNESS, explain_run

    here, _ = digits_runs
    ids = [str(i) for i in here.samples["id"].iloc[3:43]]
    # SHAP's and LIME's randomisation checks take 15 s each here: they are compared on 12 samples without it, in
    # batches of 4 (on Ray two blocks, of 8 and 4 samples), SmoothGrad with it, as the deterministic methods
    calls = [(["saliency", "integrated_gradients", "smoothgrad"], ids, 8, True), (["shap", "lime"], ids[:12], 4, False)]
    runs = {}
    for engine in ("process", "ray"):
        runs[engine] = tmp_path / engine
        shutil.copytree(here.path, runs[engine], ignore=shutil.ignore_patterns(EXPLANATIONS))
        if engine == "ray":  # computed in the actors' processes, never in this one
            import analyzers.explanations.explain_run as module

            monkeypatch.setattr(module, "score_samples", lambda *a, **k: pytest.fail("computed in the driver"))
        for methods, chosen, batch_size, sanity in calls:
            result = explain_run(runs[engine], chosen, methods, batch_size=batch_size, engine=engine, sanity=sanity,
                                 ray_actors=1 if engine == "ray" else None)
            assert not result.skipped and len(result.scores) == len(chosen) * len(methods)
    for method, chosen in ((m, chosen) for methods, chosen, _, _ in calls for m in methods):
        a, b = (np.load(runs[e] / EXPLANATIONS / method / "pred.npz") for e in ("process", "ray"))
        assert list(a["ids"]) == list(b["ids"]) == chosen
        np.testing.assert_array_equal(a["targets"], b["targets"])
        np.testing.assert_allclose(b["attributions"], a["attributions"], rtol=1e-5, atol=1e-7)
    tables = {e: pd.read_parquet(runs[e] / FAITHFULNESS).drop(columns=["created"]) for e in runs}
    pd.testing.assert_frame_equal(tables["ray"], tables["process"], check_exact=False, rtol=1e-4, atol=1e-6)
    checked = tables["ray"]["method"].isin(calls[0][0])
    assert tables["ray"].loc[checked, "sanity_samples"].gt(0).all()  # the randomisation check ran in the actors
    assert tables["ray"].loc[~checked, "sanity_samples"].eq(0).all()
    with pytest.raises(AnalyzerError, match="engine ray"):
        explain_run(runs["process"], ids[:2], "saliency", ray_actors=2)


def test_projections_fitted_on_a_sample_are_placed_in_an_actor_pool_as_here(local_ray, monkeypatch):
    """A Ray run's projections (RunContext.map_rows): fitted on a sample in the driver, the rows projected onto
    PCA's axes and the points not fitted placed by their neighbours in an actor pool, in blocks. The coordinates
    are those made in one process, on three blocks of PCA's 25k points and five of t-SNE's placed points."""
    from functools import partial

    from analyzers.engines.ray_engine import map_rows_on_ray
    from analyzers.explanations.projections import PCA_FIT_SAMPLE, project

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 16)) * 4
    x = (centres[rng.integers(0, 4, PCA_FIT_SAMPLE + 5000)] + rng.normal(size=(PCA_FIT_SAMPLE + 5000, 16)))
    x = x.astype(np.float32)
    on_ray = partial(map_rows_on_ray, actors=1, block_rows=10_000)
    here, there = project(x, method="pca"), project(x, method="pca", map_rows=on_ray)
    assert here.params["sampled"] and there.params["sampled"]
    np.testing.assert_allclose(there.coords, here.coords, rtol=1e-5, atol=1e-5)
    few = x[:1500]
    on_ray = partial(map_rows_on_ray, actors=1, block_rows=300)
    here = project(few, method="tsne", fit_sample=200, seed=3)
    import analyzers.explanations.projections as projections

    # placed in the actors' processes, never in this one
    monkeypatch.setattr(projections.NeighbourPlacement, "__call__", lambda *a: pytest.fail("placed in the driver"))
    there = project(few, method="tsne", fit_sample=200, seed=3, map_rows=on_ray)
    assert int(here.fitted.sum()) == 200 and here.params["placement"] == "knn"
    np.testing.assert_array_equal(there.coords, here.coords)


def test_explanations_on_ray_of_a_model_file_of_another_task_are_refused_in_one_line():
    """Explanations of a regression or multi-label model file on Ray (each actor's sandboxed worker) have no test of
    their maps and scores yet: they are refused before Ray starts."""
    from types import SimpleNamespace

    from analyzers.engines.ray_engine import explain_on_ray

    for task in ("regression", "multilabel"):
        run = SimpleNamespace(info={"model": {"spec": "/models/net.pt2", "source": "file"}, "parameters": {}},
                              task=task)
        with pytest.raises(AnalyzerError, match=f"explanations on Ray of a {task} model file") as caught:
            explain_on_ray(run, None, np.zeros((2, 3)), np.zeros(2), None, {"saliency": {}}, background=None,
                           probe=None, batch_size=2, sanity=False, seed=0)
        assert "\n" not in str(caught.value) and "without --engine ray" in str(caught.value)


def test_a_regression_model_file_on_ray_gives_the_in_process_run(local_ray, tmp_path):
    """A model file runs in each actor's sandboxed worker, which loads no dataset: it is read for the run's task
    there (a regression's output is its value). The Ray run's predictions and losses are the in-process run's."""
    from conftest import export_model
    from test_regression_runs import _planted_regression, _Planted

    x, y = _planted_regression()
    np.savez(tmp_path / "prices.npz", x=x, y=y)
    export_model(_Planted().eval(), torch.zeros(2, 4), tmp_path / "prices.pt2")
    runs = [open_run(run_analysis(str(tmp_path / "prices.pt2"), str(tmp_path / "prices.npz"), tmp_path / engine,
                                  analyses=EVAL, engine=engine)) for engine in ("process", "ray")]
    assert runs[1].task == "regression"
    np.testing.assert_allclose(runs[1].samples["prediction"], runs[0].samples["prediction"], rtol=1e-6)
    np.testing.assert_allclose(runs[1].samples["loss"], runs[0].samples["loss"], rtol=1e-5)
