"""Cached access to runs, models and analyses. Nothing is computed here that `analyzers` does not compute.

Runs and models are `st.cache_resource` (one shared, read-only object per file: models keyed by their file hash);
tables derived from a run are `st.cache_data`, keyed by the run's path and the time its run.json was written, so a
rerun after a click reads memory, and a run replaced on disk is read afresh.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError, first_line
from analyzers.loading.runs import RUN_INFO, Run, list_runs, open_run

from . import access, summaries
from .settings import Settings, parse_settings

TRAINING_LOG = "training/log.jsonl"


def settings() -> Settings:
    """Parsed on every call (cheap): a cached value would outlive a test that changes the environment."""
    return parse_settings(sys.argv[1:])


def _stamp(path: Path) -> float:
    try:
        return (Path(path) / RUN_INFO).stat().st_mtime
    except OSError:
        return 0.0


def run_hash(run: Run) -> str:
    return f"{Path(run.path).resolve()}|{_stamp(run.path)}"


HASH = {Run: run_hash}


def stored_runs() -> dict[str, Path]:
    """Every run stored here, whoever may see it: the complete runs under the runs directory, and the run given on
    the command line. Run names are unique among these (a new run must not take a name someone else holds)."""
    s = settings()
    runs = {p.name: p for p in list_runs(s.runs_dir)}
    if s.run is not None and (s.run / RUN_INFO).exists() and s.run.name not in runs:
        runs[s.run.name] = s.run
    return runs


def known_runs() -> dict[str, Path]:
    """Runs a URL may name: the stored runs the person signed in may see (dashboard.access; all of them with sign-in
    off). Every page, picker and search starts here, so a run someone may not see is nowhere on their screen."""
    policy = settings().view_policy
    return {name: path for name, path in stored_runs().items() if access.may_view(run_owner(path), policy)}


@st.cache_resource(max_entries=32, show_spinner=False)
def _open_run(path: str, stamp: float) -> Run:
    return open_run(path)


def load_run(path: str | Path) -> Run:
    return _open_run(str(Path(path).resolve()), _stamp(Path(path)))


@st.cache_data(show_spinner=False, max_entries=1024)
def _run_status(path: str, stamp: float) -> tuple[dict | None, str | None]:
    try:
        return _open_run(path, stamp).info, None
    except AnalyzerError as exc:
        return None, str(exc)


def run_status(path: str | Path) -> tuple[dict | None, str | None]:
    """(run.json, None) for a run whose files all pass the checks, or (None, the one line that says why it is
    damaged). Small and kept per run.json time, so the sidebar and the listings check every run once, not on every
    rerun (the opened runs themselves are kept for only 32 runs)."""
    return _run_status(str(Path(path).resolve()), _stamp(Path(path)))


def run_owner(path: str | Path) -> dict | None:
    """run.json's `owner` (None: the operator's), read even from a damaged run so that it is listed to its owner."""
    return _run_owner(str(Path(path).resolve()), _stamp(Path(path)))


@st.cache_data(show_spinner=False, max_entries=1024)
def _run_owner(path: str, stamp: float) -> dict | None:
    info, _ = _run_status(path, stamp)
    if info is None:
        try:
            with open(Path(path) / RUN_INFO, "rb") as fh:
                info = json.loads(fh.read(1 << 20))
        except (OSError, ValueError):
            return None
    owner = info.get("owner") if isinstance(info, dict) else None
    return owner if isinstance(owner, dict) else None


def usable_runs() -> dict[str, Path]:
    """The known runs whose files pass the checks, by name (pages that pick among runs offer only these)."""
    return {name: path for name, path in known_runs().items() if run_status(path)[1] is None}


def forget_runs() -> None:
    """After a run was added or deleted: drop cached runs and tables."""
    _open_run.clear()
    st.cache_data.clear()


def analysis_available(module: str) -> bool:
    """Whether the module `module` (a dotted path such as analyzers.evaluation.stage) exists in this installation
    (analyses land one by one)."""
    return importlib.util.find_spec(module) is not None


def available_stages() -> list[str]:
    from analyzers.engines.pipeline import STAGES

    return [name for name, target, default in STAGES if default and analysis_available(target.split(":")[0])]


# ----------------------------------------------------------------------------------------------- evaluation tables

@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def metrics(run: Run) -> dict:
    """`summaries.metrics` at the run's stored thresholds."""
    return summaries.metrics(run, run_task(run))


