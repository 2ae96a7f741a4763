"""Inference on Ray Data (`analyzers run --engine ray`): an actor pool runs the model, the driver stores the outputs.

The driver loads and checks the model and the dataset as an in-process run does: the archive policy and the
loaders run before anything is distributed. Then Ray gets
- the model: a built-in sample's name, or the checked file's bytes in the object store, which each actor writes
  into its own scratch directory and loads with the same loader (`load_model`: a file runs in a sandboxed worker
  of the actor's); a model handed over as a Python module goes as it is. No actor reads a path of the driver's, so
  the code runs the same on a laptop's Ray and on a cluster's nodes;
- the inputs: blocks in the object store, cut at multiples of `batch_size` from the start of the dataset, so that
  each batch an actor runs is the batch an in-process run makes (the same rows, hence the same floats).

`map_batches` runs a stateful callable class (`ModelActor`, one model per actor) in an actor pool
(`ActorPoolStrategy(size=actors)`) with an explicit `batch_size` of one block, which the actor runs in batches of the
run's batch size: Ray's cost per call (about a millisecond) is paid per block, not per batch. Outputs come back to the driver in dataset order (`iter_batches`,
order preserved) and are written as they arrive: probabilities and embeddings into `.npy` files mapped in memory,
the loss into memory, and the mergeable partial aggregates (`evaluation.aggregates`) of each batch summed in the
same pass. The samples table is then written in parts (`samples/part-NNNNNN.parquet`, `runs.SAMPLES_DIR`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..arrays import row_blocks
from ..errors import AnalyzerError, first_line
from ..loading.scratch import process_scratch

# rows per part of the samples table: parts of about this many rows keep a 10M-row run at ~150 files (one row
# group each, as samples.parquet's groups: runs.SAMPLE_ROW_GROUP)
PART_ROWS = 1 << 16
# bytes of inputs per block in the object store: large enough to amortise Ray's cost per call (about a millisecond),
# small enough to stream (and to show progress) in many steps
BLOCK_BYTES = 8 << 20
# rows from which a Ray run's stages transform in the actor pool (`RayInference.map_rows`): a pool's start takes
# about 8 s here, a projection's transform of 1M rows about a second on one core
TRANSFORM_ON_RAY_ROWS = 1_000_000
# A pool's blocks are handed out once all its actors have started (imported torch, loaded the model): otherwise
# the first actor up takes the blocks while the others are still starting, and a node's actor may get none. A
# cluster that cannot place them all in this time (too few CPUs for --ray-actors) fails with Ray's own message.
ACTORS_START_S = 600


def import_ray():
    """Ray, or one line saying how to install it (an extra: plain use of the tool does not need it)."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used; importing it here checks the extra is whole
    except ImportError as exc:
        raise AnalyzerError("--engine ray needs Ray Data, which is not installed: pip install -r "
                            "requirements-ray.txt (make test installs it)") from exc
    return ray


def connect(address: str | None, *, num_cpus: int | None = None):
    """Ray, connected: to the cluster at `address`, to the Ray this process already started, or to a local Ray
    started here with this machine's cores (or `num_cpus`)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, **init_options())
        else:
            ray.init(**local_options(num_cpus or os.cpu_count()))
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError for an address it cannot reach
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise AnalyzerError(f"could not start or reach {where} ({first_line(exc)}): check --ray-address, or leave "
                            f"it out to run on a local Ray") from exc
    return ray


# A local Ray keeps no idle worker processes: by default it starts one per CPU when the driver connects and keeps
# that many once their tasks end, each a Python with Ray imported (about 120 MB). A 1M-row run had held 2.28 GB
# (summed PSS) with them, 2.19 GB without. Ray Data's few tasks (a block's metadata) then wait for a worker's start,
# or reuse one idle for under a second; the actors are started once and kept. Four 1M-row runs took 41.0-42.9 s
# with this, 42.8 s without.
LOCAL_RAY_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                    "num_workers_soft_limit": 0}


def local_options(num_cpus: int) -> dict:
    """`ray.init` options that start a local Ray of `num_cpus` CPUs for a run (or a test session)."""
    return {"num_cpus": num_cpus, "include_dashboard": False, "_system_config": dict(LOCAL_RAY_CONFIG),
            **init_options()}


def init_options() -> dict:
    """`ray.init` options of a run's driver (a test session that starts Ray itself passes them too): the packages
    every actor imports are shipped with the job (`py_modules`), so a cluster's nodes need not have them."""
    import analyzers
    import sample_models

    return {"runtime_env": {"py_modules": [str(Path(analyzers.__file__).parent),
                                           str(Path(sample_models.__file__).parent)]},
            "log_to_driver": False, "logging_level": "WARNING"}


