"""Gradient health of a loaded model: per-layer gradient norms over a few batches, dead ReLUs, overfit-one-batch.

Gradients are taken with `torch.autograd.grad` (never `.backward()`), so no parameter's `.grad` is touched, and in
eval mode, so batch-norm statistics stay as they are. Activations are read from forward hooks on the layers that hold
parameters; each hook hands the rest of the network a copy of the layer's output, so an in-place activation that
follows (`nn.ReLU(inplace=True)`) rewrites the copy and the captured activation stays the layer's own output.

Run files: `gradients/traces.parquet`, `gradients/dead_units.parquet`, `gradients/flags.json`, for the sample
models `training/log.jsonl` (their TrainingRecorder log), and `gradients/overfit.json` once the overfit-one-batch
check has been asked for (`ensure_overfit_check`).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import AnalyzerError, InvalidOption, first_line
from ..guard import analysis_mode, unwrap
from ..engines.inference import on_device
from ..evaluation.tasks import task_of
from ..loading.models import layer_kinds
from .recorder import layer_of_parameter
from ..loading.sandbox import runs_in_worker

VANISHING_RATIO = 1e-6  # gradient norm / weight norm below this: a step of any sane learning rate changes nothing
EXPLODING_RATIO = 10.0  # above this: one step at learning rate 0.1 would change the weights by more than themselves
TRAINING_LOG = "training/log.jsonl"
OVERFIT_CHECK = "gradients/overfit.json"


@dataclass(frozen=True)
class GradientTraces:
    # batch, layer, kind ("parameters"|"activations"), grad_norm, weight_norm, activation_norm, ratio, loss
    traces: pd.DataFrame
    dead_units: pd.DataFrame  # layer, units, dead_units, dead_fraction, samples
    flags: dict  # vanishing/exploding/dead layer lists, in-place activations, thresholds
    params: dict
    timings: dict


@dataclass(frozen=True)
class OverfitResult:
    losses: np.ndarray  # (steps + 1,) loss on the batch before each step and after the last
    initial_loss: float
    final_loss: float
    passed: bool
    message: str
    params: dict
    seconds: float

    @property
    def judged(self) -> bool:
        """False when the time limit stopped training before the loss got low enough: neither passed nor failed."""
        return self.passed or not self.params.get("stopped_early", False)


def _relu_layers(module: nn.Module, kinds: dict) -> list:
    names = []
    for name, sub in module.named_modules():
        if name and (isinstance(sub, nn.ReLU) or kinds.get(name) in ("relu", "relu_inplace")):
            names.append(name)
    return names


def inplace_activations(model) -> list:
    """Names of activation layers that overwrite their input (`inplace=True` modules, or `relu_` in an export graph)."""
    module = unwrap(model)
    names = set(getattr(model, "inplace_activations", ()) or ())
    for name, sub in module.named_modules():
        if name and getattr(sub, "inplace", False):
            names.add(name)
    return [name for name, _ in module.named_modules() if name in names]


def _parameter_layers(module: nn.Module) -> dict:
    """layer name -> its parameters (grouped like the TrainingRecorder groups them)."""
    layers: dict = {}
    for name, param in module.named_parameters():
        layers.setdefault(layer_of_parameter(name), []).append((name, param))
    return layers


def _norm(tensors) -> float:
    total = sum(float(t.detach().double().pow(2).sum()) for t in tensors if t is not None)
    return math.sqrt(total)


def _loss(outputs: torch.Tensor, labels: torch.Tensor, output_kind: str, task) -> torch.Tensor:
    """The batch's mean training loss for the model's task (cross-entropy, or squared error for a regression)."""
    return task.loss_from_raw(outputs.float(), labels, output_kind).mean()


@runs_in_worker
def gradient_norm_traces(model, x, y, *, batch_size: int = 64, num_batches: int = 8, seed: int = 0,
                         vanishing_ratio: float = VANISHING_RATIO, exploding_ratio: float = EXPLODING_RATIO,
                         device: str = "cpu") -> GradientTraces:
    """Per batch and layer: the loss gradient's norm w.r.t. the layer's parameters and its output, and dead ReLU units.

    Batches are `num_batches` disjoint random batches of `batch_size` samples (seeded). A layer is flagged vanishing
    when its median gradient/weight norm ratio is below `vanishing_ratio`, exploding when above `exploding_ratio`
    or not finite. A ReLU unit (channel of a convolution, feature of a linear layer) is dead when it was never
    positive on any sample of any batch.
    """
    if batch_size < 1 or num_batches < 1:
        raise InvalidOption(f"batch_size and num_batches must be at least 1, got {batch_size} and {num_batches}")
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    task = task_of(model)
    kinds = layer_kinds(model)
    x = np.asarray(x)
    labels_all = np.asarray(y)
    if len(x) != len(labels_all) or len(x) == 0:
        raise AnalyzerError(f"gradient traces need inputs and labels of the same non-zero length, got {len(x)} and "
                            f"{len(labels_all)}")
    order = np.random.default_rng(seed).permutation(len(x))
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
    batches = [b for b in batches if len(b)]
    # A short last batch (450 samples in 8 batches of 64 left one of 2) has gradients of another scale: it dropped
    # every norm by orders of magnitude on the chart. It is left out unless it is the only batch.
    partial = len(batches[-1]) if len(batches) > 1 and len(batches[-1]) < batch_size else None
    if partial is not None:
        batches = batches[:-1]
    layers = _parameter_layers(module)
    if not layers:
        raise AnalyzerError("the model has no parameters, so it has no gradients to trace")
    named = dict(module.named_modules())
    hooked = [name for name in layers if name in named]  # layers whose own module runs, so its output can be captured
    relus = _relu_layers(module, kinds)
    inplace = inplace_activations(model)
    weight_norms = {name: _norm(p for _, p in params) for name, params in layers.items()}

    rows, timings = [], {"forward_backward": 0.0}
    # Keyed by call site, (layer, k) for the k-th call of the layer's module in one forward pass: one module can run
    # at several places (one `self.relu` after layers of different widths, a Bottleneck's single in-place ReLU).
    active: dict = {}
    units: dict = {}
    outputs_seen: dict = {}
    relu_seen: dict = {}
    unused: set = set()
    calls: dict = {}  # (layer, kind) -> calls so far in this forward pass
    most_calls: dict = {}  # layer -> the most calls seen in one forward pass

    def call_index(name: str, kind: str) -> int:
        k = calls.get((name, kind), 0)
        calls[(name, kind)] = k + 1
        most_calls[name] = max(most_calls.get(name, 0), k + 1)
        return k

    def capture_output(name):
        def hook(_module, _args, out):
            if not isinstance(out, torch.Tensor):
                return None
            outputs_seen[(name, call_index(name, "output"))] = out
            return out.clone()  # later in-place ops rewrite the copy; `out` stays the layer's own output
        return hook

    def capture_relu(name):
        def hook(_module, _args, out):
            site = (name, call_index(name, "relu"))
            if isinstance(out, torch.Tensor) and out.ndim >= 2:
                with torch.no_grad():
                    positive = (out.detach() > 0).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
                active[site] = positive | active[site] if site in active else positive
                units[site] = out.shape[1]
                relu_seen[site] = relu_seen.get(site, 0) + out.shape[0]
        return hook

    def site_name(site) -> str:
        """"relu" for a module that runs once per pass; "relu@1", "relu@2", ... for each call of one that runs more."""
        name, k = site
        return name if most_calls.get(name, 1) <= 1 else f"{name}@{k + 1}"

    handles = []
    started = time.perf_counter()
    with analysis_mode(module), on_device(module, device):
        try:
            for name in hooked:
                handles.append(named[name].register_forward_hook(capture_output(name)))
            for name in relus:
                handles.append(named[name].register_forward_hook(capture_relu(name)))
            param_list = [p for params in layers.values() for _, p in params]
            for p in param_list:
                p.requires_grad_(True)  # frozen layers too: their gradient says as much about the network's health
            for number, rows_idx in enumerate(batches):
                outputs_seen.clear()
                calls.clear()
                inputs = torch.as_tensor(x[rows_idx], dtype=torch.float32, device=device)
                labels = torch.as_tensor(labels_all[rows_idx].astype(task.label_dtype), device=device)
                t0 = time.perf_counter()
                try:
                    loss = _loss(module(inputs), labels, output_kind, task)
                except AnalyzerError:
                    raise
                except Exception as exc:
                    raise AnalyzerError(f"the model's forward failed on a gradient batch ({first_line(exc)}): check "
                                        f"the inputs match what it expects") from exc
                if not loss.requires_grad:
                    raise AnalyzerError("the model's output does not depend on its parameters (a detached output or "
                                        "torch.no_grad inside forward): gradients cannot be traced")
                captured = list(outputs_seen.items())
                grads = torch.autograd.grad(loss, param_list + [out for _, out in captured], allow_unused=True)
                timings["forward_backward"] += time.perf_counter() - t0
                param_grads = dict(zip((id(p) for p in param_list), grads[:len(param_list)]))
                for name, params in layers.items():
                    if all(param_grads[id(p)] is None for _, p in params):
                        unused.add(name)  # the loss does not reach it (an unused head): no gradient, not a small one
                        continue
                    grad_norm = _norm(param_grads[id(p)] for _, p in params)
                    rows.append({"batch": number, "layer": name, "kind": "parameters", "grad_norm": grad_norm,
                                 "weight_norm": weight_norms[name], "activation_norm": math.nan,
                                 "ratio": grad_norm / weight_norms[name] if weight_norms[name] > 0 else math.inf,
                                 "loss": float(loss.detach())})
                for (site, out), grad in zip(captured, grads[len(param_list):]):
                    grad_norm = _norm([grad])
                    act_norm = _norm([out])
                    rows.append({"batch": number, "layer": site_name(site), "kind": "activations",
                                 "grad_norm": grad_norm,
                                 "weight_norm": math.nan, "activation_norm": act_norm,
                                 "ratio": grad_norm / act_norm if act_norm > 0 else math.nan,
                                 "loss": float(loss.detach())})
            outputs_seen.clear()
        finally:
            for handle in handles:
                handle.remove()
    timings["total"] = time.perf_counter() - started

    traces = pd.DataFrame(rows, columns=["batch", "layer", "kind", "grad_norm", "weight_norm", "activation_norm",
                                         "ratio", "loss"])
    dead = pd.DataFrame([{"layer": site_name(site), "units": int(units[site]), "dead_units": int((~active[site]).sum()),
                          "dead_fraction": float((~active[site]).float().mean()), "samples": int(relu_seen[site])}
                         for site in sorted(active, key=lambda s: (relus.index(s[0]), s[1]))],
                        columns=["layer", "units", "dead_units", "dead_fraction", "samples"]).astype(
        {"layer": str, "units": np.int64, "dead_units": np.int64, "dead_fraction": np.float64, "samples": np.int64})
    # typed even when empty (a GELU transformer has no ReLU): an empty table of objects is a damaged file
    exempt = embedding_like_layers(module)
    flags = flag_layers(traces, dead, vanishing_ratio=vanishing_ratio, exploding_ratio=exploding_ratio, exempt=exempt)
    flags["ratio_exempt_layers"] = exempt
    flags["inplace_activations"] = inplace
    flags["activation_capture"] = ("each parameterised layer's own output (copied before any in-place activation "
                                   "runs)" if inplace else "each parameterised layer's own output")
    flags["unhooked_layers"] = [name for name in layers if name not in named]
    flags["unused_layers"] = [name for name in layers if name in unused]
    params = {"batch_size": batch_size, "num_batches": len(batches), "dropped_partial_batch": partial, "seed": seed,
              "mode": "eval",
              "samples": int(sum(len(b) for b in batches)), "sample_rows": np.concatenate(batches).tolist(),
              "vanishing_ratio": vanishing_ratio, "exploding_ratio": exploding_ratio}
    return GradientTraces(traces=traces, dead_units=dead, flags=flags, params=params,
                          timings={k: round(v, 4) for k, v in timings.items()})


def embedding_like_layers(module: nn.Module) -> list:
    """Parameter groups whose gradient/weight ratio says nothing about gradient health: lookup tables
    (`nn.Embedding`, whose rows get gradient only when their token occurs) and free parameters that no layer
    multiplies with its input (a ViT's `cls_token`, position embeddings, a mask token), often initialised at zero."""
    named = dict(module.named_modules())
    out = []
    for layer, params in _parameter_layers(module).items():
        free = all(name.rsplit(".", 1)[-1] not in ("weight", "bias") for name, _ in params)
        if free or isinstance(named.get(layer), nn.Embedding):
            out.append(layer)
    return out


def flag_layers(traces: pd.DataFrame, dead: pd.DataFrame, *, vanishing_ratio: float = VANISHING_RATIO,
                exploding_ratio: float = EXPLODING_RATIO, exempt=()) -> dict:
    """Layers whose median parameter-gradient/weight ratio is below/above the thresholds, and ReLUs with dead units.

    `exempt` layers (embedding_like_layers) are flagged only for a gradient that is not finite."""
    params = traces[traces["kind"] == "parameters"]
    vanishing, exploding = [], []
    for layer, group in params.groupby("layer", sort=False):
        ratios = group["ratio"].to_numpy(dtype=float)
        if not np.isfinite(group["grad_norm"].to_numpy(dtype=float)).all():
            exploding.append(layer)
            continue
        if layer in exempt:
            continue
        median = float(np.median(ratios))
        if median > exploding_ratio:
            exploding.append(layer)
        elif median < vanishing_ratio:
            vanishing.append(layer)
    dead_layers = {row.layer: round(float(row.dead_fraction), 6) for row in dead.itertuples() if row.dead_units > 0}
    return {"vanishing": vanishing, "exploding": exploding, "dead_relu_layers": dead_layers,
            "thresholds": {"vanishing_ratio": vanishing_ratio, "exploding_ratio": exploding_ratio}}


@runs_in_worker
def overfit_one_batch(model, x, y, *, steps: int = 200, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                      pass_fraction: float = 0.1, near_zero: float = 0.05, device: str = "cpu",
                      fresh: bool = True, time_limit_s: float | None = None, on_batch=None) -> OverfitResult:
    """Train a copy of the model with Adam on one batch and report whether its loss falls towards zero.

    The loaded model is never trained: a copy is (`LoadedModel.copy_module()`, which reloads a `.pt2` file's bytes).
    With `fresh` (the default) the copy's parameters are first re-initialised (seeded `reset_parameters`, or
    PyTorch's default scheme for a `.pt2`'s modules): the debugging step asks whether the architecture, loss and
    labels can learn at all, and a trained model starts near zero loss, so it would pass whatever its wiring.
    `fresh=False` starts from the trained weights. Passed when the final loss is below `pass_fraction` of the
    initial loss or below `near_zero`.

    `time_limit_s` stops training after that many seconds (judged on the loss reached, and said in the message): a
    person waiting in the dashboard gets an answer in about that time whatever the model's size. `on_batch(done,
    total)` is told each step.
    """
    if time_limit_s is not None and not (time_limit_s > 0 and math.isfinite(time_limit_s)):
        raise AnalyzerError(f"time_limit_s must be a positive number of seconds, got {time_limit_s}")
    if steps < 1 or batch_size < 1:
        raise AnalyzerError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if lr < 0 or not math.isfinite(lr):
        raise AnalyzerError(f"lr must be a non-negative number, got {lr}")
    original = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    task = task_of(model)
    x = np.asarray(x)
    labels_all = np.asarray(y)
    if len(x) != len(labels_all) or len(x) == 0:
        raise AnalyzerError(f"overfit_one_batch needs inputs and labels of the same non-zero length, got {len(x)} "
                            f"and {len(labels_all)}")
    rows = np.random.default_rng(seed).permutation(len(x))[:batch_size]
    with analysis_mode(original):  # holds the model's lock while it is copied
        if hasattr(model, "copy_module"):
            copy = model.copy_module()
        else:
            import copy as copy_lib

            copy = copy_lib.deepcopy(original)
    params = {"steps": steps, "lr": lr, "optimizer": "Adam", "batch_size": int(len(rows)), "seed": seed,
              "pass_fraction": pass_fraction, "near_zero": near_zero, "mode": "train",
              "start": "fresh initialisation" if fresh else "trained weights", "sample_rows": rows.tolist()}
    if fresh:
        from ..explanations.faithfulness import reinitialise

        generator = torch.Generator().manual_seed(seed)
        for sub in copy.modules():
            if any(True for _ in sub.parameters(recurse=False)):
                reinitialise(sub, generator)
    torch.manual_seed(seed)
    copy.to(device).train()
    trainable = list(copy.parameters())
    for p in trainable:
        p.requires_grad_(True)
    inputs = torch.as_tensor(x[rows], dtype=torch.float32, device=device)
    labels = torch.as_tensor(labels_all[rows].astype(task.label_dtype), device=device)
    losses = []
    started = time.perf_counter()
    optimizer = torch.optim.Adam(trainable, lr=lr) if trainable else None
    for step in range(steps + 1):
        loss = _loss(copy(inputs), labels, output_kind, task)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if on_batch is not None:
            on_batch(step, steps)
        if step == steps or (time_limit_s is not None and time.perf_counter() - started > time_limit_s):
            break
        if optimizer is None or not loss.requires_grad:
            seconds = time.perf_counter() - started
            return OverfitResult(losses=np.asarray(losses, np.float32), initial_loss=losses[0], final_loss=losses[-1],
                                 passed=False, params=params, seconds=seconds,
                                 message="the loss does not depend on any trainable parameter (a detached output or "
                                         "no parameters): the model cannot learn")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    initial, final = losses[0], losses[-1]
    trained = len(losses) - 1
    params["steps_done"] = trained
    if time_limit_s is not None:
        params["time_limit_s"] = time_limit_s
    limit = (f" (stopped at the {time_limit_s:g} s limit after {trained} of {steps} steps)" if trained < steps
             and math.isfinite(final) else "")
    params["stopped_early"] = bool(limit)
    if not math.isfinite(final):
        passed, message = False, f"the loss became {final} after {len(losses) - 1} steps: lower lr or check the model"
    elif limit and not (final < pass_fraction * initial or final < near_zero):
        # out of time is not a failure: nothing says the model could not have got there
        passed = False
        message = (f"not judged: the loss fell from {initial:.4g} to {final:.4g} in {trained} of {steps} steps, from "
                   f"{params['start']}, before the {time_limit_s:g} s limit stopped it; raise the time limit or lower "
                   f"the steps")
    else:
        passed = final < pass_fraction * initial or final < near_zero
        message = (f"loss fell from {initial:.4g} to {final:.4g} in {trained} steps, from {params['start']}{limit}" +
                   ("" if passed else f": it did not reach {pass_fraction:g}x the initial loss or {near_zero:g}; "
                                      f"check the labels, the loss, frozen layers or the learning rate"))
    return OverfitResult(losses=np.asarray(losses, np.float32), initial_loss=initial, final_loss=final,
                         passed=bool(passed), message=message, params=params, seconds=seconds)


def ensure_overfit_check(run, **options) -> dict:
    """`overfit_one_batch` on a stored run's model and data, cached as `gradients/overfit.json` in the run."""
    from ..engines.pipeline import load_run_inputs
    from ..loading.runs import Run, open_run, write_json

    run = run if isinstance(run, Run) else open_run(run)
    if run.has(OVERFIT_CHECK):
        stored = run.read_json(OVERFIT_CHECK)
        # a check from before fresh initialisation started from the trained weights: it is run again
        if stored.get("options") == options and "start" in stored.get("params", {}):
            return stored
    model, dataset = load_run_inputs(run)
    result = overfit_one_batch(model, dataset.x, dataset.y, **options)
    record = {"passed": result.passed, "message": result.message, "initial_loss": result.initial_loss,
              "final_loss": result.final_loss, "losses": result.losses.tolist(), "seconds": round(result.seconds, 4),
              "params": {**result.params, "sample_ids": np.asarray(dataset.ids)[result.params["sample_rows"]].tolist()},
              "options": options}
    write_json(run.file(OVERFIT_CHECK), record)
    return record


def gradient_stage(ctx) -> dict:
    """Pipeline stage: gradient traces over a few batches, dead ReLUs, flags, and the sample's training log."""
    from ..loading.runs import write_json

    options = dict((ctx.params.get("stage_options") or {}).get("gradients", {}))
    traces = gradient_norm_traces(ctx.model, ctx.dataset.x, ctx.dataset.y,
                                  batch_size=int(options.get("batch_size", 64)),
                                  num_batches=int(options.get("num_batches", 8)), seed=ctx.params.get("seed", 0),
                                  vanishing_ratio=float(options.get("vanishing_ratio", VANISHING_RATIO)),
                                  exploding_ratio=float(options.get("exploding_ratio", EXPLODING_RATIO)))
    traces.traces.to_parquet(ctx.path("gradients/traces.parquet"), index=False)
    traces.dead_units.to_parquet(ctx.path("gradients/dead_units.parquet"), index=False)
    params = {k: v for k, v in traces.params.items() if k != "sample_rows"}
    write_json(ctx.path("gradients/flags.json"), {**traces.flags, "params": {**traces.params,
               "sample_ids": np.asarray(ctx.dataset.ids)[traces.params["sample_rows"]].tolist()},
               "timings_s": traces.timings})
    log = sample_training_log(ctx.model)
    if log is not None:
        shutil.copyfile(log, ctx.path(TRAINING_LOG))
    return {**{k: traces.flags[k] for k in ("vanishing", "exploding", "dead_relu_layers", "inplace_activations")},
            "params": params, "timings_s": traces.timings, "training_log": TRAINING_LOG if log is not None else None}


def sample_training_log(model):
    """The TrainingRecorder log shipped with a sample model, or None for other models."""
    spec = getattr(model, "spec", "") or ""
    if getattr(model, "source", None) != "sample" or not spec.startswith("sample:"):
        return None
    from sample_models import get_sample

    path = get_sample(spec.split(":", 1)[1]).log_path
    return path if path.is_file() else None