def id_index(run: Run):
    """What `selection.id_positions` looks the run's ids up in: its samples table, which finds ids in one pass over
    them as text (an index of every id as text took 0.4 s to build at 1M rows, and 0.7 GB at 10M)."""
    return run.sample_table


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=16)
def confusion(run: Run):
    """`summaries.confusion` of the run (read-only; shared)."""
    return summaries.confusion(run)


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=32)
def threshold_curve(run: Run, positive: int):
    """analyzers.evaluation.thresholds.ThresholdCurve of class `positive` against the rest (read-only; shared)."""
    from analyzers.evaluation.thresholds import threshold_curve as curve_of

    return curve_of(run.sample_table["label"].to_numpy(), run.probs, positive=positive)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def slice_metrics_at(run: Run, positive: int, threshold: float) -> list:
    """`thresholds.slice_metrics_at` of the run's top ten slices: once per class and threshold, not on every rerun
    of the Confusion page (a cell click: 0.13 s of fancy indexing at 10M rows)."""
    from analyzers.evaluation.thresholds import slice_metrics_at as metrics_at

    slices = optional_table(run, "slices.parquet")
    return metrics_at(run.sample_table["label"].to_numpy(), run.probs, slices.head(10), run.sample_table,
                      positive=positive, threshold=threshold, rows=slice_rows(run, 10))


def default_threshold_class(run: Run) -> int:
    """The class the Confusion page's threshold starts on: the stored choice, else class 1 of two, else the rarest."""
    from analyzers.evaluation.thresholds import THRESHOLDS

    stored = optional_json(run, THRESHOLDS) or {}
    rarest = int(confusion(run).counts.sum(1).argmin())
    return int(stored.get("positive", 1 if len(run.class_names) == 2 else rarest))


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def multilabel_report(run: Run) -> dict:
    """`summaries.multilabel_report` at the run's thresholds."""
    return summaries.multilabel_report(run, run_task(run))


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=32)
def label_curve(run: Run, label: int):
    """ThresholdCurve of one label of a multi-label run: present against absent (read-only; shared)."""
    from analyzers.evaluation.thresholds import threshold_curve as curve_of

    p = np.asarray(run.probs[:, label], dtype=np.float64)
    return curve_of(np.asarray(run.labels)[:, label], np.column_stack([1 - p, p]), positive=1)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def reliability(run: Run, strategy: str = "uniform", n_bins: int = 10) -> dict:
    return summaries.reliability(run, strategy, n_bins)


def decided_samples(run: Run):
    """The samples table with each prediction taken at the run's stored threshold (thresholds.json: the Confusion
    page's choice; a DataFrame), else as stored (the run's `SampleTable`, read column by column)
    (`analyzers.evaluation.thresholds.samples_at`)."""
    from analyzers.evaluation.thresholds import THRESHOLDS

    stored = optional_json(run, THRESHOLDS)
    return _decided_samples(run, json.dumps(stored, sort_keys=True)) if stored else run.sample_table


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def _decided_samples(run: Run, stored_json: str) -> pd.DataFrame:
    # cached by the stored thresholds' text too: a multi-label run's label sets are rebuilt row by row, once per cut
    from analyzers.evaluation.thresholds import samples_at

    task = task_named_for(run)
    return samples_at(run.samples, run.probs, task=task, stored=json.loads(stored_json),
                      labels=run.labels if task.per_label else None, names=run.class_names)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def ranking(run: Run, by: str, limit: int = 200) -> pd.DataFrame:
    from analyzers.evaluation.metrics import rank_errors

    return rank_errors(decided_samples(run), run.probs, by=by, limit=limit)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def findings(run: Run) -> list:
    """`summaries.findings`: the run's findings, ranked."""
    return summaries.findings(run)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def group_table(run: Run, column: str, bins: int = 5) -> pd.DataFrame:
    from analyzers.evaluation.metrics import group_metrics

    return group_metrics(run.sample_table, run.probs, column, bins=bins)


