"""`run_analysis`: load, check, infer, then every analysis stage, written atomically as one run directory.

A stage is a function `stage(ctx: RunContext) -> dict | None` that writes its files into `ctx.stage_dir` and may
return a summary recorded under `analyses` in `run.json`. Stages are listed in `STAGES` by import path so that heavy
modules load only when a run needs them.
"""
from __future__ import annotations

import importlib
import json
import logging
import platform
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, InvalidOption, RunExists, first_line
from ..evaluation.tasks import read_for_task
from ..loading.datasets import Dataset, check_dataset, describe_dataset, load_dataset, open_dataset
from ..loading.runs import (LABELS, PROBS, RUN_FORMAT_VERSION, RUN_INFO, SAMPLE_ROW_GROUP, SAMPLES,
                            carry_derived_files, check_run_files, open_run, refuse_non_run, staged_run, write_json)
from ..loading.sandbox import runs_in_worker, sandboxed

if TYPE_CHECKING:
    from ..loading.models import LoadedModel
    from .inference import Predictions

LOG = logging.getLogger(__name__)
# torch, the model loader and inference are imported where they run: the parent of a sandboxed run never needs them,
# and leaving them out lets its worker import torch while the parent is still starting (benchmarks: sandbox).

# (name, "module:function", on by default). Later stages may read files that earlier ones wrote.
STAGES = (
    ("evaluation", "analyzers.evaluation.stage:evaluation_stage", True),
    ("data_health", "analyzers.data_health.stage:data_health_stage", True),  # reads the slices evaluation wrote
    ("projections", "analyzers.explanations.projections:projection_stage", True),
    ("gradients", "analyzers.training.gradients:gradient_stage", True),
)
# What each stage imports on first use, beyond its own module: imported in a thread while inference runs (torch
# releases the GIL), not after it. scikit-learn's parts alone took 0.66 s of a 10k run's 1.7 s.
STAGE_IMPORTS = {
    "evaluation": ("sklearn.metrics", "sklearn.tree", "sklearn.cluster", "sklearn.decomposition", "scipy.stats"),
    "data_health": ("faiss", "sklearn.cluster", "sklearn.neighbors", "scipy.stats"),
    "projections": ("sklearn.decomposition",),
}
ENGINES = ("process", "ray")
CORE_COLUMNS = ("id", "label", "pred", "confidence", "loss", "correct")
PACKAGES = ("torch", "numpy", "pandas", "pyarrow", "scikit-learn", "captum", "shap", "streamlit", "umap-learn",
            "openTSNE", "plotly", "safetensors")


@dataclass
class RunContext:
    """What a stage sees: the loaded model and data, the predictions, and where to write."""

    model: LoadedModel
    dataset: Dataset
    predictions: Predictions
    samples: pd.DataFrame
    stage_dir: Path
    params: dict
    progress: bool = False
    report: Callable[[str, float], None] | None = None
    timings: dict = field(default_factory=dict)
    # map_rows(transform, x): a row-wise transform of many rows, as the engine runs it (a Ray run's actor pool:
    # `RayInference.map_rows`); None: transform(x) here
    map_rows: Callable | None = None

    @property
    def class_names(self) -> list:
        return run_class_names(self.model, self.dataset)

    def path(self, relpath: str) -> Path:
        target = self.stage_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


def run_class_names(model, dataset: Dataset) -> list:
    """The dataset's class names when they fit the model, else the model's."""
    names = dataset.class_names
    return list(names) if names and len(names) == model.num_classes else list(model.class_names)


def build_samples_table(dataset: Dataset, predictions: Predictions, task=None, class_names=None) -> pd.DataFrame:
    """One row per sample in dataset order: the core columns (the task's: `tasks.Task.sample_columns`, which names
    a multi-label sample's labels by `class_names`), then tabular features and metadata. `task` defaults to
    classification over the outputs' columns."""
    from ..evaluation.tasks import Classification

    task = task or Classification(int(predictions.probs.shape[1]))
    columns = task.sample_columns(dataset.y, predictions.probs, names=class_names)
    table = pd.DataFrame({"id": dataset.ids, **{k: columns.pop(k) for k in ("label", "pred", "confidence")},
                          "loss": predictions.loss, "correct": columns.pop("correct"), **columns})
    extra = {}
    if dataset.modality == "tabular" and dataset.feature_names:
        for j, name in enumerate(dataset.feature_names):
            extra[name] = dataset.x[:, j]
    for column in dataset.metadata.columns:
        extra[str(column)] = dataset.metadata[column].to_numpy()
    renamed = {}
    for name, values in extra.items():  # a feature or metadata column never hides a column of the task's
        key = name if name not in table.columns and name not in renamed else f"meta_{name}"
        renamed[key] = values
    if renamed:
        table = pd.concat([table, pd.DataFrame(renamed)], axis=1)
    return table


