"""Batched, no-grad inference: class probabilities, per-sample loss and a chosen layer's activations in one pass."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AnalyzerError, first_line
from ..guard import analysis_mode, unwrap
from ..loading.layers import LayerGroups, last_linear_layer
from ..loading.models import layer_kinds
from ..loading.sandbox import runs_in_worker

OUTPUT_KINDS = ("logits", "probabilities", "binary_logit", "binary_probability", "multilabel_logits")


@dataclass(frozen=True)
class Predictions:
    # (N, K) float32: class probabilities, or what the model's task stores (tasks.Task.outputs_from_raw: a
    # regression's predicted values, (N, 1))
    probs: np.ndarray
    loss: np.ndarray | None  # (N,) float32 per-sample loss of the task (cross-entropy, squared error), given labels
    embeddings: np.ndarray | None  # (N, D) float32 activations of `embedding_layer`, flattened per sample
    embedding_layer: str | None


def class_log_probs(outputs: torch.Tensor, output_kind: str) -> torch.Tensor:
    """Log class probabilities (N, K) from what the model returns; differentiable, so explanations share it. For a
    multi-label model, each label's log probability (its rows do not sum to 1)."""
    if output_kind == "logits":
        return F.log_softmax(outputs, dim=1)
    if output_kind == "probabilities":
        return torch.log(outputs.clamp_min(1e-12))
    if output_kind == "binary_logit":
        return F.log_softmax(torch.cat([torch.zeros_like(outputs), outputs], dim=1), dim=1)
    if output_kind == "binary_probability":
        p = outputs.clamp(1e-12, 1 - 1e-7)
        return torch.log(torch.cat([1 - p, p], dim=1))
    if output_kind == "multilabel_logits":  # each label's own log probability (a sigmoid), not one softmax
        return F.logsigmoid(outputs)
    if output_kind == "value":
        raise AnalyzerError("this model predicts a value (a regression): it has no class probabilities")
    raise AnalyzerError(f"unknown output kind {output_kind!r}: expected one of {', '.join(OUTPUT_KINDS)}")


class ClassLogits(nn.Module):
    """Wraps a model so it returns (N, K) scores whose softmax is the class probabilities, whatever its output is."""

    def __init__(self, module: nn.Module, output_kind: str):
        super().__init__()
        self.model = module
        self.output_kind = output_kind

    def forward(self, x):
        out = self.model(x)
        return out if self.output_kind == "logits" else class_log_probs(out, self.output_kind)