def optional_table(run: Run, relpath: str) -> pd.DataFrame | None:
    """A parquet table of the run, or None when this run does not have that analysis."""
    return _optional_table(run, relpath) if run.has(relpath) else None


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def _optional_table(run: Run, relpath: str) -> pd.DataFrame:
    return run.read_parquet(relpath)


def optional_json(run: Run, relpath: str):
    return _optional_json(run, relpath) if run.has(relpath) else None


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def _optional_json(run: Run, relpath: str):
    return run.read_json(relpath)


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=64)
def subset_metrics(run: Run, rows: np.ndarray) -> dict:
    """Accuracy, mean confidence and top-label calibration of the samples at `rows`, inside against outside them
    (`metrics.calibration_bins` of the stored `correct` against `confidence`, the top label's probability: what
    `metrics.top_label_bins` reads from the probabilities, without checking and copying all of them per click;
    the full classification report took 0.9 s of a 50k-sample slice's click at 100k and is shown nowhere). `rows`
    is an array, which the cache keys by its bytes: a tuple of a 10M-row run's slice took seconds to hash."""
    from analyzers.evaluation import metrics as m
    from analyzers.loading.sample_table import strictly_increasing

    rows = np.asarray(rows, dtype=np.int64)
    if not strictly_increasing(rows):  # a slice's members are; a sample is inside once
        rows = np.unique(rows)
    correct = run.sample_table["correct"].to_numpy()[rows].astype(bool)
    confidence = run.sample_table["confidence"].to_numpy()[rows].astype(np.float64)
    inside = m.calibration_bins(correct, confidence) if len(rows) else None
    everyone = _calibration(run)
    outside = (everyone if inside is None else everyone.without(inside)) if len(rows) < run.num_samples else None
    nan = float("nan")
    return {"accuracy": float(correct.mean()) if len(rows) else nan,
            "mean_confidence": float(confidence.mean()) if len(rows) else nan,
            "ece_inside": inside.ece if inside is not None else nan,
            "ece_outside": outside.ece if outside is not None else nan,
            "bins_inside": inside.to_dict() if inside is not None else None,
            "bins_outside": outside.to_dict() if outside is not None else None}


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=8)
def _calibration(run: Run):
    """(read-only; shared) The top-label reliability bins of every sample (`summaries.top_label_calibration`):
    `subset_metrics` takes a selection's from them."""
    return summaries.top_label_calibration(run)


# ------------------------------------------------------------------------------------------- model and input data

@st.cache_resource(show_spinner=False, max_entries=4)
def _inputs(key: str, _run: Run):
    """((LoadedModel, Dataset), None), or (None, the reason they cannot be loaded): a failure is kept too, so a
    run whose model file changed is not re-read on every click."""
    from analyzers.engines.pipeline import load_run_inputs

    try:
        return load_run_inputs(_run), None
    except AnalyzerError as exc:
        return None, str(exc)


def inputs_key(info: dict) -> str:
    """What decides a run's loaded model and dataset: both files' hashes, the preprocessing, and every parameter
    (label column, id column, features and their order, architecture). Two runs of one file that differ in any of
    these must not share a cached dataset."""
    return json.dumps({"model": info["model"]["sha256"], "arch": info["model"].get("arch"),
                       "dataset": info["dataset"]["sha256"], "preprocessing": info.get("preprocessing") or {},
                       "parameters": info.get("parameters") or {}}, sort_keys=True, default=str)


def run_inputs(run: Run):
    """(LoadedModel, Dataset) of a run, loaded once and shared by every session (models keyed by file hash)."""
    with st.spinner("Loading the model and data…"):
        loaded, problem = _inputs(inputs_key(run.info), run)
    if problem is not None:
        raise AnalyzerError(problem)
    return loaded