def _package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _resolve_stages(analyses) -> list:
    known = {name: (target, default) for name, target, default in STAGES}
    if analyses is None:
        return [(name, target) for name, (target, default) in known.items() if default]
    unknown = [a for a in analyses if a not in known]
    if unknown:
        raise AnalyzerError(f"unknown analyses {', '.join(unknown)}: choose from {', '.join(known)}")
    return [(name, known[name][0]) for name in known if name in analyses]


def _load_stage(target: str):
    module_name, _, func = target.partition(":")
    return getattr(importlib.import_module(module_name), func)


def run_analysis(model_spec, data_spec: str | dict, out: str | Path, *, arch: str | None = None,
                 batch_size: int = 256, label_column: str = "label", id_column: str | None = None,
                 features: list | None = None, layer: str | None = None, device: str = "cpu",
                 overwrite: bool = False, image_size: tuple | None = None, mean: list | None = None,
                 std: list | None = None, input_shape: tuple | None = None, seed: int = 0,
                 analyses: list | None = None, allow_import: bool = False, progress: bool = False,
                 report: Callable[[str, float], None] | None = None, stage_options: dict | None = None,
                 isolation: str = "auto", owner: dict | None = None, arch_kwargs: dict | None = None,
                 class_names: list | None = None, inputs: str | None = None,
                 file_names: dict | None = None, task: str | None = None, split_column: str | None = None,
                 engine: str = "process", ray_address: str | None = None, ray_actors: int | None = None) -> Path:
    """Analyse a model on a dataset and store the run at `out`; returns `out`.

    If `out` already holds a complete run of the same model, data and parameters it is reused as it is. A different
    run there is refused unless `overwrite`, and even then replaced only once the new run is complete.
    `report(stage, fraction)` is called as work progresses (the dashboard's progress bars).

    `model_spec` is `sample:NAME`, a file path, or a model already in memory (`analyzers.wrap_module(module,
    input_shape)`, or an `nn.Module` with `input_shape=`), which is trusted code and runs here; its run records
    `source: "module"`, and later explanations of it need the module passed again (no file holds it).

    A model from a file is loaded, and the whole run computed, in a sandboxed worker (`isolation`, see
    `load_model`); its files are checked and copied into the run directory here, and `run.json` is written here.
    `class_names` names the model's outputs in order, for a model that knows them only by index: text labels and
    class folders are then matched by name (recorded in the run's parameters).
    `input_shape` (one sample's) is needed only by an import-path architecture, which cannot say it: without it,
    and without `inputs`, it is the dataset's sample shape.
    `inputs` (`NAME:DTYPE:SHAPE,...`) declares the inputs of an import-path architecture that takes token ids or
    several inputs (a `.pt2` records its own); they are recorded in run.json so the model can be rebuilt.
    `owner` (`{"id": ..., "name": ...}`, the signed-in person on a dashboard with sign-in) is recorded in run.json:
    the dashboard lets only the owner replace or delete the run.
    `file_names` (`{"model": ..., "dataset": ...}`) are the files' names as the person knows them (an upload's name,
    not the workspace's hashed copy), recorded as run.json's `model.name` and `dataset.name` for every header.
    `task` (`analyzers.evaluation.tasks.TASK_NAMES`) says what the model does; None reads it from the labels and
    the model's output, and asks for it when both readings fit. It is recorded as run.json's `task`.
    `data_spec` may be {split name: spec} (`--data train=A --data test=B`), or one dataset whose `split_column`
    (a column called `split` unasked) names each row's split: see `analyzers.loading.splits`. The run's samples
    then carry a `split` column, and its analyses compare the splits. A spec that is a directory or a glob reads
    every dataset file in it, in name order, as one dataset (`loading.shards`).
    `engine="ray"` runs inference in a Ray Data actor pool (`engines.ray_engine`: on the cluster at `ray_address`,
    else on a local Ray it starts, with `ray_actors` actors) and stores the samples table in parts; the model is
    loaded and checked here first, as in-process, and each actor loads it again (a file in its own sandbox).
    """
    if engine not in ENGINES:
        raise AnalyzerError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine != "ray" and (ray_address is not None or ray_actors is not None):
        raise AnalyzerError("--ray-address and --ray-actors apply to --engine ray only")
    given = None
    if not isinstance(model_spec, str):  # a model already in memory: wrap_module(...) or a plain nn.Module
        from torch import nn

        from ..loading.models import LoadedModel, wrap_module

        if isinstance(model_spec, nn.Module):
            if input_shape is None:
                raise AnalyzerError("a plain nn.Module needs input_shape= (one sample's shape), or pass "
                                    "analyzers.wrap_module(module, input_shape)")
            model_spec = wrap_module(model_spec, tuple(input_shape))
        if not isinstance(model_spec, LoadedModel):
            raise AnalyzerError(f"model must be a spec (sample:NAME or a file path), an nn.Module or "
                                f"analyzers.wrap_module(...), got {type(model_spec).__name__}")
        given, model_spec = model_spec, model_spec.spec
    out = Path(out).absolute()  # `--out .` names the current directory, not a run called ""
    if batch_size < 1:
        raise AnalyzerError(f"--batch-size must be at least 1, got {batch_size}")
    stages = _resolve_stages(analyses)
    from ..loading.models import check_arch_kwargs

    check_arch_kwargs(arch, arch_kwargs)
    layout = None
    if inputs is not None:
        from ..loading.inputs import InputLayout, parse_inputs

        layout = inputs if isinstance(inputs, InputLayout) else parse_inputs(inputs)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if not class_names or len(set(class_names)) != len(class_names):
            raise AnalyzerError("--class-names must name every class once, in the model's output order")
    if owner is not None and not (isinstance(owner, dict) and isinstance(owner.get("id"), str) and owner["id"]
                                  and isinstance(owner.get("name", ""), str)):
        raise AnalyzerError("owner must be {'id': text, 'name': text}, or None for a run made by the operator")
    if isinstance(data_spec, dict):
        from ..loading.splits import check_split_specs

        data_spec = check_split_specs(data_spec)
        if split_column is not None:
            raise AnalyzerError("--split-column reads the splits of one file; with a file per split leave it out")
    report = report or (lambda stage, fraction: None)
    report("load", 0.0)
    data_options = dict(label_column=label_column, id_column=id_column, features=features, image_size=image_size,
                        mean=mean, std=std, task=task, split_column=split_column)
    if given is None and input_shape is None and layout is None and arch and ":" in arch:
        # an import-path architecture does not say its input shape: the dataset's samples do
        input_shape = dataset_sample_shape(data_spec, data_options)
    param_options = dict(stages=stages, batch_size=batch_size, layer=layer, seed=seed, arch=arch,
                         arch_kwargs=arch_kwargs, class_names=class_names,
                         stage_options=stage_options, label_column=label_column, id_column=id_column,
                         features=features, task=task, split_column=split_column)
    if engine == "ray":
        from .ray_engine import RayInference

        write_outputs = RayInference.for_run(model_spec, given=given, address=ray_address, actors=ray_actors,
                                             arch=arch, input_shape=input_shape, class_names=class_names,
                                             arch_kwargs=arch_kwargs, inputs=layout, allow_import=allow_import,
                                             isolation=isolation)
        # the model is loaded here as each actor will load it (a file: in a sandboxed worker, its archive checked)
        # for what the run records and for the analyses after inference
        model = given or load_model_for(model_spec, arch=arch, input_shape=input_shape, allow_import=allow_import,
                                        isolation=isolation, arch_kwargs=arch_kwargs, inputs=layout,
                                        class_names=class_names)
        with contextlib.closing(model) if hasattr(model, "close") else contextlib.nullcontext():
            return _run_here(model_spec, data_spec, out, model=model, data_options=data_options,
                             param_options=param_options, stages=stages, arch=arch, device=device,
                             overwrite=overwrite, progress=progress, report=report, owner=owner,
                             file_names=file_names, write_outputs=write_outputs)
    if given is None and sandboxed(model_spec, arch, isolation):
        return _run_sandboxed(model_spec, data_spec, out, arch=arch, input_shape=input_shape, class_names=class_names,
                              data_options=data_options, param_options=param_options, device=device,
                              overwrite=overwrite, report=report, owner=owner, file_names=file_names)
    model = given or load_model_for(model_spec, arch=arch, input_shape=input_shape, allow_import=allow_import,
                                    isolation="process", arch_kwargs=arch_kwargs, inputs=layout,
                                    class_names=class_names)
    return _run_here(model_spec, data_spec, out, model=model, data_options=data_options, param_options=param_options,
                     stages=stages, arch=arch, device=device, overwrite=overwrite, progress=progress, report=report,
                     owner=owner, file_names=file_names, write_outputs=write_predictions)