@dataclass(frozen=True)
class ModelPayload:
    """What an actor needs to load the model: a sample's spec, or a file's checked bytes (an object reference),
    or a module handed over in memory; and the options it was loaded with here."""

    spec: str
    sha256: str
    file_name: str | None = None
    file_bytes: object = None  # a ray.ObjectRef of the file's bytes
    module: object = None  # a LoadedModel given in memory (trusted code of the caller's)
    options: dict | None = None

    def load(self):
        from ..loading.models import load_model

        if self.module is not None:
            return self.module
        if self.file_bytes is None:
            return load_model(self.spec, **(self.options or {}))
        import ray

        data = ray.get(self.file_bytes)
        scratch = process_scratch("analyzers-actor-")  # Ray kills its actors: a later one sweeps it
        local = scratch / Path(self.file_name).name
        local.write_bytes(data)  # the actor's own copy: it never reads a path of the driver's
        return load_model(str(local), **(self.options or {}))


def _actor_model(payload: ModelPayload, *, task: str, threads: int):
    """An actor's model: loaded once from `payload` with the driver's options, checked to be the driver's by its
    hash, read for the task, on `threads` torch threads."""
    import torch

    from ..evaluation.tasks import read_for_task

    torch.set_num_threads(max(1, int(threads)))
    model = payload.load()
    if model.sha256 != payload.sha256:
        raise AnalyzerError(f"the model an actor loaded has hash {model.sha256[:12]}, not the driver's "
                            f"{payload.sha256[:12]}: the file changed while the run started")
    if getattr(model, "worker", None) is not None:
        # a file's model runs in this actor's sandboxed worker, which loads no dataset: the worker's own copy is
        # read for the task there (a regression's output is its value, not a class score), as here below
        model.worker.request({"op": "read_for_task", "task": task})
    return read_for_task(model, task)


class ModelActor:
    """One model per actor, loaded once: called on a batch of {"x", "y", "row"}, returns its rows' outputs."""

    def __init__(self, payload: ModelPayload, *, task: str, layer: str | None, threads: int, batch_size: int,
                 device: str = "cpu"):
        self.init_started = time.time()
        self.model = _actor_model(payload, task=task, threads=threads)
        self.layer = layer
        self.batch_size = batch_size
        self.device = device
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.init_ended = time.time()  # the actor's start (torch's import, the model's load), sent with its first block

    def __call__(self, batch: dict) -> dict:
        from .inference import predict

        x, y, rows = batch["x"], batch["y"], batch["row"]
        started = time.perf_counter()
        # a block starts at a multiple of the batch size, so these batches are the in-process run's
        predictions = predict(self.model, x, y, batch_size=self.batch_size, layer=self.layer, device=self.device)
        # the block's model time, on its first row (the run reports the pool's sum beside the pipeline's wall time)
        compute = np.zeros(len(rows), dtype=np.float64)
        compute[:1] = time.perf_counter() - started
        ready = np.zeros(len(rows), dtype=np.float64)  # wall-clock start and end of this actor's __init__
        ready[:2] = (self.init_started, self.init_ended)[:len(ready)]
        out = {"row": rows, "probs": predictions.probs, "loss": predictions.loss,
               "node": np.full(len(rows), self.node), "compute_s": compute, "actor_init": ready}
        if predictions.embeddings is not None:
            out["embedding"] = predictions.embeddings
        return out