def explain_methods(run: Run) -> tuple[list, list, list]:
    """(methods that apply to the run's model, the Explain page's defaults, its convolution layers). Integrated
    Gradients and Grad-CAM by default where there is a convolution, Saliency in Grad-CAM's place otherwise; Grad-CAM
    on tokens (a text model's, or a vision transformer's patches) is never a default: a person picks its layer."""
    from analyzers.explanations.attributions import list_methods

    modality = run.info["dataset"]["modality"]
    available = [m.name for m in list_methods(modality)]
    conv_layers = [n for n, k in (run.info["model"].get("layer_kinds") or {}).items() if k.startswith("conv")]
    if not conv_layers and modality != "tokens":
        available = [m for m in available if m != "gradcam"]
    # guided backprop overrides nn.ReLU modules' backward pass: a model without ReLU layers is not offered it
    if not any(k.startswith("relu") for k in (run.info["model"].get("layer_kinds") or {}).values()):
        available = [m for m in available if m != "guided_backprop"]
    # attention rollout needs attention: offered where the run found some (run.json's model.attention_layers, probed
    # when it was made); a run from before the probe, or whose probe failed, offers it, and rollout says why it
    # does not apply when chosen on a model without attention
    if run.info["model"].get("attention_layers") == []:
        available = [m for m in available if m != "attention_rollout"]
    defaults = [m for m in ("integrated_gradients", "gradcam" if conv_layers and modality != "tokens" else "saliency")
                if m in available]
    return available, defaults, conv_layers


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=4)
def report_html(run: Run) -> bytes:
    """The run's self-contained HTML report (`dashboard.report`), its thumbnails from the run's loaded inputs
    (none when they cannot be loaded: the report says why)."""
    from .report import build_report

    try:
        _, dataset = run_inputs(run)
    except AnalyzerError:
        dataset = None
    return build_report(run, dataset=dataset, load_inputs=False).to_html().encode("utf-8")


def task_named_for(run: Run):
    """The run's task as run.json names it, at its default threshold."""
    return summaries.task_named_for(run)


def run_task(run: Run):
    """The run's task (`analyzers.evaluation.tasks`): what its outputs mean and how it ranks its errors, at the
    run's stored per-label thresholds where a multi-label run has them (thresholds.json)."""
    from analyzers.evaluation.thresholds import THRESHOLDS

    return summaries.run_task(run, optional_json(run, THRESHOLDS))


def first_sample_to_explain(run: Run) -> str:
    """The sample the Explain page opens on when nothing is chosen: the first of the task's first error ranking
    (the most confident error; a regression's largest error), else the first sample."""
    from analyzers.evaluation.metrics import rank_errors

    wrong = rank_errors(run.sample_table, run.probs, by=run_task(run).rankings[0], limit=1)["id"].tolist()
    return str((wrong or [run.sample_table["id"].iloc[0]])[0])


@st.cache_resource(show_spinner=False)
def _warm_ups() -> dict:
    """inputs key -> the warm-up thread started for it: one per model and data, shared by every session; and
    "projector" once the projection helper's warm-up has started."""
    return {}


_BACKGROUND_LOCK = threading.Lock()  # the warm-up and projection registries: one starter at a time


def warm_up(run: Run) -> None:
    """Start, in the background and once per model and data, what the first Explain click would otherwise wait for:
    the model's worker (or its load), captum's import and first call, and the first sample's default maps with
    their scores, which take the sanity check's verdict on the probe set; and, once per dashboard process, the
    projection helper's numba compile. Off with --no-warm-up."""
    if not settings().warm_up:
        return
    key = inputs_key(run.info)
    with _BACKGROUND_LOCK:
        started = _warm_ups()
        if key in started:
            return
        warm_projector = "projector" not in started
        started.setdefault("projector", "warming")
        drawn = threading.Event()
        _PAGES_BEING_DRAWN.append(drawn)
        started[key] = thread = threading.Thread(target=_warm_after_page, args=(drawn, key, run, warm_projector),
                                                 daemon=True, name=f"warm-up {run.path.name}")
    thread.start()


# The warm-up waits for the page that asked for it: started beside the page, its imports and loading took the GIL
# from it (the first page of a 1M-sample run: 2.3 s alone, 3.4 s beside the warm-up). app.py calls page_drawn().
_PAGES_BEING_DRAWN: list = []
WARM_UP_WAIT_S = 5.0  # ... at most this long, should the page never say it is drawn


