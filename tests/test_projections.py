"""Projections: PCA against scikit-learn, t-SNE/UMAP recover planted clusters, fit-on-sample is recorded, run files."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from analyzers.errors import AnalyzerError
from analyzers.explanations.projections import (collect_embeddings, ensure_embeddings, ensure_projection, place_by_neighbours,
                                   project, projection_relpath)


def _blobs(n=300, features=20, seed=0):
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n, n_features=features, centers=3, cluster_std=1.0, center_box=(-20, 20), random_state=seed)
    return x.astype(np.float32), y


def _knn_recovery(coords, labels) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(5), coords, labels, cv=5).mean())


def test_pca_equals_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 12)) * np.linspace(5, 0.5, 12)).astype(np.float32)
    for dims in (2, 3):
        got = project(x, method="pca", dims=dims)
        want = PCA(dims, svd_solver="full").fit_transform(x.astype(np.float64))
        signs = np.sign((got.coords * want).sum(axis=0))
        np.testing.assert_allclose(got.coords * signs, want, atol=1e-3, rtol=1e-3)
        assert got.coords.dtype == np.float32 and got.coords.shape == (400, dims)
        assert got.fitted.all() and got.params["sampled"] is False
        assert len(got.params["explained_variance_ratio"]) == dims


def test_pca_of_many_points_is_fitted_on_a_sample_and_says_so():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(25_000, 8)) * np.array([6, 3, 1, 1, 1, 1, 1, 1])).astype(np.float32)
    got = project(x, method="pca", dims=2)
    assert got.params["sampled"] is True and got.params["n_fitted"] == 20_000 and got.fitted.sum() == 20_000
    want = PCA(2, svd_solver="full").fit_transform(x.astype(np.float64))
    signs = np.sign((got.coords * want).sum(axis=0))
    # axes from 20k of 25k rows: the same up to sampling noise, relative to each component's spread
    assert np.abs(got.coords * signs - want).max(axis=0).max() < 0.05 * want.std(axis=0).min()


def test_pca_in_blocks_equals_pca_in_one_and_counts_bad_rows_in_any_block(monkeypatch, tmp_path):
    """The checks and the projection onto the axes go BLOCK_BYTES at a time (a 640 MB embedding file had been held
    whole, and centred in a copy): in blocks of 997 rows, from a file's map, the coordinates are those of one block."""
    from analyzers.explanations import projections

    x = (np.random.default_rng(2).normal(size=(24_000, 8)) * np.arange(8, 0, -1)).astype(np.float32)
    whole = project(x, method="pca", dims=2)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(projections, "BLOCK_BYTES", 997 * x[:1].nbytes)
    blocked = project(np.load(tmp_path / "x.npy", mmap_mode="r"), method="pca", dims=2)
    np.testing.assert_allclose(blocked.coords, whole.coords, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(blocked.fitted, whole.fitted)
    x[[5, 10_000, 23_999], [0, 3, 7]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(AnalyzerError, match="^3 embedding rows hold NaN or inf"):
        project(x, method="pca", dims=2)


def test_pca_of_many_wide_embeddings_uses_a_fast_solver():
    x = np.random.default_rng(0).normal(size=(5000, 600)).astype(np.float32)
    got = project(x, method="pca", dims=2)
    assert got.params["svd_solver"] in ("randomized", "covariance_eigh", "arpack")


def test_tsne_recovers_blobs_when_fitted_on_a_sample():
    x, y = _blobs()
    got = project(x, method="tsne", dims=2, fit_sample=200, n_jobs=1)
    assert got.coords.shape == (300, 2) and np.isfinite(got.coords).all()
    assert _knn_recovery(got.coords, y) >= 0.95
    # what was sampled is said, and marked per point
    assert got.params["n_fitted"] == 200 and got.params["sampled"] is True and got.params["placement"] == "knn"
    assert got.fitted.sum() == 200 and got.params["tsne"]["perplexity"] == 30.0
    assert got.params["pca_before"] is None  # 20 features are fewer than the 50 PCA dimensions
    assert {"fit", "placement"} <= set(got.timings)


def test_tsne_takes_exact_neighbours_up_to_its_limit_at_the_kl_of_approximate_ones(monkeypatch):
    """Exact neighbours up to TSNE_EXACT_NEIGHBOURS fitted points (4x faster than Annoy's at 10k): the fit's KL
    divergence is that of openTSNE's own choice (Annoy) within 2%, and above the limit openTSNE chooses."""
    from openTSNE import TSNE

    from analyzers.explanations import projections

    x, labels = _blobs(1500, features=10)
    got = project(x, method="tsne", dims=2, seed=0)
    assert got.params["tsne"]["neighbors"] == "exact"
    approximate = TSNE(perplexity=30, neighbors="annoy", random_state=0, n_jobs=1).fit(x)
    assert got.params["tsne"]["kl_divergence"] == pytest.approx(float(approximate.kl_divergence), rel=0.02)
    assert _knn_recovery(got.coords, labels) >= 0.95
    monkeypatch.setattr(projections, "TSNE_EXACT_NEIGHBOURS", 1000)
    assert project(x, method="tsne", dims=2, seed=0, n_epochs=50).params["tsne"]["neighbors"] == "auto"


def test_tsne_transform_placement_and_3d():
    x, y = _blobs(200, features=60)
    got = project(x, method="tsne", dims=3, fit_sample=150, placement="transform", n_jobs=1)
    assert got.coords.shape == (200, 3)
    assert got.params["pca_before"]["n_components"] == 50 and got.params["tsne"]["negative_gradient_method"] == "bh"
    assert _knn_recovery(got.coords, y) >= 0.95


def test_knn_placement_puts_new_points_in_their_cluster():
    fit_x = np.array([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], np.float32)
    fit_coords = np.array([[-5, -5]] * 3 + [[5, 5]] * 3, np.float32)
    placed = place_by_neighbours(fit_x, fit_coords, np.array([[0.5, 0.5], [10.5, 10.2]], np.float32), k=3)
    np.testing.assert_array_equal(placed, [[-5, -5], [5, 5]])


@pytest.mark.benchmark
def test_umap_recovers_blobs_when_fitted_on_a_sample():
    # cold, umap-learn compiles for about a minute; with .numba_cache warm this takes seconds
    x, y = _blobs()
    got = project(x, method="umap", dims=2, fit_sample=200)
    assert _knn_recovery(got.coords, y) >= 0.95
    assert got.params["n_fitted"] == 200 and got.fitted.sum() == 200
    assert got.params["umap"]["n_neighbors"] == 15


def test_umap_configuration_without_fitting(monkeypatch, tmp_path):
    import sys

    from analyzers.explanations import projections

    if "numba" in sys.modules:  # keep numba's own setting as it was for the rest of the session
        monkeypatch.setattr(sys.modules["numba"].config, "CACHE_DIR", sys.modules["numba"].config.CACHE_DIR)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert projections._configure_numba_cache() == str(projections.NUMBA_CACHE_DIR)
    assert os.environ["NUMBA_CACHE_DIR"].endswith(".numba_cache")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert projections._configure_numba_cache() == str(tmp_path)  # a directory the user chose is kept
    with pytest.raises(AnalyzerError, match="dims must be 2 or 3"):
        project(np.zeros((50, 4)), method="umap", dims=4)


@pytest.mark.parametrize("bad, message", [
    (dict(method="lle"), "unknown projection method"),
    (dict(placement="nearest"), "placement must be"),
    (dict(fit_sample=3), "fit_sample must be at least"),
])
def test_bad_options_are_refused(bad, message):
    with pytest.raises(AnalyzerError, match=message):
        project(np.zeros((50, 4), np.float32), **bad)


def test_bad_embeddings_are_refused():
    with pytest.raises(AnalyzerError, match="NaN or inf"):
        project(np.full((20, 4), np.nan))
    with pytest.raises(AnalyzerError, match="fewer than the 3 dimensions"):
        project(np.ones((20, 2)), dims=3)
    with pytest.raises(AnalyzerError, match="too few"):
        project(np.ones((3, 8)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run made through the command line, `python -m analyzers run`, with the two stages of this issue."""
    from analyzers.__main__ import main

    out = tmp_path_factory.mktemp("proj") / "run"
    assert main(["run", "--model", "sample:digits", "--data", "sample:digits", "--out", str(out),
                 "--analyses", "projections,gradients"]) == 0
    return out


def test_run_stores_embeddings_pca_and_gradient_traces(digits_run):
    from analyzers.loading.runs import open_run

    from analyzers.engines.pipeline import STAGES

    assert {"projections", "gradients"} <= {name for name, _, on in STAGES if on}  # a plain run includes both
    run = open_run(digits_run)
    layer = run.info["embedding_layer"]
    assert layer == "fc2"
    embeddings = run.read_npy(f"embeddings/{layer}.npy")
    assert embeddings.shape == (len(run.samples), 64)
    for dims, axes in ((2, ["x", "y"]), (3, ["x", "y", "z"])):
        table = run.read_parquet(projection_relpath(layer, "pca", dims))
        assert list(table.columns) == ["id", *axes]
        # keyed by id: the join with samples.parquet gives every sample its coordinates
        joined = run.samples.merge(table, on="id", validate="one_to_one")
        assert len(joined) == len(run.samples)
        from sklearn.decomposition import PCA

        want = PCA(dims, svd_solver="full").fit_transform(np.asarray(embeddings, np.float64))
        got = table[axes].to_numpy()
        np.testing.assert_allclose(np.abs(got), np.abs(want), atol=1e-2, rtol=1e-3)
    assert run.info["analyses"]["projections"]["projections"]["pca-2d"]["file"] == "projections/fc2-pca-2d.parquet"
    traces = run.read_parquet("gradients/traces.parquet")
    assert {"batch", "layer", "kind", "grad_norm", "weight_norm", "ratio"} <= set(traces.columns)
    # 450 samples in 8 batches of 64: the eighth would hold 2 and is left out (issue 18, item 7), and said
    assert set(traces["layer"]) == {"conv1", "conv2", "fc1", "fc2"} and traces["batch"].nunique() == 7
    assert run.read_json("gradients/flags.json")["params"]["dropped_partial_batch"] == 2
    assert set(run.read_parquet("gradients/dead_units.parquet")["layer"]) == {"relu1", "relu2", "relu3"}
    assert run.read_json("gradients/flags.json")["inplace_activations"] == []
    from analyzers.training.recorder import read_training_log

    steps, validation, norms = read_training_log(run.file("training/log.jsonl"))
    assert len(steps) > 0 and "loss" in steps and "fc2" in norms
    assert "gradients" in run.info["timings_s"] and "inference" in run.info["timings_s"]


def test_ensure_projection_computes_once_and_caches(digits_run):
    from analyzers.loading.runs import open_run

    run = open_run(digits_run)
    table = ensure_projection(run, method="tsne", dims=2, fit_sample=300, n_jobs=1)
    path = run.file("projections/fc2-tsne-2d.parquet")
    assert path.exists() and list(table.columns) == ["id", "x", "y", "fitted"]
    assert table["fitted"].sum() == 300
    pd.testing.assert_series_equal(table["id"], run.samples["id"], check_names=False)
    # the learned map separates the digit classes (independent check: kNN accuracy on the 2-D map)
    assert _knn_recovery(table[["x", "y"]].to_numpy(), run.samples["label"].to_numpy()) >= 0.8
    record = run.read_json("projections/fc2-tsne-2d.json")
    assert record["params"]["n_fitted"] == 300 and record["options"]["fit_sample"] == 300
    stamp = path.stat().st_mtime_ns
    again = ensure_projection(digits_run, "fc2", "tsne", 2, fit_sample=300, n_jobs=1)
    assert path.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, table)


def test_a_run_without_its_pca_has_it_made_once_by_the_dashboards_warm_up(digits_run, tmp_path, monkeypatch):
    """A run whose stages made no projection (the 10M-row benchmark's): the warm-up stores the 2-D PCA the
    Embeddings page opens on, equal to `project` of the stored embeddings, and a page asking while it is made
    waits for that one rather than making a second."""
    import shutil
    import threading
    import time

    from analyzers.explanations import projections
    from analyzers.loading.runs import open_run
    from dashboard import data

    copy = tmp_path / "run"
    shutil.copytree(digits_run, copy, ignore=shutil.ignore_patterns("projections"))
    run = open_run(copy)
    relpath = projection_relpath("fc2", "pca", 2)
    assert data._missing_pca(run) == "fc2" and not run.has(relpath)
    made, slow = [], projections.ensure_projection

    def counted(*args, **kwargs):
        made.append(threading.current_thread().name)
        time.sleep(0.5)  # a 10M-row run's PCA: the page asks meanwhile
        return slow(*args, **kwargs)

    monkeypatch.setattr(projections, "ensure_projection", counted)
    warming = threading.Thread(target=data._warm_projection, args=(run,), name="warm-up")
    warming.start()
    time.sleep(0.1)
    shown = data.projection(run, "fc2", "pca")
    warming.join()
    assert made == ["warm-up"] and run.has(relpath) and data._missing_pca(run) is None
    reference = project(np.load(copy / "embeddings" / "fc2.npy"), method="pca", dims=2, seed=0)
    np.testing.assert_allclose(shown[["x", "y"]].to_numpy(), reference.coords, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shown["id"].to_numpy(), run.sample_table["id"].to_numpy())


def test_collect_embeddings_of_another_layer_is_cached_in_the_run(digits_run):
    from analyzers.engines.pipeline import load_run_inputs
    from analyzers.loading.runs import open_run

    run = open_run(digits_run)
    with pytest.raises(AnalyzerError, match="no embeddings of layer 'fc1'"):
        ensure_projection(run, "fc1", "pca", 2)
    model, dataset = load_run_inputs(run)
    got = collect_embeddings(model, dataset.x, "fc1", batch_size=100, run=run)
    with torch.no_grad():
        want = model.module[:7](torch.as_tensor(dataset.x)).numpy()  # conv1 .. fc1 of the Sequential
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert run.has("embeddings/fc1.npy")
    conv2 = ensure_embeddings(digits_run, "conv2", batch_size=64)  # loads the run's own model and data
    with torch.no_grad():
        np.testing.assert_allclose(conv2, model.module[:3](torch.as_tensor(dataset.x)).flatten(1).numpy(), atol=1e-5)
    assert run.has("embeddings/conv2.npy") and ensure_embeddings(run, "conv2").shape == (len(dataset.x), 32 * 8 * 8)
    table = ensure_projection(run, "fc1", "pca", 3)
    assert list(table.columns) == ["id", "x", "y", "z"]
    with pytest.raises(AnalyzerError, match="not a layer name"):
        collect_embeddings(model, dataset.x, "../x", run=run)


def test_collected_activations_are_the_layers_own_even_before_an_inplace_relu():
    from analyzers.loading.models import wrap_module

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(inplace=True), torch.nn.Linear(5, 2)).eval()
    loaded = wrap_module(module, (6,))
    assert loaded.inplace_activations == ("1",)
    x = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    got = collect_embeddings(loaded, x, "0", batch_size=7)
    with torch.no_grad():
        want = module[0](torch.as_tensor(x)).numpy()
    assert (want < 0).any()  # post-ReLU values would have no negatives
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_stage_options_make_tsne_in_the_run(tmp_path):
    from analyzers.engines.pipeline import run_analysis
    from analyzers.loading.runs import open_run

    with pytest.raises(AnalyzerError, match="unknown projection method"):
        run_analysis("sample:digits", "sample:digits", tmp_path / "bad", analyses=["projections"],
                     stage_options={"projections": {"methods": ["mds"]}})
    run = open_run(run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=["projections"],
                                stage_options={"projections": {"methods": ["tsne"], "dims": [2]}}))
    table = run.read_parquet("projections/fc2-tsne-2d.parquet")
    assert list(table.columns) == ["id", "x", "y", "fitted"] and table["fitted"].all()
    assert not run.has("projections/fc2-tsne-3d.parquet") and not run.has("projections/fc2-pca-2d.parquet")
    # ensure_projection finds the stage's table instead of computing it again
    stamp = run.file("projections/fc2-tsne-2d.parquet").stat().st_mtime_ns
    pd.testing.assert_frame_equal(ensure_projection(run, method="tsne"), table)
    assert run.file("projections/fc2-tsne-2d.parquet").stat().st_mtime_ns == stamp



def test_default_samples_are_10k_and_5k_for_3d_tsne():
    x, _ = _blobs(40, features=5)
    assert project(x, method="tsne", dims=3).params["fit_sample"] == 5_000
    assert project(x, method="tsne", dims=2).params["fit_sample"] == 10_000


def test_progress_rises_to_one_and_an_exception_from_it_stops_the_optimisation(monkeypatch):
    """issue 18: t-SNE and UMAP tell how far they are from inside their optimisation, and a cancel stops them."""
    from analyzers.explanations import projections

    projections._configure_numba_cache()
    import umap

    # The progress comes from umap-learn's epoch loop, which is the same whatever found the neighbours: exact
    # neighbours (umap-learn's own path below 4096 points) spare this test pynndescent's NN-descent compile, which
    # took most of this test's time (a cold fit of 150 points: about 80 s with it, 20 s without, on 2 busy cores)
    made = []

    def exact_neighbours(*args, **kwargs):
        made.append(kwargs.get("force_approximation_algorithm"))
        return real_umap(*args, **{**kwargs, "force_approximation_algorithm": False})

    real_umap = umap.UMAP
    monkeypatch.setattr(umap, "UMAP", exact_neighbours)
    x, _ = _blobs(150)
    for method in ("tsne", "umap"):
        seen = []
        project(x, method=method, n_epochs=100, progress=lambda f, stage: seen.append(f))
        assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 4

        class Cancelled(Exception):
            pass

        def cancel_halfway(fraction, stage):
            if fraction > 0.5:
                raise Cancelled(stage)

        with pytest.raises(Cancelled, match="iteration"):  # inside the iterations, not after them
            project(x, method=method, n_epochs=100, progress=cancel_halfway)
    assert made == [True, True]  # both UMAP projections went through umap-learn, which project() asks for NN-descent


def test_the_projection_helper_reports_progress_stores_the_same_map_and_cancels(digits_run, tmp_path):
    """issue 18: a projection in the helper process gives the table ensure_projection gives in this process, its
    progress moves while it runs, and a cancelled one ends the helper and stores nothing."""
    import shutil
    import time

    from analyzers.engines.projector import Projector
    from analyzers.loading.runs import open_run

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    run = open_run(run_dir)
    layer = run.info["embedding_layer"]
    projector = Projector()
    try:
        job = projector.submit(run_dir, layer, "tsne")
        fractions = []
        while job.state == "running" and job.elapsed_s < 120:
            fractions.append(job.fraction)
            time.sleep(0.05)
        assert job.state == "done", job.error
        assert len(set(fractions)) >= 3 and fractions == sorted(fractions)
        stored = pd.read_parquet(run_dir / projection_relpath(layer, "tsne", 2))
        (run_dir / projection_relpath(layer, "tsne", 2)).unlink()
        here = ensure_projection(run, layer, "tsne", 2)
        pd.testing.assert_frame_equal(stored, here)

        job = projector.submit(run_dir, layer, "umap")
        while job.fraction == 0.0 and job.elapsed_s < 60:
            time.sleep(0.05)
        helper = projector._process
        job.cancel()
        assert job.state == "cancelled" and helper.wait(timeout=10) != 0
        assert not (run_dir / projection_relpath(layer, "umap", 2)).exists()
        job = projector.submit(run_dir, "no-such-layer", "tsne")  # a new helper takes the next request
        while job.state == "running" and job.elapsed_s < 60:
            time.sleep(0.05)
        assert job.state == "failed" and "no embeddings of layer 'no-such-layer'" in job.error
    finally:
        projector.close()