@dataclass
class RayInference:
    """`write_outputs` of `pipeline.write_run_files_with` for a run on Ray (see the module's docstring)."""

    model_source: dict  # what `_payload` makes the actors' ModelPayload from: the spec, a given module, the options
    address: str | None = None
    actors: int | None = None

    @classmethod
    def for_run(cls, model_spec: str, *, given=None, address=None, actors=None, arch=None, input_shape=None,
                class_names=None, arch_kwargs=None, inputs=None, allow_import=False,
                isolation="auto") -> "RayInference":
        """Checked options for a run; Ray itself is imported (and the payload made) when inference starts."""
        if actors is not None and (not isinstance(actors, int) or isinstance(actors, bool) or actors < 1):
            raise AnalyzerError(f"--ray-actors must be a whole number of at least 1, got {actors!r}")
        import_ray()
        options = dict(arch=arch, input_shape=tuple(input_shape) if input_shape else None,
                       class_names=tuple(class_names) if class_names else None, allow_import=allow_import,
                       isolation=isolation, arch_kwargs=arch_kwargs, inputs=inputs)
        return cls(model_source={"spec": model_spec, "given": given, "options": options},
                   address=address, actors=actors)

    def map_rows(self, transform, x: np.ndarray) -> np.ndarray:
        """A stage's row-wise transform of many rows (a projection's), in an actor pool on this run's Ray
        (`map_rows_on_ray`); below TRANSFORM_ON_RAY_ROWS rows, here: the pool's start (seconds) would cost more."""
        if len(x) < TRANSFORM_ON_RAY_ROWS:
            return transform(x)
        return map_rows_on_ray(transform, x, address=self.address, actors=self.actors)

    def _payload(self, ray, model) -> ModelPayload:
        source = self.model_source
        if source["given"] is not None:
            return ModelPayload(spec=str(model.spec), sha256=model.sha256, module=source["given"])
        spec = source["spec"]
        if spec.startswith("sample:"):
            return ModelPayload(spec=spec, sha256=model.sha256, options=source["options"])
        data = Path(spec).read_bytes()
        from ..loading.hashing import sha256_bytes

        if sha256_bytes(data) != model.sha256:
            raise AnalyzerError(f"the model file {spec} changed while the run started: run it again")
        return ModelPayload(spec=spec, sha256=model.sha256, file_name=Path(spec).name, file_bytes=ray.put(data),
                            options=source["options"])

    def __call__(self, model, dataset, stage_dir: Path, *, params: dict, device: str, progress: bool, report):
        from ..evaluation.aggregates import PartialAggregates, group_columns
        from ..evaluation.tasks import task_of
        from ..loading.runs import PROBS, SAMPLE_PART, SAMPLES_DIR, write_json
        from .inference import Predictions
        from .pipeline import run_class_names, write_label_matrix

        ray = connect(self.address)
        started, started_wall = time.perf_counter(), time.time()
        batch_size = params["batch_size"]
        n = len(dataset)
        actors = _pool_size(ray, self.actors, math.ceil(n / batch_size))
        import torch

        # on a local Ray the actors together take the threads this process would take for an in-process run
        # (a test process sharing the cores with another takes one); on a cluster, one per actor's CPU
        threads = max(1, torch.get_num_threads() // actors) if not self.address else 1
        task = task_of(model)
        names = run_class_names(model, dataset)
        blocks, block_rows = _input_blocks(ray, dataset, batch_size=batch_size, min_blocks=4 * actors)
        payload = self._payload(ray, model)
        blocks_s = time.perf_counter() - started
        # one call per block (a whole number of batches): Ray's cost per call is paid per block, not per batch; two
        # blocks per actor at a time: one running, one arriving; the rest go to whichever actor is free
        outputs = _map_in_order(ray, blocks, ModelActor,
                                dict(payload=payload, task=dataset.task, layer=params["layer"], threads=threads,
                                     batch_size=batch_size, device=device),
                                rows_per_call=block_rows, actors=actors, max_tasks_in_flight_per_actor=2)
        # each column's values once: a block takes its rows of them
        groups = {column: dataset.metadata[column].to_numpy() for column in group_columns(dataset.metadata)}
        probs = emb = None
        loss = np.zeros(n, dtype=np.float32)
        total = None
        nodes = set()
        compute_s, first_block_s, actor_init = 0.0, None, (0.0, 0.0)
        done = 0
        bar = _progress_bar(n) if progress else None
        try:
            for batch in outputs.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
                rows = np.asarray(batch["row"])
                start, stop = int(rows[0]), int(rows[0]) + len(rows)
                if start != done or not np.array_equal(rows, np.arange(start, stop)):
                    raise AnalyzerError(f"internal error: Ray returned rows {start}.. where row {done} was due")
                if probs is None:
                    probs = np.lib.format.open_memmap(stage_dir / PROBS, mode="w+", dtype=np.float32,
                                                      shape=(n, batch["probs"].shape[1]))
                probs[start:stop] = batch["probs"]
                loss[start:stop] = batch["loss"]
                if "embedding" in batch:
                    if emb is None:
                        target = stage_dir / "embeddings" / f"{params['layer']}.npy"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        emb = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32,
                                                        shape=(n, batch["embedding"].shape[1]))
                    emb[start:stop] = batch["embedding"]
                part = PartialAggregates.of(task, dataset.y[start:stop], batch["probs"], batch["loss"],
                                            groups={c: values[start:stop] for c, values in groups.items()})
                total = part if total is None else total.merge(part)
                nodes.update(str(v) for v in np.unique(batch["node"]))
                compute_s += float(np.sum(batch["compute_s"]))
                if first_block_s is None:  # Ray's start of the pool: the actors' imports and model loads
                    first_block_s = time.perf_counter() - started
                    init = np.asarray(batch["actor_init"])[:2]
                    actor_init = (float(init[0]) - started_wall, float(init[1]) - started_wall) if len(init) == 2 \
                        else (0.0, 0.0)
                done = stop
                report("inference", done / n)
                if bar is not None:
                    bar.update(len(rows))
        except AnalyzerError:
            raise
        except Exception as exc:  # an actor's failure reaches here as a Ray error wrapping the analysis's own
            raise AnalyzerError(f"inference on Ray failed: {_cause(exc)}") from exc
        finally:
            if bar is not None:
                bar.close()
        if done != n:
            raise AnalyzerError(f"internal error: Ray returned {done} of {n} rows")
        inference_s = time.perf_counter() - started
        probs.flush()
        del probs
        embeddings = None
        if emb is not None:
            emb.flush()
            del emb
            embeddings = np.load(stage_dir / "embeddings" / f"{params['layer']}.npy", mmap_mode="r")
        predictions = Predictions(probs=np.load(stage_dir / PROBS, mmap_mode="r"), loss=loss, embeddings=embeddings,
                                  embedding_layer=params["layer"] if embeddings is not None else None)
        write_label_matrix(stage_dir, dataset)
        write_json(stage_dir / "aggregates.json", total.to_json())
        samples = _write_sample_parts(stage_dir / SAMPLES_DIR, dataset, predictions, task, names,
                                      part_name=SAMPLE_PART)
        return predictions, samples, {"name": "ray", "actors": actors, "nodes": len(nodes), "blocks": len(blocks),
                                      "address": self.address, "inference_s": round(inference_s, 4),
                                      "actor_compute_s": round(compute_s, 4),
                                      "first_block_s": round(first_block_s or 0.0, 4),
                                      "blocks_s": round(blocks_s, 4),
                                      "actor_init_start_s": round(actor_init[0], 4),
                                      "actor_init_end_s": round(actor_init[1], 4)}