# The explanations' warm-up then waits for a quiet moment: no page drawn for WARM_UP_QUIET_S, in any session (a
# table's inputs wait too: its galleries show the stored rows, other galleries need the inputs at once). Beside
# pages opened one after another it had taken the GIL and the cores from them (a 1M-row run's Embeddings page:
# 2.6 s beside it, 0.25 s after it); a person reading a page leaves it that moment.
WARM_UP_QUIET_S = 1.0
WARM_UP_QUIET_LIMIT_S = 30.0  # ... and starts anyway after this long
_ACTIVITY = {"running": 0, "quiet_since": time.monotonic()}  # script runs being drawn, and when the last ended


def page_started() -> None:
    """A script run starts drawing its page (app.py; `page_drawn` when it ends)."""
    with _BACKGROUND_LOCK:
        _ACTIVITY["running"] += 1


def page_drawn() -> None:
    """The page of this script run is drawn (or stopped): the warm-ups it asked for start now."""
    with _BACKGROUND_LOCK:
        waiting = list(_PAGES_BEING_DRAWN)
        _PAGES_BEING_DRAWN.clear()
        _ACTIVITY["running"] = max(0, _ACTIVITY["running"] - 1)
        _ACTIVITY["quiet_since"] = time.monotonic()
    for drawn in waiting:
        drawn.set()


def wait_for_quiet(limit_s: float = WARM_UP_QUIET_LIMIT_S) -> bool:
    """Wait until no page is being drawn and none has been for WARM_UP_QUIET_S; False if `limit_s` passed first."""
    deadline = time.monotonic() + limit_s
    while True:
        with _BACKGROUND_LOCK:
            running, quiet = _ACTIVITY["running"], time.monotonic() - _ACTIVITY["quiet_since"]
        if not running and quiet >= WARM_UP_QUIET_S:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05 if running else max(0.05, WARM_UP_QUIET_S - quiet)))


def _warm_after_page(drawn: threading.Event, key: str, run: Run, warm_projector: bool) -> None:
    drawn.wait(WARM_UP_WAIT_S)
    _warm(key, run, warm_projector)


def _warm(key: str, run: Run, warm_projector: bool) -> None:
    try:
        # every gallery of images, sequences or tokens shows the inputs: loaded first, at once, not when quiet. Their
        # load is mostly torch's import (1.3 s), which a gallery waited for behind the pages' tables: a 1M-row
        # run's Errors page, opened 2 s after the dashboard started, took 2.35 s with the tables first, 0.2-0.55 s
        # with the inputs first (its Confusion page 0.2 -> 0.65 s and Embeddings 0.4 -> 1.15 s, computing theirs)
        if run.info["dataset"].get("modality") != "tabular":
            try:
                _inputs(key, run)  # its AnalyzerError is kept for the page that asks; anything else is logged here
            except Exception:  # noqa: BLE001 - the pages' tables are warmed all the same
                logging.getLogger(__name__).exception("warm-up of %s's inputs failed", run.path.name)
        _warm_pages(run)
        wait_for_quiet()
        _warm_projection(run)
        _warm_explanations(key, run)
    finally:
        if warm_projector:  # after the explanations: on two cores, the compile would slow the first click down
            _projector()[0].warm()  # umap-learn's compile, in the helper process, once per dashboard process


def _warm_pages(run: Run) -> None:
    """The pages' costliest tables of the run, each computed once for every session (cached; a page that asks while
    one is computed waits for it, not for a second copy): the threshold curve the Confusion page opens on (1.7 s
    of its 2.7 s at 10M rows), the top slices' members and the confusion matrix's cells."""
    try:
        task = run_task(run)
        if task.has_classes and not task.per_label and len(run.class_names) >= 2:
            threshold_curve(run, default_threshold_class(run))
        slice_rows(run, 10)  # as the pages ask for it: the cache keys the arguments as given
        if task.has_classes and not task.per_label:
            _calibration(run)  # what each slice's "rest" is taken from
            confusion(run).cell_ids  # what a click on a cell shows: grouped once its page has its matrix (0.9 s at 10M)
        if _missing_pca(run):
            importlib.import_module("sklearn.decomposition")  # the Embeddings page's PCA: 0.5 s of its first draw
    except AnalyzerError as exc:  # a damaged table: the page that reads it says so in its one line
        logging.getLogger(__name__).info("warm-up of %s's pages stopped: %s", run.path.name, first_line(exc))
    except Exception:  # noqa: BLE001 - logged whole; the page that needs the table computes it and shows its error
        logging.getLogger(__name__).exception("warm-up of %s's pages failed", run.path.name)


