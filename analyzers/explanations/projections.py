"""Embedding projections: PCA (always, in the run), t-SNE (openTSNE) and UMAP (umap-learn) on demand.

t-SNE and UMAP cost seconds per thousand points, so they are fitted on a random sample (at most `fit_sample` points,
after PCA to 50 dimensions) and the remaining points are placed into the fitted map with the library's `transform`.
What was sampled is recorded in `Projection.params` and in the `fitted` column of the stored table.

Run files: `projections/<LAYER>-<METHOD>-<D>d.parquet` (columns id, x, y[, z][, fitted]) keyed by sample id, so
any colouring is a join with `samples.parquet`, and `projections/<LAYER>-<METHOD>-<D>d.json` with the parameters
and timings.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..arrays import all_finite, row_blocks, rows_per_block, take_rows
from ..errors import AnalyzerError, InvalidOption

METHODS = ("pca", "tsne", "umap")
DEFAULT_FIT_SAMPLE = 10_000
# 3-D t-SNE has no FFT gradient: Barnes-Hut on 10k points took 67 s of CPU (2-D FFT: 15 s), so it fits on fewer
TSNE_3D_FIT_SAMPLE = 5_000
PCA_DIMS_BEFORE_NEIGHBOURS = 50  # t-SNE and UMAP see the top principal components, not the raw activations
TSNE_EXACT_NEIGHBOURS = 20_000  # t-SNE's neighbours are found exactly up to this many fitted points (see _fit_tsne)
FFT_INTERPOLATION_POINTS = 2  # t-SNE's FFT gradient: interpolation points per interval (see _fit_tsne)
NUMBA_CACHE_DIR = Path(__file__).resolve().parents[1] / ".numba_cache"
AXES = ("x", "y", "z")
KNN_PLACEMENT_K = 10
PCA_FIT_SAMPLE = 20_000
BLOCK_BYTES = 32 << 20  # row-wise steps over all the embeddings (checks, PCA's projection) go this much at a time


@dataclass(frozen=True)
class Projection:
    coords: np.ndarray  # (N, dims) float32, row i belongs to embedding row i
    method: str
    dims: int
    fitted: np.ndarray  # (N,) bool: True for the points the method was fitted on, False for points placed afterwards
    params: dict  # everything needed to reproduce it, including how many points were fitted and how they were chosen
    timings: dict  # seconds per step


def _as_matrix(embeddings) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim == 1 or x.ndim == 0:
        raise AnalyzerError(f"embeddings must have one row per sample, got shape {x.shape}: pass an (N, D) array")
    x = x.reshape(len(x), -1)
    if not np.issubdtype(x.dtype, np.number):
        raise AnalyzerError(f"embeddings must be numeric, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    # checked a block at a time (np.isfinite of 10M x 16 activations is a 160 MB mask), rows counted only when a value
    # is bad: all(axis=1) took 0.24 s over those 10M rows, all() 0.04 s
    if not all_finite(x):
        bad = sum(int((~np.isfinite(block).all(axis=1)).sum())
                  for _, _, block in row_blocks(x, rows_per_block(x, BLOCK_BYTES)))
        raise AnalyzerError(f"{bad} embedding rows hold NaN or inf: the layer's activations overflowed; "
                            f"check the model")
    return x


def pca(x: np.ndarray, n_components: int, *, seed: int = 0, fit_sample: int = PCA_FIT_SAMPLE,
        map_rows=None) -> tuple[np.ndarray, dict]:
    """Top principal components of `x` (float32) and what the fit found; sklearn picks the fast solver for the shape.

    Above `fit_sample` rows the axes are fitted on a seeded random sample of that many rows and every row is projected
    onto them: 100k x 2048 float32 took 3.9 s of CPU fitted on all rows; the axes from 20k rows differ by sampling
    noise only. `map_rows(transform, x)` projects them (a Ray run's actor pool); None: here.
    """
    from sklearn.decomposition import PCA

    estimator = PCA(n_components=n_components, svd_solver="auto", random_state=seed)
    rows = None
    if len(x) > fit_sample:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), size=fit_sample, replace=False))
        estimator.fit(take_rows(x, rows, block_rows=rows_per_block(x, BLOCK_BYTES)))
        if map_rows is None:
            # a block at a time: transform() centres a copy of its input, 640 MB for 10M x 16 activations
            coords = np.empty((len(x), n_components), np.float32)
            for start, stop, block in row_blocks(x, rows_per_block(x, BLOCK_BYTES)):
                coords[start:stop] = estimator.transform(block)
        else:
            coords = map_rows(estimator.transform, x)
    else:
        coords = estimator.fit_transform(x)
    info = {"svd_solver": getattr(estimator, "_fit_svd_solver", "auto"),
            "explained_variance_ratio": [round(float(v), 6) for v in estimator.explained_variance_ratio_],
            "fitted_rows": rows}  # None: fitted on every row
    return coords.astype(np.float32, copy=False), info


def _configure_numba_cache() -> str:
    """Cache umap-learn's compiled kernels on disk (the first compile takes about a minute); keep a dir the user set."""
    cache = os.environ.setdefault("NUMBA_CACHE_DIR", str(NUMBA_CACHE_DIR))
    if "numba" in sys.modules:  # imported earlier (shap imports it) before the variable was set: tell it directly
        import numba

        if not numba.config.CACHE_DIR:
            numba.config.CACHE_DIR = cache
    return cache


def project(embeddings, *, method: str = "pca", dims: int = 2, fit_sample: int | None = None, seed: int = 0,
            perplexity: float = 30.0, n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = None,
            placement: str = "knn", n_jobs: int = 1,
            pca_dims: int = PCA_DIMS_BEFORE_NEIGHBOURS, progress=None, map_rows=None) -> Projection:
    """Project (N, D) activations to `dims` (2 or 3) coordinates with PCA, t-SNE or UMAP.

    PCA's axes are fitted on at most 20k points (`PCA_FIT_SAMPLE`) and every point is projected onto them. t-SNE and
    UMAP first reduce to `pca_dims` principal components, are fitted on a random sample of `fit_sample` points
    (default 10k, 5k for 3-D t-SNE; all of them when N is smaller) and place the rest: `placement="knn"` puts each
    at the coordinate-wise median of its nearest fitted points (seconds for 100k points), `"transform"` uses the
    library's own `transform` (optimises every new point: umap-learn took 69 s for 20k points on a busy 2-core
    machine).

    `progress(fraction, stage)` is told how far the work is, from 0 to 1, with a few words on the step; it is called
    from inside the optimisation (openTSNE's callbacks, umap-learn's epoch loop), so an exception it raises (a
    person cancelled) stops the projection there.

    `map_rows(transform, x)` computes the row-wise steps after the fit, the projection onto PCA's axes and the
    placement of the points not fitted, as the run's engine runs them (`RunContext.map_rows`: a Ray run's actor
    pool); each row's result is its own, so the coordinates are those made here.
    """
    report = progress or (lambda fraction, stage: None)
    if method not in METHODS:
        raise AnalyzerError(f"unknown projection method {method!r}: choose one of {', '.join(METHODS)}")
    if dims not in (2, 3):
        raise AnalyzerError(f"dims must be 2 or 3, got {dims!r}")
    if placement not in ("knn", "transform"):
        raise AnalyzerError(f"placement must be 'knn' or 'transform', got {placement!r}")
    if fit_sample is None:
        fit_sample = TSNE_3D_FIT_SAMPLE if (method, dims) == ("tsne", 3) else DEFAULT_FIT_SAMPLE
    if fit_sample < 10:
        raise AnalyzerError(f"fit_sample must be at least 10, got {fit_sample}")
    x = _as_matrix(embeddings)
    n, d = x.shape
    if n < max(dims + 1, 5 if method == "pca" else 10):
        raise AnalyzerError(f"{n} samples are too few to project with {method}: use at least "
                            f"{max(dims + 1, 5 if method == 'pca' else 10)}")
    if d < dims:
        raise AnalyzerError(f"the embeddings have {d} feature(s), fewer than the {dims} dimensions asked for: "
                            f"pick a wider layer or dims={d}" if d >= 2 else
                            f"the embeddings have {d} feature: pick a wider layer")
    # One thread by default: with the cores busy (a shared machine, the dashboard's own work), openTSNE's threads
    # wait on each other every iteration: with load ~9 on 2 cores, 450 points took 49 s on 2 threads and 2.5 s on 1
    n_jobs = int(n_jobs or 1)
    timings: dict = {}
    params: dict = {"method": method, "dims": dims, "n_points": n, "n_features": d, "seed": seed}

    if method == "pca":
        coords, info = _timed(timings, "pca", lambda: pca(x, dims, seed=seed, map_rows=map_rows))
        rows = info.pop("fitted_rows")
        fitted = np.ones(n, bool)
        if rows is not None:
            fitted[:] = False
            fitted[rows] = True
        params.update(info, n_fitted=int(fitted.sum()), sampled=rows is not None)
        if rows is not None:
            params.update(sampling=f"uniform random without replacement, numpy default_rng({seed})",
                          placement="projected onto the axes fitted on the sample")
        return Projection(coords=coords, method=method, dims=dims, fitted=fitted, params=params,
                          timings=_rounded(timings))

    report(0.0, f"PCA to {pca_dims} dimensions" if d > pca_dims else "starting")
    if d > pca_dims:
        reduced, info = _timed(timings, "pca_before", lambda: pca(x, pca_dims, seed=seed, map_rows=map_rows))
        params["pca_before"] = {"n_components": pca_dims, "svd_solver": info["svd_solver"],
                                "n_fitted": len(x) if info["fitted_rows"] is None else len(info["fitted_rows"]),
                                "explained_variance": round(float(sum(info["explained_variance_ratio"])), 6)}
    else:
        reduced = x
        params["pca_before"] = None

    rng = np.random.default_rng(seed)
    if n > fit_sample:
        fit_idx = np.sort(rng.choice(n, size=fit_sample, replace=False))
    else:
        fit_idx = np.arange(n)
    fitted = np.zeros(n, bool)
    fitted[fit_idx] = True
    rest_idx = np.flatnonzero(~fitted)
    params.update(n_fitted=int(len(fit_idx)), sampled=bool(len(rest_idx)), fit_sample=int(fit_sample),
                  sampling=f"uniform random without replacement, numpy default_rng({seed})",
                  placement=placement if len(rest_idx) else None, n_jobs=n_jobs)

    fit_fn = _fit_tsne if method == "tsne" else _fit_umap
    coords = np.empty((n, dims), np.float32)
    transform_rest = reduced[rest_idx] if len(rest_idx) and placement == "transform" else None
    fit_coords, rest_coords = fit_fn(reduced[fit_idx], transform_rest, dims=dims, seed=seed, n_jobs=n_jobs,
                                     params=params, timings=timings, perplexity=perplexity, n_neighbors=n_neighbors,
                                     min_dist=min_dist, n_epochs=n_epochs, report=report)
    coords[fit_idx] = fit_coords
    if len(rest_idx) and placement == "knn":
        report(0.97, f"placing the other {len(rest_idx):,} points")
        placement_of = NeighbourPlacement(reduced[fit_idx], fit_coords, k=KNN_PLACEMENT_K, n_jobs=n_jobs)
        rest_coords = _timed(timings, "placement", lambda: placement_of(reduced[rest_idx]) if map_rows is None
                             else map_rows(placement_of, reduced[rest_idx]))
        params["knn_placement_k"] = KNN_PLACEMENT_K
    if len(rest_idx):
        coords[rest_idx] = rest_coords
    report(1.0, "done")
    return Projection(coords=coords, method=method, dims=dims, fitted=fitted, params=params, timings=_rounded(timings))


def place_by_neighbours(fit_x: np.ndarray, fit_coords: np.ndarray, new_x: np.ndarray, *, k: int = KNN_PLACEMENT_K,
                        n_jobs: int = 1) -> np.ndarray:
    """Coordinates for new points: the coordinate-wise median of the map positions of their k nearest fitted points.

    The median (not the mean) keeps a point whose neighbours straddle two clusters inside one of them; openTSNE
    initialises new points the same way before optimising them.
    """
    return NeighbourPlacement(fit_x, fit_coords, k=k, n_jobs=n_jobs)(new_x)


class NeighbourPlacement:
    """`place_by_neighbours` with its fitted points held: called on blocks of new points (an actor of a Ray run
    holds one), it searches them with one index, built at the first call."""

    def __init__(self, fit_x: np.ndarray, fit_coords: np.ndarray, *, k: int = KNN_PLACEMENT_K, n_jobs: int = 1):
        self.fit_x, self.fit_coords = fit_x, fit_coords
        self.k, self.n_jobs = int(min(k, len(fit_x))), n_jobs
        self._index = None

    def __call__(self, new_x: np.ndarray) -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        if self._index is None:
            self._index = NearestNeighbors(n_neighbors=self.k, n_jobs=self.n_jobs).fit(self.fit_x)
        _, neighbours = self._index.kneighbors(new_x)
        return np.median(self.fit_coords[neighbours], axis=1).astype(np.float32)


# The optimisation's share of the progress bar: the neighbours and the initialisation come before it
OPTIMISATION_SPAN = (0.1, 0.95)


def _optimisation_progress(report, total: int, stage: str):
    """A callback for every `step` iterations (of `total`) that reports them inside OPTIMISATION_SPAN."""
    low, high = OPTIMISATION_SPAN
    done = [0]

    def advance(step: int = 1) -> None:
        done[0] = min(total, done[0] + step)
        report(low + (high - low) * done[0] / max(total, 1), f"{stage}: iteration {done[0]} of {total}")

    return advance


def _fit_tsne(fit_x, rest_x, *, dims, seed, n_jobs, params, timings, perplexity, n_epochs, report, **_):
    from openTSNE import TSNE

    # openTSNE needs at least 3 * perplexity neighbours per point
    used_perplexity = float(min(perplexity, max(2.0, (len(fit_x) - 1) / 3.0)))
    # FFT interpolation has a fixed cost per iteration that only pays off from about 10k points (openTSNE's own
    # rule) and exists only up to 2-D; Barnes-Hut otherwise (450 points: 1 s instead of 7 s of CPU)
    gradient = "fft" if dims <= 2 and len(fit_x) >= 10_000 else "bh"
    # FFT interpolation on 2 points per interval, not openTSNE's 3: on the shapes sample's 10k embeddings (one
    # thread) 14.2 s instead of 42.2 s, at a KL divergence of 1.560 against 1.496 (+4.3%). Fewer iterations cost
    # more KL for the time saved (250 late iterations instead of 500: +4.8% for 2.6x less).
    interpolation = {"n_interpolation_points": FFT_INTERPOLATION_POINTS} if gradient == "fft" else {}
    extra = {} if n_epochs is None else {"n_iter": int(n_epochs)}
    # exact neighbours up to TSNE_EXACT_NEIGHBOURS points (openTSNE's "auto" takes Annoy's approximate ones from 1k):
    # 10k shapes embeddings, one thread, found in about 1 s instead of 4.2 s, the whole fit 13.2 s against 15.1 s,
    # at the same KL divergence (1.5598 against 1.5603); the exact search grows with the square of the points
    # (only for a fit alone: openTSNE's transform of the other points queries the same index, brute force if exact)
    neighbours = "exact" if len(fit_x) <= TSNE_EXACT_NEIGHBOURS and rest_x is None else "auto"
    every = 50  # each call makes openTSNE evaluate its error (KL divergence): every 10 iterations made 2 s into 27
    probe = TSNE(n_iter=int(n_epochs)) if n_epochs is not None else TSNE()
    advance = _optimisation_progress(report, probe.early_exaggeration_iter + probe.n_iter, "t-SNE")
    estimator = TSNE(n_components=dims, perplexity=used_perplexity, metric="euclidean", initialization="pca",
                     negative_gradient_method=gradient, neighbors=neighbours, n_jobs=n_jobs, random_state=seed,
                     verbose=False,
                     callbacks=lambda iteration, error, embedding: advance(every), callbacks_every_iters=every,
                     **interpolation, **extra)
    report(OPTIMISATION_SPAN[0] / 2, f"t-SNE: affinities of {len(fit_x):,} points")
    params["tsne"] = {"library": "openTSNE", "perplexity": used_perplexity, "metric": "euclidean",
                      "initialization": "pca", "negative_gradient_method": gradient,
                      "early_exaggeration_iter": estimator.early_exaggeration_iter, "n_iter": estimator.n_iter,
                      "learning_rate": "auto", "neighbors": estimator.neighbors, **interpolation}
    embedding = _timed(timings, "fit", lambda: estimator.fit(fit_x))
    params["tsne"]["kl_divergence"] = float(embedding.kl_divergence)  # the fit's error, as openTSNE reports it
    rest = None
    if rest_x is not None:
        params["tsne"]["transform_perplexity"] = min(5.0, used_perplexity)  # openTSNE's default for new points
        report(OPTIMISATION_SPAN[1], f"t-SNE: placing the other {len(rest_x):,} points")
        rest = _timed(timings, "transform", lambda: embedding.transform(rest_x, perplexity=min(5.0, used_perplexity)))
    return np.asarray(embedding, dtype=np.float32), rest


class _EpochStream:
    """The file umap-learn's epoch loop writes its tqdm bar to: each "k/n" it writes is passed on as progress (the
    only hook inside that loop), and an exception from `report` stops the loop there."""
    def __init__(self, advance):
        self._advance, self._seen = advance, 0

    def write(self, text: str) -> None:
        import re

        counts = re.findall(r"(\d+)/(\d+)", text)
        if counts:
            done = int(counts[-1][0])
            if done > self._seen:
                self._advance(done - self._seen)
                self._seen = done

    def flush(self) -> None:
        pass


def _fit_umap(fit_x, rest_x, *, dims, seed, n_jobs, params, timings, n_neighbors, min_dist, n_epochs, report, **_):
    params["numba_cache_dir"] = _configure_numba_cache()
    report(0.01, "UMAP: importing umap-learn (its first use in a process compiles code: about a minute)")
    umap = _timed(timings, "import", lambda: importlib.import_module("umap"))
    used_neighbors = int(min(n_neighbors, len(fit_x) - 1))
    # umap-learn's own choice above 10k points; below, it runs 500 epochs, which is 2.5 times the cost at 10k
    used_epochs = int(n_epochs or 200)
    # Approximate neighbours (NN-descent) at every size: the same code path for 300 points as for 10k, so the first,
    # small projection of a process compiles what the large ones need (numba caches only part of umap-learn on disk)
    estimator = umap.UMAP(n_components=dims, n_neighbors=used_neighbors, min_dist=min_dist, metric="euclidean",
                          n_epochs=used_epochs, random_state=seed, transform_seed=seed,
                          force_approximation_algorithm=True, verbose=False,
                          tqdm_kwds={"disable": False, "file": _EpochStream(_optimisation_progress(
                              report, used_epochs, "UMAP")), "mininterval": 0.2, "ascii": True})
    params["umap"] = {"library": "umap-learn", "n_neighbors": used_neighbors, "min_dist": min_dist,
                      "metric": "euclidean", "init": "spectral", "n_epochs": used_epochs, "random_state": seed,
                      "neighbours": "nn-descent"}
    with warnings.catch_warnings():
        # a fixed seed makes umap-learn single-threaded and it warns about it; reproducible maps are worth it here
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        report(OPTIMISATION_SPAN[0] / 2, f"UMAP: neighbours of {len(fit_x):,} points")
        fit_coords = _timed(timings, "fit", lambda: estimator.fit_transform(fit_x))
        rest = None if rest_x is None else _timed(timings, "transform", lambda: estimator.transform(rest_x))
    return np.asarray(fit_coords, dtype=np.float32), rest


def _timed(timings: dict, step: str, compute):
    """compute(), with its wall time recorded as timings[step]."""
    t0 = time.perf_counter()
    result = compute()
    timings[step] = time.perf_counter() - t0
    return result


def _rounded(timings: dict) -> dict:
    return {k: round(float(v), 4) for k, v in timings.items()}


def projection_table(ids, projection: Projection) -> pd.DataFrame:
    """The stored form: a row per sample id, coordinates x, y[, z]; `fitted` when the method was fitted on a sample."""
    columns = {"id": np.array(ids)}  # a copy: the table is handed out, and the ids may be a run's own column
    for axis in range(projection.dims):
        columns[AXES[axis]] = np.ascontiguousarray(projection.coords[:, axis])
    if projection.method != "pca":
        columns["fitted"] = projection.fitted
    return pd.DataFrame(columns, copy=False)  # one copy of each column at 10M rows is 40-80 MB


# Parquet's dictionary encoding only pays for repeated values: sample ids are unique and coordinates nearly so. A
# 10M-row table took 0.65 s to write and 0.67 s to read with it, 0.40 s and 0.27 s without, in 10% less space; LZ4
# instead of snappy then 0.37 s and 0.12 s, in the same space (uncompressed: 0.31 s, 0.07 s, 33% more).
PROJECTION_PARQUET = {"use_dictionary": False, "compression": "lz4"}


def projection_relpath(layer: str, method: str, dims: int) -> str:
    _check_layer_name(layer)
    return f"projections/{layer}-{method}-{dims}d.parquet"


def embeddings_relpath(layer: str) -> str:
    _check_layer_name(layer)
    return f"embeddings/{layer}.npy"


def _check_layer_name(layer: str) -> None:
    if not isinstance(layer, str) or not layer or "/" in layer or "\\" in layer or layer.startswith("."):
        raise AnalyzerError(f"{layer!r} is not a layer name: use a name from the model's named_modules()")


def _record(projection: Projection) -> dict:
    return {"method": projection.method, "dims": projection.dims, "params": projection.params,
            "timings_s": projection.timings}


def projection_stage(ctx) -> dict:
    """Pipeline stage: PCA of the run's embeddings in 2-D and 3-D.

    t-SNE and UMAP take seconds to minutes, so by default they are made on demand by `ensure_projection`; stage
    options `{"projections": {"methods": ["pca", "tsne", "umap"], "dims": [2, 3]}}` make them in the run instead.
    """
    from ..loading.runs import write_json

    embeddings = ctx.predictions.embeddings
    layer = ctx.params.get("layer")
    if embeddings is None or layer is None:
        raise AnalyzerError("the model has no linear layer to take the classifier's input from, so there is no "
                            "embedding to project: pass --layer")
    options = dict((ctx.params.get("stage_options") or {}).get("projections", {}))
    methods = list(options.get("methods", ["pca"]))
    all_dims = [int(d) for d in options.get("dims", [2, 3])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidOption(f"unknown projection method(s) {', '.join(map(str, unknown))} in the stage options: "
                            f"choose from {', '.join(METHODS)}")
    x = _as_matrix(embeddings)
    seed = ctx.params.get("seed", 0)
    written: dict = {}
    for method in methods:
        for dims in all_dims:
            key = f"{method}-{dims}d"
            if x.shape[1] < dims or len(x) < 10:
                written[key] = f"skipped: the embeddings have {x.shape[1]} feature(s) and {len(x)} samples"
                continue
            projection = project(x, method=method, dims=dims, seed=seed, map_rows=ctx.map_rows)
            relpath = projection_relpath(layer, method, dims)
            projection_table(ctx.samples["id"].to_numpy(), projection).to_parquet(ctx.path(relpath), index=False,
                                                                                  **PROJECTION_PARQUET)
            write_json(ctx.path(relpath.replace(".parquet", ".json")), {**_record(projection),
                                                                         "options": {"seed": seed}})
            written[key] = {"file": relpath, "seconds": round(sum(projection.timings.values()), 4)}
            if method == "pca":
                written[key]["explained_variance_ratio"] = projection.params["explained_variance_ratio"]
    return {"layer": layer, "embedding_shape": list(x.shape), "projections": written}


def _open(run):
    from ..loading.runs import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


def collect_embeddings(model, x, layer: str, batch_size: int = 256, *, run=None, device: str = "cpu") -> np.ndarray:
    """Activations leaving `layer` for inputs `x`, (N, D) float32; with `run`, cached as `embeddings/<LAYER>.npy` there.

    The run's own embedding layer (run.json `embedding_layer`) stores what *enters* that layer; it is returned as is.
    Activations are copied as the layer returns them, so an in-place activation after the layer does not alter them.
    """
    from ..engines.inference import predict
    from ..loading.runs import write_npy

    relpath = embeddings_relpath(layer)
    if run is not None:
        run = _open(run)
        if run.has(relpath):
            return np.asarray(run.read_npy(relpath, mmap=False), dtype=np.float32)
    predictions = predict(model, x, batch_size=batch_size, layer=layer, capture="output", device=device)
    embeddings = predictions.embeddings.astype(np.float32, copy=False)
    if run is not None:
        if len(embeddings) != run.num_samples:
            raise AnalyzerError(f"{len(embeddings)} inputs given but the run has {run.num_samples} samples: pass the "
                                f"run's dataset (analyzers.load_run_inputs)")
        write_npy(run.file(relpath), embeddings)
    return embeddings


def ensure_embeddings(run, layer: str, batch_size: int = 256) -> np.ndarray:
    """`embeddings/<LAYER>.npy` of a stored run, collected from the run's own model and data if it is not there yet."""
    run = _open(run)
    if run.has(embeddings_relpath(layer)):
        return np.asarray(run.read_npy(embeddings_relpath(layer), mmap=False), dtype=np.float32)
    from ..engines.pipeline import load_run_inputs

    model, dataset = load_run_inputs(run)
    return collect_embeddings(model, dataset.x, layer, batch_size, run=run)


def ensure_projection(run, layer: str | None = None, method: str = "pca", dims: int = 2, *, progress=None,
                      **options) -> pd.DataFrame:
    """The stored projection table of `layer` (default: the run's embedding layer), computing and caching it if absent.

    `options` go to `project` (fit_sample, perplexity, n_neighbors, ...); a cached table made with other options is
    recomputed. Written atomically, so a reader in another session never sees half a file. `progress` is
    `project`'s.
    """
    from ..loading.runs import write_json, write_parquet

    run = _open(run)
    layer = layer or run.info.get("embedding_layer")
    if not layer:
        raise AnalyzerError("this run stored no embeddings: run it again with --layer, or collect_embeddings(...)")
    if method not in METHODS:
        raise AnalyzerError(f"unknown projection method {method!r}: choose one of {', '.join(METHODS)}")
    relpath = projection_relpath(layer, method, dims)
    record_path = relpath.replace(".parquet", ".json")
    options.setdefault("seed", run.info.get("parameters", {}).get("seed", 0))
    same = {k: v for k, v in options.items() if k != "n_jobs"}  # threads do not change the result
    if run.has(relpath) and run.has(record_path):
        stored = run.read_json(record_path).get("options", same)
        if {k: v for k, v in stored.items() if k != "n_jobs"} == same:
            return run.read_parquet(relpath)
    emb_path = embeddings_relpath(layer)
    if not run.has(emb_path):
        raise AnalyzerError(f"the run has no embeddings of layer {layer!r}: collect them first with "
                            f"analyzers.explanations.projections.collect_embeddings(model, x, {layer!r}, run=run)")
    projection = project(run.read_npy(emb_path), method=method, dims=dims, progress=progress, **options)
    table = projection_table(run.sample_table["id"].to_numpy(), projection)
    write_parquet(run.file(relpath), table, **PROJECTION_PARQUET)
    write_json(run.file(record_path), {**_record(projection), "options": options})
    return table