class ExplainActor:
    """One model per actor, loaded once: called on a block of {"x", "target", "row"} (and "mask" where the dataset
    plants its evidence), returns each method's maps and faithfulness scores for its rows
    (`explain_run.score_samples`), as columns "<method>:attr" and "<method>:<score>"; a method that does not apply
    to the model gives "<method>:skipped", its reason."""

    def __init__(self, payload: ModelPayload, *, task: str, threads: int, methods: dict, background: np.ndarray,
                 probe: np.ndarray, batch_size: int, sanity: bool, seed: int):
        self.model = _actor_model(payload, task=task, threads=threads)
        self.methods, self.background, self.probe = methods, background, probe
        self.batch_size, self.sanity, self.seed = batch_size, sanity, seed
        # the randomisation check's verdict on the probe set is cached here, once per method: never a driver's path
        self.cache = process_scratch("analyzers-explain-")

    def __call__(self, batch: dict) -> dict:
        from ..errors import InvalidOption
        from ..explanations.explain_run import score_samples

        rows = np.asarray(batch["row"])
        mask = np.asarray(batch["mask"]) if "mask" in batch else None
        out = {"row": rows}
        for method, options in self.methods.items():
            try:
                attr, table = score_samples(self.model, np.asarray(batch["x"]), np.asarray(batch["target"]), method,
                                            options=options, background=self.background, mask=mask,
                                            batch_size=self.batch_size, sanity=self.sanity, probe=self.probe,
                                            cache_dir=self.cache, seed=self.seed)
            except InvalidOption:
                raise  # the caller's option to fix: the run stops, as in-process
            except AnalyzerError as exc:  # the method does not apply to this model
                out[f"{method}:skipped"] = np.full(len(rows), str(exc))
                continue
            out[f"{method}:attr"] = attr
            for column in table.columns:
                out[f"{method}:{column}"] = table[column].to_numpy()
        return out