def _warm_projection(run: Run) -> None:
    """The 2-D PCA the Embeddings page opens on, when the run has none (1.2 s at 10M rows): only its file, since a
    person may never open that page (which reads it in 0.2 s)."""
    try:
        layer = _missing_pca(run)
        if layer and os.access(run.path, os.W_OK):  # a run folder this process may not write: the page says why
            _make_pca(run, layer)
    except AnalyzerError as exc:  # NaN activations, say: the page says so in its one line
        logging.getLogger(__name__).info("warm-up of %s's projection stopped: %s", run.path.name, first_line(exc))
    except Exception:  # noqa: BLE001 - logged whole (a full disk, say); the page computes it and shows its error
        logging.getLogger(__name__).exception("warm-up of %s's projection failed", run.path.name)


def _warm_explanations(key: str, run: Run) -> None:
    # the inputs first: every gallery waits for them, and only the Explain page for captum (importing it first
    # made the first gallery click of a 100k run wait 1.5 s more)
    loaded, problem = _inputs(key, run)
    if problem is not None:
        return  # the pages say why, the first time they need the model
    from analyzers.explanations.explain_run import sample_map, sample_scores, sanity_controls

    model, dataset = loaded
    first = first_sample_to_explain(run)
    row = run.sample_table.rows(run.sample_table.positions([first])).iloc[0]
    # as the page explains an error: the predicted class and the true one (a regression has one output)
    targets = ["pred"] if row["label"] == row["pred"] or len(run.class_names) == 1 else ["pred", "label"]
    try:
        for method in explain_methods(run)[1]:
            for target in targets:
                explanation = sample_map(run, first, method, target=target, model=model, dataset=dataset)
                sample_scores(run, explanation, model=model, dataset=dataset, sanity=True)
        sanity_controls(run, model=model, dataset=dataset)
    except AnalyzerError as exc:
        # the page computes the same and shows this line where it applies; here it is only logged
        logging.getLogger(__name__).info("warm-up of %s stopped: %s", run.path.name, first_line(exc))


def sample_inputs(run: Run, rows) -> np.ndarray:
    """The model inputs of the samples at `rows` (positions in samples.parquet, which follows the dataset's order)."""
    _, dataset = run_inputs(run)
    return dataset.x[np.asarray(rows, dtype=np.int64)]


MAX_TEXT_GROUPS = 50