def dataset_sample_shape(data_spec, data_options: dict) -> tuple:
    """One sample's shape as the dataset holds it, for a model whose architecture does not say its own. The dataset
    is read here without the model (an uncompressed .npz memory-mapped, not read) and read again with it for the
    run, since the model's class names decide how text labels are read."""
    try:
        return load_dataset(data_spec, model=None, memory_map=True, **data_options).sample_shape
    except AnalyzerError as exc:
        raise AnalyzerError(f"the model's input shape is unknown: its architecture does not say it, and the dataset "
                            f"could not be read without the model to tell it ({first_line(exc)}): pass "
                            f"--input-shape C,H,W (or F for tabular)") from exc


def load_model_for(model_spec: str, *, arch, input_shape, allow_import, isolation, arch_kwargs, inputs, class_names):
    """`load_model` with a run's options (class names as given on the command line)."""
    from ..loading.models import load_model

    return load_model(model_spec, arch=arch, input_shape=input_shape, allow_import=allow_import, isolation=isolation,
                      arch_kwargs=arch_kwargs, inputs=inputs, class_names=tuple(class_names) if class_names else None)


def _run_here(model_spec, data_spec, out: Path, *, model, data_options, param_options, stages, arch, device,
              overwrite, progress, report, owner, file_names, write_outputs) -> Path:
    """A run whose analyses run in this process (on `model`, which may be a sandboxed worker's), its inference by
    `write_outputs` (`write_run_files_with`)."""
    # the stages' imports (0.8 s of scikit-learn) run while the data is opened and hashed, which release the GIL;
    # joined once it is open, whatever happens, so that none goes on beside inference or the caller
    imports = _import_in_background(stages)
    with contextlib.ExitStack() as cleanup:
        try:
            # the file is mapped, not read (at 100k images reading it had been 0.78 s before the first batch),
            # and its hash and CRCs run in the background (open_dataset): beside the stages' imports and the
            # stages, paused during inference, waited for before anything is stored, and stopped if the run fails
            pending = open_dataset(data_spec, model=model, **data_options)
            cleanup.callback(pending.close)
            dataset = pending.dataset
            model = read_for_task(model, dataset.task)
            check_dataset(dataset, model)
            params = run_parameters(model, **param_options)
        finally:
            imports.join()
        if (out / RUN_INFO).exists():  # only a run already there needs the hash first: is it this very run?
            dataset = pending.checked()
        if _reuse_or_refuse(out, model.sha256, dataset.sha256, params, overwrite):
            report("done", 1.0)
            return out
        with staged_run(out, replace=overwrite) as stage_dir:
            summary = write_run_files_with(write_outputs, model, dataset, stage_dir, params=params, stages=stages,
                                           device=device, progress=progress, report=report,
                                           during_inference=pending.paused)
            dataset = pending.checked()
            carry_derived_files(out, stage_dir, model_sha=model.sha256, dataset_sha=dataset.sha256)
            checked = check_run_files(stage_dir, num_samples=len(dataset), num_classes=model.num_classes,
                                      task=dataset.task)
            write_json(stage_dir / RUN_INFO, _run_info(model_spec, data_spec, model, describe_dataset(dataset), arch,
                                                       params, summary, sandbox=getattr(model, "sandbox", None),
                                                       accuracy=checked["accuracy"], owner=owner,
                                                       file_names=file_names))
        report("done", 1.0)
        return out