def explain_on_ray(run, model, x: np.ndarray, targets: np.ndarray, mask, methods: dict, *, background, probe,
                   batch_size: int, sanity: bool, seed: int, address: str | None = None, actors: int | None = None,
                   allow_import: bool = False, given=None) -> dict:
    """`explain_run`'s maps and scores for the samples `x` of the stored `run`, computed in a Ray Data actor pool:
    {method: (attributions, faithfulness table)} or {method: the reason it does not apply}.

    Each actor loads the run's model as `RayInference` does (the checked file's bytes, never a driver's path) and
    explains whole blocks of `batch_size` samples. Every method's maps and scores are an in-process run's: the random
    methods' draws are each sample's own (`attributions.sample_seeds`), whatever block it is in."""
    import pandas as pd

    info = run.info["model"]
    params = run.info.get("parameters") or {}
    if given is None and info.get("source") == "module":
        given = model  # a module handed over in memory: no file holds it, the actors get it as it is
    if given is None and run.task != "classification" and not str(info["spec"]).startswith("sample:"):
        # a model file's explanations on Ray are checked for classification only: the other tasks' maps and scores
        # in an actor's sandboxed worker have no test yet
        raise AnalyzerError(f"explanations on Ray of a {run.task} model file are not supported yet: run explain "
                            f"without --engine ray")
    layout = None
    if info.get("inputs") and info.get("source") == "state_dict":
        from ..loading.inputs import InputLayout

        layout = InputLayout.from_json(info["inputs"])
    names = params.get("class_names")
    engine = RayInference.for_run(info["spec"], given=given, address=address, actors=actors, arch=info.get("arch"),
                                  input_shape=info.get("input_shape"), class_names=names,
                                  arch_kwargs=info.get("arch_kwargs"), inputs=layout, allow_import=allow_import)
    ray = connect(address)
    n = len(x)
    actors = _pool_size(ray, actors, math.ceil(n / batch_size))
    import pyarrow as pa
    import torch
    from ray.data.extensions import ArrowTensorArray

    threads = max(1, torch.get_num_threads() // actors) if not address else 1
    step = batch_size * max(1, math.ceil(n / (batch_size * 2 * actors)))  # whole batches, two blocks per actor
    blocks = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        columns = {"x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32)),
                   "target": pa.array(np.asarray(targets[start:stop], dtype=np.int64)),
                   "row": pa.array(np.arange(start, stop, dtype=np.int64))}
        if mask is not None:
            columns["mask"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(mask[start:stop]))
        blocks.append(ray.put(pa.table(columns)))
    outputs = _map_in_order(ray, blocks, ExplainActor,
                            dict(payload=engine._payload(ray, model), task=run.task, threads=threads,
                                 methods=methods, background=np.asarray(background), probe=np.asarray(probe),
                                 batch_size=batch_size, sanity=sanity, seed=seed),
                            rows_per_call=step, actors=actors)
    parts = _collected(outputs, n, what="explanations")
    found = {}
    for method in methods:
        skipped = [str(p[f"{method}:skipped"][0]) for p in parts if f"{method}:skipped" in p]
        if skipped:
            found[method] = skipped[0]
            continue
        prefix = f"{method}:"
        columns = [k[len(prefix):] for k in parts[0] if k.startswith(prefix) and k != f"{method}:attr"]
        table = pd.DataFrame({c: np.concatenate([np.asarray(p[prefix + c]) for p in parts]) for c in columns})
        found[method] = (np.concatenate([np.asarray(p[f"{method}:attr"]) for p in parts]), table)
    return found


class TransformActor:
    """One fitted row-wise transform per actor (a projection's axes, its placement of new points), unpickled once:
    called on a block of {"x", "row"}, returns the block's transformed rows."""

    def __init__(self, transform, *, threads: int):
        self.transform, self.threads = transform, max(1, int(threads))

    def __call__(self, batch: dict) -> dict:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads):  # BLAS's and OpenMP's threads: one actor per CPU
            out = np.asarray(self.transform(np.asarray(batch["x"])))
        return {"row": np.asarray(batch["row"]), "out": out}