def grouping_columns(run: Run, columns) -> tuple[list, list]:
    """(usable, left out) among `columns` for grouping and colouring: numbers are binned, so all are usable; a text
    column with more than MAX_TEXT_GROUPS values, or one value per sample, names samples rather than groups (an id
    such as a wine CSV's sample_id made 72 groups of one, headlined "accuracy gap 1.000")."""
    samples = run.sample_table
    usable, left_out = [], []
    for column in columns:
        if column not in samples.columns:
            continue
        values = samples[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        distinct = values.nunique(dropna=True)
        if not numeric and (distinct > MAX_TEXT_GROUPS or (distinct == len(values) and len(values) > 1)):
            left_out.append(column)
        else:
            usable.append(column)
    return usable, left_out


def gradcam_token_layers(run: Run) -> list:
    """The layers of the run's model whose output is a map over tokens (a text model's, or a vision
    transformer's patches), in the order they run: what Grad-CAM on tokens may be pointed at. One forward pass of
    one sample, remembered per model."""
    key = ("token-layers", run.info["model"]["sha256"])
    cache = st.session_state.setdefault("_token_layers", {})
    if key not in cache:
        from analyzers.explanations.attributions import token_layers

        model, dataset = run_inputs(run)
        cache[key] = list(token_layers(model, dataset.x[:1]))
    return cache[key]


def training_log(run: Run):
    """(steps, validation, grad_norms) from the run's training/log.jsonl (a TrainingRecorder file), or None."""
    path = run.file(TRAINING_LOG)
    if not path.exists():
        return None
    return _training_log(str(path), path.stat().st_mtime)


@st.cache_data(show_spinner=False, max_entries=16)
def _training_log(path: str, mtime: float):
    from analyzers.training.recorder import read_training_log

    return read_training_log(path)


def error_message(exc: Exception) -> str:
    """What a person reads when something fails: the AnalyzerError's own line, or the exception's first line."""
    if isinstance(exc, AnalyzerError):
        return str(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


# ------------------------------------------------------------------------------------------------------- embeddings

def embedding_layers(run: Run) -> list[str]:
    """Layers whose activations the run holds (embeddings/<LAYER>.npy), the run's embedding layer first."""
    folder = run.file("embeddings")
    found = sorted(p.stem for p in folder.glob("*.npy")) if folder.is_dir() else []
    first = run.info.get("embedding_layer")
    return sorted(found, key=lambda name: name != first)


def projection(run: Run, layer: str, method: str) -> pd.DataFrame | None:
    """The stored 2-D projection table (id, x, y); PCA is made when missing (seconds), t-SNE and UMAP only by
    `start_projection`, in the background."""
    from analyzers.explanations.projections import projection_relpath

    relpath = projection_relpath(layer, method, 2)
    if not run.has(relpath):
        if method != "pca":
            return None
        _make_pca(run, layer)
        if not run.has(relpath):  # made earlier in this process, and deleted since
            _make_pca.clear()
            _make_pca(run, layer)
    return _projection_table(run, relpath, run.file(relpath).stat().st_mtime)


def _missing_pca(run: Run) -> str | None:
    """The layer the Embeddings page opens on when the run lacks its 2-D PCA (made by the page), else None."""
    from analyzers.explanations.projections import projection_relpath

    layers = embedding_layers(run)
    return layers[0] if layers and not run.has(projection_relpath(layers[0], "pca", 2)) else None


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=8)
def _make_pca(run: Run, layer: str) -> None:
    """Store the run's missing 2-D PCA of `layer`, once: a page asking while the warm-up makes it waits for that one
    (1.2 s at 10M rows), not for a second."""
    from analyzers.explanations.projections import ensure_projection

    ensure_projection(run, layer, "pca", 2)


@st.cache_resource(show_spinner=False)
def _projector():
    """The one projection helper process of this dashboard process (analyzers.engines.projector), shared by every
    session, with the jobs asked of it by (run, layer, method)."""
    import tempfile

    from analyzers.engines.projector import Projector

    return Projector(log_path=Path(tempfile.gettempdir()) / f"dashboard-projector-{os.getpid()}.log"), {}


def projection_job(run: Run, layer: str, method: str):
    """The latest background projection of this run's layer with this method (any session's), or None."""
    return _projector()[1].get((str(run.path.resolve()), layer, method))


def start_projection(run: Run, layer: str, method: str):
    """Start projecting in the background, unless the same projection is already running (someone else's click
    included): the job, to watch and cancel."""
    projector, jobs = _projector()
    key = (str(run.path.resolve()), layer, method)
    with _BACKGROUND_LOCK:
        job = jobs.get(key)
        if job is None or job.state != "running":
            jobs[key] = job = projector.submit(run.path.resolve(), layer, method)
    return job


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=8)
def _projection_table(run: Run, relpath: str, mtime: float) -> pd.DataFrame:
    """(read-only; shared) Not `cache_data`, which keeps the table pickled and hands each call a copy: at 10M rows
    160 MB kept twice and copied on every rerun of the Embeddings page."""
    # read by the run's rules: a large table is checked from its footer when the run opens, its rows here
    # (`Run.check_every_file`), so damaged pages are the run's one RunDamaged line; `mtime` keys a new projection
    return run.read_parquet(relpath)