def run_parameters(model, *, stages, batch_size, layer, seed, arch, stage_options, label_column, id_column,
                   features, arch_kwargs=None, class_names=None, task=None, split_column=None) -> dict:
    """The parameters a run records, and that decide whether an existing run can be reused. A declared task, and
    a split column, are among them when given (runs from before either existed are reused as they are)."""
    return {"batch_size": batch_size, "layer": layer or model.embedding_layer, "seed": seed,
            "label_column": label_column, "id_column": id_column, "features": features, "arch": arch,
            "arch_kwargs": arch_kwargs, "class_names": class_names,
            "analyses": [name for name, _ in stages], "stage_options": stage_options or {},
            **({"task": task} if task is not None else {}),
            **({"split_column": split_column} if split_column is not None else {})}


def _reuse_or_refuse(out: Path, model_sha: str, dataset_sha: str, params: dict, overwrite: bool) -> bool:
    """True if `out` holds this very run already; raises if it holds something that may not be replaced."""
    existing = out / RUN_INFO
    if existing.exists():
        try:
            info = json.loads(existing.read_text())
        except (OSError, ValueError):
            info = {}
        same = (info.get("model", {}).get("sha256") == model_sha
                and info.get("dataset", {}).get("sha256") == dataset_sha and info.get("parameters") == params)
        if same:
            open_run(out)  # reuse only if it opens cleanly
            return True
        if not overwrite:
            raise RunExists(f"{out} holds a different run (another model, dataset or parameters): pass --overwrite "
                            f"to replace it, or choose another --out", out)
    else:
        refuse_non_run(out)  # never deleted, not even with --overwrite
    return False