def map_rows_on_ray(transform, x: np.ndarray, *, address: str | None = None, actors: int | None = None,
                    block_rows: int = PART_ROWS) -> np.ndarray:
    """`transform(x)` computed in blocks of `block_rows` rows in a Ray Data actor pool, each actor holding the
    transform once; the blocks' results joined in row order. For a row-wise transform (each row's result its
    own), this is `transform(x)`."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    ray = connect(address)
    n = len(x)
    actors = _pool_size(ray, actors, math.ceil(n / block_rows))
    blocks = [ray.put(pa.table({"x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x[start:start + block_rows])),
                                "row": pa.array(np.arange(start, min(start + block_rows, n), dtype=np.int64))}))
              for start in range(0, n, block_rows)]
    outputs = _map_in_order(ray, blocks, TransformActor, dict(transform=transform, threads=1),
                            rows_per_call=block_rows, actors=actors)
    return np.concatenate([np.asarray(p["out"]) for p in _collected(outputs, n, what="a transform")])


def _pool_size(ray, actors: int | None, calls: int) -> int:
    """The actors of a pool: as asked, else one fewer than the cluster's CPUs (the driver decodes and writes while
    the actors run), and no more than the calls there are to make."""
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return actors or max(1, min(cluster_cpus - 1, calls))


def _map_in_order(ray, blocks: list, actor, constructor_kwargs: dict, *, rows_per_call: int, actors: int,
                  **strategy):
    """The blocks through a pool of `actors` stateful `actor`s (`map_batches` with an ActorPoolStrategy), one call
    per `rows_per_call` rows, the outputs in the blocks' order (each is written where it lands)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = ACTORS_START_S
    return ray.data.from_arrow_refs(blocks).map_batches(
        actor, fn_constructor_kwargs=constructor_kwargs, batch_size=rows_per_call, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=actors, **strategy), batch_format="numpy")