def collect_layer(run: Run, layer: str) -> None:
    """Store `layer`'s activations in the run (analyzers.explanations.projections.collect_embeddings)."""
    from analyzers.explanations.projections import collect_embeddings

    model, dataset = run_inputs(run)
    collect_embeddings(model, dataset.x, layer, run=run)


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=16)
def slice_rows(run: Run, top: int = 10) -> list:
    """The member positions of each of the run's top slices (read-only; shared): found once per run, not per
    threshold or per colouring (ten slices of a 10M-row run took 2.6 s)."""
    from analyzers.evaluation.slices import slice_mask

    slices = optional_table(run, "slices.parquet")
    if slices is None:
        return []
    return [np.flatnonzero(slice_mask(run.sample_table, ids)) for ids in slices.head(top)["ids"]]


@st.cache_data(hash_funcs=HASH, show_spinner=False, max_entries=16)
def slice_membership(run: Run, top: int = 8) -> pd.Series:
    """Per sample (in samples.parquet order), the best-ranked of the top slices holding it, or "no slice"."""
    slices = optional_table(run, "slices.parquet")
    names, codes = ["no slice"], np.zeros(run.num_samples, dtype=np.int16)
    if slices is not None:
        members = slice_rows(run, max(top, 10))
        for number, (_, s) in enumerate(slices.head(top).iterrows()):
            text = s["description"] if len(s["description"]) <= 48 else s["description"][:47] + "…"
            names.append(f"{number + 1}: {text}")
        for number in reversed(range(len(names) - 1)):  # the best-ranked slice last, so that it wins
            codes[members[number]] = number + 1
    # categories: a text per sample took 80 MB and a second at 10M rows
    return pd.Series(pd.Categorical.from_codes(codes, categories=names))


@st.cache_resource(hash_funcs=HASH, show_spinner=False, max_entries=16)
def overfit(run: Run, steps: int, batch_size: int, lr: float, time_limit_s: float, _on_step=None):
    """analyzers.training.gradients.overfit_one_batch on the run's model and data (trains a copy; cached per
    settings); `_on_step(done, total)` is told each step."""
    from analyzers.training.gradients import overfit_one_batch

    model, dataset = run_inputs(run)
    return overfit_one_batch(model, dataset.x, dataset.y, steps=steps, batch_size=batch_size, lr=lr,
                             time_limit_s=time_limit_s, on_batch=_on_step)


@st.cache_resource(hash_funcs=HASH, show_spinner="Comparing the runs…", max_entries=8)
def comparison(run_a: Run, run_b: Run):
    """analyzers.evaluation.comparison.compare_runs (read-only; shared)."""
    from analyzers.evaluation.comparison import compare_runs

    return compare_runs(run_a, run_b)


@st.cache_data(hash_funcs=HASH, show_spinner="Measuring the shift between the runs…", max_entries=8)
def run_shift(run_a: Run, run_b: Run) -> dict:
    """analyzers.data_health.shift.run_shift of two runs of one model over different data (read-only; shared)."""
    from analyzers.data_health.shift import run_shift as shift_between

    return shift_between(run_a, run_b)


def run_has_sample(run: Run, sample_id: str) -> bool:
    return run.sample_table.has_id(sample_id)


def tcav(run: Run, concept: dict, target: int, layers: tuple, *, concept_inputs=None, random_sets: int = 8,
         samples_per_set: int = 40, on_batch=None) -> pd.DataFrame:
    """analyzers.explanations.concepts.run_tcav of `concept` (a metadata value, selected ids, or concept images with
    their decoded `concept_inputs`) for class `target` at `layers`: kept in the run (it trains 2 x random_sets CAVs
    per layer), so a second ask, by anyone, reads it back."""
    from analyzers.explanations.concepts import run_tcav

    model, dataset = run_inputs(run)
    return run_tcav(run.path, concept=concept, target=int(target), layers=list(layers), concept_inputs=concept_inputs,
                    random_sets=random_sets, samples_per_set=samples_per_set, model=model, dataset=dataset,
                    on_batch=on_batch).table()