def _run_stage(name: str, stage, ctx: RunContext) -> dict:
    """One stage's summary for run.json; a stage that does not apply or fails is recorded as
    `{"status": "skipped", "reason": one line}`, the files it had begun are removed, and the next stage runs."""
    before = {p for p in ctx.stage_dir.rglob("*")}
    try:
        return {"status": "done", **(stage(ctx) or {})}
    except InvalidOption:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one analysis is its own; the others still run
        reason = str(exc) if isinstance(exc, AnalyzerError) else f"it failed ({type(exc).__name__}: {first_line(exc)})"
        LOG.warning("the %s stage was skipped: %s", name, reason)
        for path in sorted(set(ctx.stage_dir.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return {"status": "skipped", "reason": reason.splitlines()[0] if reason.strip() else type(exc).__name__}


@runs_in_worker
def write_run_files(model, dataset, stage_dir, *, params: dict, stages, device: str = "cpu", progress: bool = False,
                    report: Callable[[str, float], None] | None = None) -> dict:
    """Inference and every stage, written into `stage_dir` (all but run.json); returns what run.json records of them.

    In a sandboxed run this runs in the worker, on the worker's model and dataset, into its scratch directory."""
    return write_run_files_with(write_predictions, model, dataset, stage_dir, params=params, stages=stages,
                                device=device, progress=progress, report=report)


def write_predictions(model, dataset, stage_dir: Path, *, params: dict, device: str, progress: bool,
                      report: Callable[[str, float], None]) -> tuple:
    """In-process inference: the model's outputs written as one samples table, probs.npy and the embeddings.
    Returns (Predictions, the samples table, what run.json records of the engine). An engine is a function of
    this signature (`engines.ray_engine.RayInference`)."""
    from ..evaluation.tasks import task_of
    from .inference import predict

    predictions = predict(model, dataset.x, dataset.y, batch_size=params["batch_size"], layer=params["layer"],
                          device=device, progress=progress,
                          on_batch=lambda done, total: report("inference", done / total))
    samples = build_samples_table(dataset, predictions, task_of(model), class_names=run_class_names(model, dataset))
    samples.to_parquet(stage_dir / SAMPLES, index=False, row_group_size=SAMPLE_ROW_GROUP)
    np.save(stage_dir / PROBS, predictions.probs)
    write_label_matrix(stage_dir, dataset)
    if predictions.embeddings is not None:
        target = stage_dir / "embeddings" / f"{params['layer']}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.asarray(predictions.embeddings, dtype=np.float32))  # float32 already: no copy
    return predictions, samples, {"name": "in-process"}


def write_label_matrix(stage_dir: Path, dataset: Dataset) -> None:
    """A multi-label run's multi-hot labels (labels.npy): samples.parquet names them as text, analyses read this."""
    if dataset.y.ndim == 2:
        np.save(stage_dir / LABELS, dataset.y.astype(np.int8))


def write_run_files_with(write_outputs, model, dataset, stage_dir, *, params: dict, stages, device: str = "cpu",
                         progress: bool = False, report: Callable[[str, float], None] | None = None,
                         during_inference=contextlib.nullcontext) -> dict:
    """`write_run_files` with the inference of `write_outputs` (`write_predictions`, or another engine's), inside
    the context `during_inference()` makes (`PendingDataset.paused`: the dataset's checks wait meanwhile).
    The stages' modules are imported before inference starts (`_run_here` imports them while it reads the data;
    a sandboxed worker here): a thread importing beside the forward pass takes the GIL from it between
    operations (100k images: inference 6.8 s beside it, 6.3 s after)."""
    import torch

    report = report or (lambda stage, fraction: None)
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    stages = [tuple(s) for s in stages]
    seed = params["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    timings = {}
    _import_stage_modules(stages)  # at once where `_run_here` imported them already
    started = time.perf_counter()
    report("inference", 0.0)
    with during_inference():
        predictions, samples, engine = write_outputs(model, dataset, stage_dir, params=params, device=device,
                                                     progress=progress, report=report)
    timings["inference"] = time.perf_counter() - started
    ctx = RunContext(model=model, dataset=dataset, predictions=predictions, samples=samples,
                     stage_dir=stage_dir, params=params, progress=progress, report=report, timings=timings,
                     map_rows=getattr(write_outputs, "map_rows", None))
    summaries = {}
    for name, target in stages:
        report(name, 0.0)
        t0 = time.perf_counter()
        summaries[name] = _run_stage(name, _load_stage(target), ctx)
        timings[name] = time.perf_counter() - t0
        report(name, 1.0)
    return {"analyses": summaries, "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "class_names": ctx.class_names, "attention_layers": attention_layers(model, dataset.x[:1]),
            "embedding_layer": params["layer"] if predictions.embeddings is not None else None, "engine": engine}


def _import_in_background(stages) -> threading.Thread:
    """A started thread importing the modules of `stages` and what they use (`STAGE_IMPORTS`). A module that
    fails to import is left for its stage, which then says why it was skipped."""
    thread = threading.Thread(target=_import_stage_modules, args=(stages,), name="stage imports", daemon=True)
    thread.start()
    return thread


def _import_stage_modules(stages) -> None:
    """Import the modules of `stages` and what they use (`STAGE_IMPORTS`); one that fails is left for its stage."""
    names = [target.partition(":")[0] for _, target in stages]
    names += [module for name, _ in stages for module in STAGE_IMPORTS.get(name, ())]
    for module in dict.fromkeys(names):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the stage imports it again and reports the failure as its reason
            LOG.debug("import of %s for its stage failed", module, exc_info=True)


def attention_layers(model, x) -> list | None:
    """The call sites whose attention weights `explanations.attention` reads, probed on the sample(s) `x`: what tells
    the dashboard whether attention rollout applies. [] for a model without attention; None when the probe itself
    failed (logged: the run goes on, and rollout, when chosen, gives its own reason)."""
    from ..explanations.attention import NO_ATTENTION, attention_arrays

    try:
        return [str(name) for name in attention_arrays(model, x, batch_size=1)["layers"]]
    except Exception as exc:  # noqa: BLE001 - a probe that fails must not abort the run it describes
        if isinstance(exc, AnalyzerError) and str(exc).startswith(NO_ATTENTION):
            return []
        LOG.warning("could not tell whether the model has attention: %s", first_line(exc))
        return None


def _run_sandboxed(model_spec, data_spec, out: Path, *, arch, input_shape, data_options, param_options, device,
                   overwrite, report, owner, class_names=None, file_names=None) -> Path:
    from ..loading.sandbox import copy_worker_output, open_sandboxed

    model, dataset = open_sandboxed(model_spec, spec=model_spec, arch=arch, input_shape=input_shape,
                                    class_names=class_names, data_path=data_spec, data_options=data_options)
    with contextlib.closing(model):
        params = run_parameters(model, **param_options)
        if _reuse_or_refuse(out, model.sha256, str(dataset.get("sha256")), params, overwrite):
            report("done", 1.0)
            return out
        inside = f"{model.worker.scratch_inside}/run"
        summary = model.call("analyzers.engines.pipeline:write_run_files", inside, params=params,
                             stages=param_options["stages"], device=device, uses_dataset=True,
                             on_progress=report)
        if not isinstance(summary, dict):
            raise AnalyzerError("the sandboxed worker returned an unexpected run summary; nothing was stored")
        with staged_run(out, replace=overwrite) as stage_dir:
            copy_worker_output(model.worker.scratch / "run", stage_dir)
            carry_derived_files(out, stage_dir, model_sha=model.sha256, dataset_sha=str(dataset.get("sha256")))
            num_samples = int(dataset.get("num_samples", -1))
            checked = check_run_files(stage_dir, num_samples=num_samples, num_classes=model.num_classes,
                                      task=str(dataset.get("task")))
            write_json(stage_dir / RUN_INFO, _run_info(model_spec, data_spec, model, dataset, arch, params, summary,
                                                       sandbox=model.sandbox, accuracy=checked["accuracy"],
                                                       owner=owner, file_names=file_names))
    report("done", 1.0)
    return out


def _engine_record(value) -> dict:
    """What ran the inference (`write_predictions` and the other engines say): JSON scalars under text keys only,
    since a sandboxed worker's summary is not trusted."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return {"name": "in-process"}
    return {str(k): v for k, v in value.items() if isinstance(k, str) and (v is None or isinstance(
        v, (str, int, float, bool)))}


def _texts_or_none(value):
    """A list of text as it is; anything else (a sandboxed worker's summary is not trusted) None."""
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _display_name(spec, given) -> str:
    """How a file is named to the person: the name given (as uploaded), else the last part of its spec; a file
    per split as `train=a.npz, test=b.npz`."""
    if isinstance(spec, dict) and not isinstance(given, str):
        from ..loading.splits import describe_splits

        return describe_splits({name: _display_name(part, None) for name, part in spec.items()})[:200]
    text = given if isinstance(given, str) and given.strip() else str(spec).replace("\\", "/").rsplit("/", 1)[-1]
    return text.strip()[:200]


def _run_info(model_spec, data_spec, model, dataset: dict, arch, params, summary: dict, *, sandbox,
              accuracy: float, owner: dict | None = None, file_names: dict | None = None) -> dict:
    from ..loading.splits import checked_split_sources, describe_splits

    file_names = file_names or {}
    sources = checked_split_sources(dataset.get("split_sources") or [])
    if sources is None:
        raise AnalyzerError("the dataset's split files were described in an unexpected form; nothing was stored")
    return {
        "owner": None if owner is None else {"id": owner["id"], "name": owner.get("name") or owner["id"]},
        "format_version": RUN_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": model_spec, "name": _display_name(model_spec, file_names.get("model")),
                  "sha256": model.sha256, "source": model.source, "arch": arch,
                  "arch_kwargs": params.get("arch_kwargs"),
                  "input_shape": list(model.input_shape), "output_kind": model.output_kind,
                  "inputs": model.input_layout.to_json() if getattr(model, "input_layout", None) else None,
                  "layers": list(model.layers), "layer_kinds": dict(model.layer_kinds),
                  "attention_layers": _texts_or_none(summary.get("attention_layers"))},
        "dataset": {"spec": data_spec if isinstance(data_spec, str) else describe_splits(data_spec),
                    "name": _display_name(data_spec, file_names.get("dataset")),
                    "sha256": dataset["sha256"], "modality": dataset["modality"],
                    "feature_names": dataset["feature_names"], "metadata_columns": dataset["metadata_columns"],
                    "ground_truth_columns": dataset["ground_truth_columns"],
                    # a file per split: what reloads them (load_run_inputs); a worker's description is checked
                    **({"split_sources": list(sources)} if sources else {})},
        "num_samples": int(dataset["num_samples"]),
        "class_names": [str(c) for c in summary["class_names"]],
        "task": dataset.get("task", "classification"),
        "preprocessing": dataset["preprocessing"],
        "parameters": params,
        "embedding_layer": summary.get("embedding_layer"),
        "seeds": {"torch": params["seed"], "numpy": params["seed"]},
        "packages": _package_versions(),
        "analyses": summary.get("analyses", {}),
        "timings_s": summary.get("timings_s", {}),
        "accuracy": accuracy,
        "engine": _engine_record(summary.get("engine")),
        "sandbox": sandbox or {"level": "none", "tool": "in-process",
                               "reason": "a built-in sample or a trusted model, loaded in this process"},
    }


def load_run_inputs(run, *, allow_import: bool = False) -> tuple[LoadedModel, Dataset]:
    """Reload the model and dataset a run was made from, checking they are the same files (hashes in run.json).

    A model from a file runs in a sandboxed worker, and the dataset is decoded there too (`worker_dataset`): the
    dashboard never parses an uploaded file itself. A state dict with an import-path architecture is rebuilt, with
    the run's `arch_kwargs`, only when `allow_import` (the command line): the dashboard never imports code."""
    info = run.info
    if info["model"].get("source") == "module":
        raise AnalyzerError("this run's model was a Python module handed to run_analysis, which no file holds: pass "
                            "it again (explain_run(..., model=analyzers.wrap_module(module, input_shape))), or "
                            "export it to .pt2 and run that")
    params = info.get("parameters", {})
    pre = info.get("preprocessing") or {}
    model_spec, data_spec, arch = info["model"]["spec"], info["dataset"]["spec"], info["model"].get("arch")
    if info["dataset"].get("split_sources"):  # a file per split (checked when the run was opened)
        data_spec = {s["name"]: s["spec"] for s in info["dataset"]["split_sources"]}
    from ..loading.hashing import prefetch_sha256_file

    for spec in (data_spec.values() if isinstance(data_spec, dict) else [data_spec]):
        if isinstance(spec, str) and not spec.startswith("sample:"):
            prefetch_sha256_file(spec)  # hashed while torch imports and the model loads: 0.8 s per 1.2 GB
    data_options = dict(label_column=params.get("label_column", "label"), id_column=params.get("id_column"),
                        features=params.get("features"), image_size=pre.get("image_size"), mean=pre.get("mean"),
                        std=pre.get("std"), task=info.get("task"), split_column=params.get("split_column"))
    if sandboxed(model_spec, arch, "auto"):
        from ..loading.sandbox import open_sandboxed, worker_dataset

        model, _ = open_sandboxed(model_spec, spec=model_spec, arch=arch, input_shape=info["model"]["input_shape"],
                                  class_names=params.get("class_names"), data_path=data_spec,
                                  data_options=data_options)
        try:
            _check_unchanged(info, "model", model.sha256)
            dataset = worker_dataset(model)
            _check_unchanged(info, "dataset", dataset.sha256)
            check_dataset(dataset, model)
        except BaseException:
            model.close()
            raise
        return model, dataset
    from ..loading.models import load_model

    if arch and ":" in arch and not allow_import:
        raise AnalyzerError(f"this run's architecture {arch!r} is an import path, which only the command line "
                            f"rebuilds: explain it with python -m analyzers explain RUN --ids ...")
    names = params.get("class_names")
    layout = None
    if info["model"].get("inputs") and info["model"].get("source") == "state_dict":
        from ..loading.inputs import InputLayout

        layout = InputLayout.from_json(info["model"]["inputs"])  # an import-path architecture's declared inputs
    model = load_model(model_spec, arch=arch, input_shape=tuple(info["model"]["input_shape"]),
                       allow_import=allow_import, arch_kwargs=info["model"].get("arch_kwargs"),
                       class_names=tuple(names) if names else None, inputs=layout)
    _check_unchanged(info, "model", model.sha256)
    # mapped, not read: a page that shows a few samples of a 100k-image run reads their pages, not 1.2 GB
    dataset = load_dataset(data_spec, model=model, memory_map=True, **data_options)
    _check_unchanged(info, "dataset", dataset.sha256)
    return read_for_task(model, dataset.task), dataset


def _check_unchanged(info: dict, kind: str, sha256: str) -> None:
    if sha256 != info[kind]["sha256"]:
        what = "model file" if kind == "model" else "dataset"
        raise AnalyzerError(f"the {what} {info[kind]['spec']} changed since the run was made: run it again")