def _collected(outputs, n: int, *, what: str) -> list:
    """Every output batch of a pool whose calls return their "row"s, checked to be rows 0..n-1 in order; an actor's
    failure is one line naming `what` failed."""
    try:
        parts = list(outputs.iter_batches(batch_size=None, batch_format="numpy"))
    except AnalyzerError:
        raise
    except Exception as exc:  # an actor's failure reaches here as a Ray error wrapping the analysis's own
        raise AnalyzerError(f"{what} on Ray failed: {_cause(exc)}") from exc
    rows = np.concatenate([np.asarray(p["row"]) for p in parts]) if parts else np.zeros(0, np.int64)
    if not np.array_equal(rows, np.arange(n)):
        raise AnalyzerError(f"internal error: Ray returned {len(rows)} rows of {n}, or out of order")
    return parts


def _input_blocks(ray, dataset, *, batch_size: int, min_blocks: int) -> list:
    """The dataset's inputs, labels and row numbers as Arrow blocks in the object store, each a whole number of
    batches from the start of the dataset (so that no batch spans two blocks), and the rows per block."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(dataset)
    row_bytes = max(1, int(np.prod(dataset.sample_shape)) * 4)
    batches_per_block = max(1, min(BLOCK_BYTES // (row_bytes * batch_size), math.ceil(n / (batch_size * min_blocks))))
    step = batches_per_block * batch_size
    refs = []
    # a block at a time from a memory-mapped .npy: each block's pages are handed back once it is in the object
    # store (`row_blocks`), so the driver does not hold the whole file beside its copy there (256 MB at 1M rows)
    for start, stop, x in row_blocks(dataset.x, step):
        y = np.asarray(dataset.y[start:stop])
        table = pa.table({"x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                          "y": ArrowTensorArray.from_numpy(y) if y.ndim > 1 else pa.array(y),
                          "row": pa.array(np.arange(start, stop, dtype=np.int64))})
        refs.append(ray.put(table))
    return refs, step


def _write_sample_parts(directory: Path, dataset, predictions, task, names, *, part_name: str):
    """The samples table in parts of PART_ROWS rows (`sample_table.SampleTable` reads them as one); returns it whole.

    A task whose rows are independent (`Task.rows_independent`) builds each part from its rows alone; one whose
    columns depend on every row (a regression's wrong, a quantile of all errors) builds the whole table first."""
    import pandas as pd

    from .inference import Predictions
    from .pipeline import build_samples_table

    directory.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    whole = None if task.rows_independent else build_samples_table(dataset, predictions, task, class_names=names)
    parts = []
    for index, start in enumerate(range(0, n, PART_ROWS)):
        stop = min(start + PART_ROWS, n)
        if whole is not None:
            part = whole.iloc[start:stop].reset_index(drop=True)
        else:
            rows = Predictions(probs=np.asarray(predictions.probs[start:stop]), loss=predictions.loss[start:stop],
                               embeddings=None, embedding_layer=None)
            part = build_samples_table(_rows_of(dataset, start, stop), rows, task, class_names=names)
        part.to_parquet(directory / part_name.format(index), index=False)
        parts.append(part)
    return whole if whole is not None else pd.concat(parts, ignore_index=True)


def _rows_of(dataset, start: int, stop: int):
    """The dataset's rows start..stop-1 (views of its arrays)."""
    return replace(dataset, x=dataset.x[start:stop], y=dataset.y[start:stop], ids=dataset.ids[start:stop],
                   metadata=dataset.metadata.iloc[start:stop].reset_index(drop=True),
                   extras={k: v[start:stop] for k, v in dataset.extras.items()})


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="inference (ray)", unit="sample", leave=False)


def _cause(exc: BaseException) -> str:
    """The line of the error an actor raised (Ray wraps it in its task errors), else this error's own."""
    seen = exc
    # ray.exceptions.RayTaskError(...).cause is what the task raised; Ray Data's UserCodeException ("UDF failed to
    # process a data block") chains the analysis's own error as its __cause__
    while (getattr(seen, "cause", None) or seen.__cause__) is not None:
        seen = getattr(seen, "cause", None) or seen.__cause__
    return first_line(seen)