def default_embedding_layer(model) -> str | None:
    """The final classifier layer (its input is the embedding): the last linear layer of the model."""
    if isinstance(model, LayerGroups):
        return model.embedding_layer
    return last_linear_layer([name for name, _ in unwrap(model).named_modules()], layer_kinds(model))


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters live (CPU for a module without any)."""
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def on_device(module: nn.Module, device: str):
    """Move the module to `device` for the analysis and back to where it was afterwards."""
    home = module_device(module)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnalyzerError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def resolve_layer(module: nn.Module, name: str) -> nn.Module:
    modules = dict(module.named_modules())
    if name not in modules or not name:
        raise AnalyzerError(f"the model has no layer {name!r}: choose one of {', '.join(list(modules)[1:12])}")
    return modules[name]


@contextlib.contextmanager
def captured_layer(module: nn.Module, layer: str | None, *, capture: str = "output"):
    """A hook on `layer` of `module` that keeps a detached clone of what enters it (`capture="input"`) or leaves it
    ("output"; a tuple output's first element) at each call: yields (the layer, the list of captures), and removes
    the hook on the way out. The clone: an in-place activation after the layer (ReLU(inplace=True)) would rewrite a
    view. `layer` None yields (None, []) and hooks nothing."""
    if capture not in ("input", "output"):
        raise AnalyzerError(f"capture must be 'input' or 'output', got {capture!r}")
    captured: list = []
    if layer is None:
        yield None, captured
        return
    target = resolve_layer(module, layer)
    if capture == "input":
        handle = target.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    else:
        handle = target.register_forward_hook(lambda _m, _a, out: captured.append(
            (out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        yield target, captured
    finally:
        handle.remove()


def forward_batches(module: nn.Module, x, *, batch_size: int, device="cpu"):
    """Yield (start, batch, output) for `module` run on `x` in batches of `batch_size` (the caller sets the mode and
    the gradient context). Each batch is a float32 copy: rows of a read-only (memory-mapped) array become a tensor
    torch may write. A forward that raises becomes one line naming the samples."""
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.array(x[start:start + batch_size], dtype=np.float32)).to(device)
        try:
            out = module(batch)
        except Exception as exc:
            raise AnalyzerError(f"the model's forward failed on samples {start}..{start + len(batch) - 1} "
                                f"({first_line(exc)}): check the inputs match what it expects") from exc
        yield start, batch, out


@runs_in_worker
def predict(model, x, y=None, *, batch_size: int = 256, layer: str | None = None, capture: str = "input",
            device: str = "cpu", progress: bool = False, on_batch=None) -> Predictions:
    """Probabilities, per-sample loss (when `y` is given) and the activations of `layer`, batch by batch.

    `model` is a LoadedModel (its output kind is used) or a module returning logits. With `layer`, `capture="input"`
    stores what enters that layer (the embedding, for a final classifier) and `capture="output"` what leaves it.
    `on_batch(done, total)` reports progress to a UI; `progress=True` shows a tqdm bar.
    """
    if batch_size < 1:
        raise AnalyzerError(f"batch_size must be at least 1, got {batch_size}")
    if capture not in ("input", "output"):  # checked before any work, as captured_layer would on the first batch
        raise AnalyzerError(f"capture must be 'input' or 'output', got {capture!r}")
    from ..evaluation.tasks import task_of

    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    task = task_of(model)  # what the outputs mean: what is stored and which loss
    n = len(x)
    # a copy (labels are small): a read-only y (a reloaded run's, a worker's) would otherwise be shared with a
    # tensor, which torch warns about on every run
    labels = None if y is None else torch.from_numpy(np.array(y, dtype=task.label_dtype))
    # filled batch by batch, allocated at the first batch (when the widths are known): no list of batches and no
    # concatenated copy beside it, which doubled a million-row run's embeddings
    probs_out = loss_out = emb_out = None
    batches = embedded = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="inference", unit="sample", leave=False)
    try:
        with analysis_mode(module), torch.inference_mode(), on_device(module, device), \
                captured_layer(module, layer, capture=capture) as (_, captured):
            for start, batch, out in forward_batches(module, x, batch_size=batch_size, device=device):
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise AnalyzerError(f"the model returned {shape} for a batch of {len(batch)}; expected (N, classes)")
                if not torch.isfinite(out).all():
                    raise AnalyzerError(f"the model returned NaN or inf on samples {start}..{start + len(batch) - 1}: "
                                        f"check the inputs and weights")
                stop = start + len(batch)
                outputs = task.outputs_from_raw(out.float(), output_kind).cpu().numpy()
                if probs_out is None:
                    probs_out = np.empty((n, outputs.shape[1]), dtype=np.float32)
                    loss_out = None if labels is None else np.empty(n, dtype=np.float32)
                probs_out[start:stop] = outputs
                if labels is not None:
                    loss_out[start:stop] = task.loss_from_raw(out.float(), labels[start:stop].to(device),
                                                              output_kind).cpu().numpy()
                batches += 1
                if captured:
                    activations = captured.pop().flatten(1).float().cpu().numpy()
                    captured.clear()
                    if emb_out is None:
                        emb_out = np.empty((n, activations.shape[1]), dtype=np.float32)
                    emb_out[start:stop] = activations
                    embedded += 1
                if bar is not None:
                    bar.update(len(batch))
                if on_batch is not None:
                    on_batch(min(start + batch_size, n), n)
    finally:
        if bar is not None:
            bar.close()
    if layer is not None and embedded != batches:
        raise AnalyzerError(f"layer {layer!r} did not run during the forward pass: choose a layer the model calls")
    empty_k = getattr(model, "num_classes", 0)
    return Predictions(
        probs=probs_out if probs_out is not None else np.zeros((0, empty_k), np.float32),
        loss=loss_out, embeddings=emb_out if batches else None, embedding_layer=layer,
    )
