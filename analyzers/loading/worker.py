"""The sandboxed worker's main loop: `python -m analyzers.loading.worker`, started by `analyzers.loading.sandbox`.

It reads request frames on its stdin and answers on its stdout (both moved to private descriptors first, so that
anything the model prints cannot corrupt the protocol). It holds one model and at most one dataset, both read from
descriptors its parent opened. Requests: `load_model`, `load_dataset`, `call` (a `@runs_in_worker` function with
the model first) and `ping`. Every failure is answered with one line; nothing is pickled.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from . import wire


def main() -> int:
    requests = os.dup(0)
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # print() from model code lands in the worker's log, not in the reply stream

    threads = int(os.environ.get("ANALYZERS_WORKER_THREADS", "1"))
    import torch

    torch.set_num_threads(max(1, threads))
    state: dict = {"model": None, "dataset": None, "model_bytes": None}
    wire.write_frame(replies, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            request = wire.read_frame(requests)
        except EOFError:
            return 0
        try:
            result = _handle(request, state, replies)
            wire.write_frame(replies, {"ok": result})
        except MemoryError:
            wire.write_frame(replies, {"error": "the model ran out of memory in its worker (the worker's memory "
                                                "limit; raise ANALYZERS_WORKER_MEMORY_MB): try a smaller batch size"})
        except Exception as exc:  # every failure is one line to the parent; the loop goes on
            from ..errors import AnalyzerError, first_line

            text = str(exc) if isinstance(exc, AnalyzerError) else f"{type(exc).__name__}: {first_line(exc)}"
            wire.write_frame(replies, {"error": text.splitlines()[0] if text.strip() else type(exc).__name__})


def _read_fd(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as fh:
        fh.seek(0)
        return fh.read()


def _handle(request, state: dict, replies: int):
    import numpy as np

    from ..errors import AnalyzerError

    if not isinstance(request, dict):
        raise AnalyzerError("the worker got a request it does not understand")
    op = request.get("op")
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "load_model":
        from .models import load_model, load_model_bytes

        options = dict(arch=request.get("arch"),
                       input_shape=tuple(request["input_shape"]) if request.get("input_shape") else None,
                       class_names=tuple(request["class_names"]) if request.get("class_names") else None)
        if request.get("fd") is None:  # a built-in sample, from the project's own read-only files
            model = load_model(str(request["spec"]), isolation="process", **options)
        else:
            model = load_model_bytes(_read_fd(int(request["fd"])), name=str(request["name"]),
                                     spec=str(request["spec"]), check_archive=bool(request.get("check_archive", True)),
                                     **options)
        state["model"] = model
        return {"spec": model.spec, "sha256": model.sha256, "source": model.source,
                "input_shape": list(model.input_shape), "num_classes": model.num_classes,
                "class_names": list(model.class_names), "output_kind": model.output_kind,
                "layers": list(model.layers), "layer_kinds": dict(model.layer_kinds),
                "inputs": model.input_layout.to_json() if model.input_layout is not None else None,
                "feature_names": list(model.feature_names) if model.feature_names else None}
    if op == "load_dataset":
        from .datasets import describe_dataset, load_dataset_file

        if state["model"] is None:
            raise AnalyzerError("internal error: the worker loads a model before a dataset")
        options = dict(request.get("options") or {})
        parts = {}
        for part in request["parts"]:  # one file, or one per split (splits.combine_splits)
            if part.get("split") is not None and part.get("split") in parts:
                raise AnalyzerError("internal error: a split was handed to the worker twice")
            if part.get("fd") is None:  # built-in sample data, from the project's own read-only files
                from .datasets import load_dataset

                loaded = load_dataset(str(part["spec"]), model=state["model"], **options)
            else:
                with os.fdopen(os.dup(int(part["fd"])), "rb") as fh:
                    loaded = load_dataset_file(fh, name=str(part["name"]), spec=str(part["spec"]),
                                               model=state["model"], **options)
            parts[part.get("split")] = loaded
        if list(parts) == [None]:
            dataset = parts[None]
        else:
            from .splits import combine_splits

            dataset = combine_splits(parts)
        from ..evaluation.tasks import read_for_task
        from .datasets import check_dataset

        # the model is read for the dataset's task (a regression model's output is its value), here as in the parent
        state["model"] = read_for_task(state["model"], dataset.task)
        check_dataset(dataset, state["model"])
        state["dataset"] = dataset
        return describe_dataset(dataset)
    if op == "read_for_task":  # a model loaded without its dataset (a Ray actor's): read for the run's task here,
        # as load_dataset reads it for the dataset's
        from ..evaluation.tasks import TASK_NAMES, read_for_task

        if state.get("model") is None or request.get("task") not in TASK_NAMES:
            raise AnalyzerError("internal error: read_for_task needs a loaded model and a task name")
        state["model"] = read_for_task(state["model"], str(request["task"]))
        return {"output_kind": state["model"].output_kind, "num_classes": state["model"].num_classes}
    if op == "dataset":  # hand the loaded dataset to the parent (sandbox.worker_dataset) and drop it here
        from .datasets import MAX_DATASET_BYTES, dataset_fields

        dataset, state["dataset"] = state["dataset"], None
        if dataset is None:
            raise AnalyzerError("internal error: the worker has no dataset loaded")
        size = dataset.x.nbytes + dataset.y.nbytes + sum(np.asarray(v).nbytes for v in dataset.extras.values())
        if size > MAX_DATASET_BYTES:
            raise AnalyzerError(f"the dataset takes {size:,} bytes in memory, over the dashboard's "
                                f"{MAX_DATASET_BYTES:,}-byte limit: analyse a smaller part of it")
        return dataset_fields(dataset)
    if op == "call":
        from .sandbox import registered

        if state["model"] is None:
            raise AnalyzerError("internal error: the worker has no model loaded")
        function = registered(str(request["function"]))
        args = list(request.get("args") or [])
        kwargs = dict(request.get("kwargs") or {})
        if request.get("dataset"):
            if state["dataset"] is None:
                raise AnalyzerError("internal error: the worker has no dataset loaded")
            args.insert(0, state["dataset"])
        scratch = Path(os.environ.get("ANALYZERS_WORKER_SCRATCH", "/scratch"))
        for name in getattr(function, "__worker_scratch_kwargs__", ()):
            kwargs[name] = scratch / "cache" / name
        parameters = inspect.signature(function).parameters
        if request.get("report"):
            def send(stage, fraction):
                wire.write_frame(replies, {"progress": [str(stage), float(fraction)]})

            if "report" in parameters:
                kwargs["report"] = send
            if "on_batch" in parameters:
                kwargs["on_batch"] = lambda done, total: send("batch", done / max(total, 1))
        return function(state["model"], *args, **kwargs)
    raise AnalyzerError(f"the worker does not know the request {str(op)[:40]!r}")


if __name__ == "__main__":
    sys.exit(main())
