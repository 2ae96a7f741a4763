"""Inside the network: what a layer's channels (or units) respond to.

A layer's output is read as units over positions:
- a convolution's (N, C, H, W) or (N, C, L): C channels, each a map over its positions;
- a linear layer's (N, U): U units, one position each;
- any other 3-D output (N, T, D), a token model's: D units over T token positions (the transformer convention).

- `layer_activations(model, inputs, layer=...)`: the layer's output for a few samples, each channel's `strength`
  (its response: the mean of its map by default) and the channels of each sample strongest first (`order`), for a
  grid of a sample's feature maps.
- `top_activating(model, inputs, layer=...)`: over a whole dataset, in batches, the `k` samples that activate each
  channel most (its map's maximum by default) with their responses, and where in the map the maximum lies: the
  dataset examples that show what a channel detects.
- `run_top_activating(run_dir, layer=...)`: the same over a stored run's dataset, kept in the run
  (`network/top_activating/<layer>.npz`) and read back while the model, data and options are the same.

Both leave the model as they found it: one forward hook on the layer, removed afterwards, in eval mode
(`analysis_mode`), without gradients; they run in a sandboxed model's worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnalyzerError, InvalidOption
from ..loading.sandbox import runs_in_worker

REDUCTIONS = ("max", "mean")  # how a channel's map over its positions becomes one response
TOP_ACTIVATING = "network/top_activating"  # in a run: one .npz per layer


@dataclass(frozen=True)
class LayerActivations:
    """`activations` (N, units, *positions) float32, channels first whatever the layer's own layout; `strength`
    (N, units) each unit's response; `order` (N, units) the units of each sample, strongest first."""

    layer: str
    kind: str  # "conv" (channels over a grid or a line), "linear" (units) or "tokens" (units over token positions)
    reduce: str
    activations: np.ndarray
    strength: np.ndarray
    order: np.ndarray


@dataclass(frozen=True)
class TopActivating:
    """For each unit u of `layer`: `rows[u]` the `k` dataset rows that activate it most (highest response first),
    `scores[u]` their responses, and `positions[u]` the flat index of the maximum in each one's map (0 for a linear
    unit). `mean_response` (units,) the unit's mean response over the dataset; `num_samples` the rows read."""

    layer: str
    kind: str
    reduce: str
    rows: np.ndarray  # (units, k) int64
    scores: np.ndarray  # (units, k) float32
    positions: np.ndarray  # (units, k) int64
    mean_response: np.ndarray  # (units,) float32
    map_shape: tuple  # the positions of one unit's map: (H, W), (L,), (T,) or ()
    num_samples: int

    def __post_init__(self):
        # what a sandboxed worker sends is checked before the parent indexes its dataset with it
        shape = np.shape(self.rows)
        if (len(shape) != 2 or np.shape(self.scores) != shape or np.shape(self.positions) != shape
                or np.shape(self.mean_response) != shape[:1] or np.asarray(self.rows).dtype.kind not in "iu"
                or (np.size(self.rows) and not 0 <= int(np.min(self.rows)) <= int(np.max(self.rows))
                    < int(self.num_samples))):
            raise AnalyzerError("the top-activating samples came back malformed (rows, scores and positions of "
                                "different shapes, or rows outside the dataset): run the analysis again")
        object.__setattr__(self, "map_shape", tuple(int(d) for d in self.map_shape))


def _check_options(*, batch_size: int, reduce: str, k: int | None = None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidOption(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if reduce not in REDUCTIONS:
        raise InvalidOption(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise InvalidOption(f"k (samples per unit) must be a whole number of at least 1, got {k!r}")


def _kind_of(layer_module, output) -> str:
    from torch import nn

    if isinstance(layer_module, nn.modules.conv._ConvNd):
        return "conv"
    if output.ndim == 2:
        return "linear"
    if output.ndim == 3:
        return "tokens"
    if output.ndim == 4:  # a pooling or normalisation layer of a convolutional network: channels first
        return "conv"
    raise AnalyzerError(f"layer output of shape {tuple(output.shape)} is not channels over positions, units, or "
                        f"units over tokens: choose a convolution, linear or token layer")


def _channels_first(output, kind: str):
    """(N, units, *positions): a token layer's (N, T, D) becomes (N, D, T)."""
    return output.transpose(1, 2) if kind == "tokens" else output


def _responses(maps, reduce: str):
    """(N, units) from (N, units, *positions): each unit's map reduced to one response, and the flat argmax."""
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
    return (flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)), flat.argmax(dim=2)


def _batches(model, inputs, layer: str, batch_size: int):
    """Yield (start, the layer, its float output) per batch of `inputs`, in eval mode without gradients
    (`inference.captured_layer` and `forward_batches`: the hook is removed when done)."""
    import torch

    from ..engines.inference import captured_layer, forward_batches, module_device
    from ..guard import analysis_mode, unwrap

    module = unwrap(model)
    with analysis_mode(module), torch.no_grad(), captured_layer(module, layer) as (target, captured):
        for start, _, _ in forward_batches(module, inputs, batch_size=batch_size, device=module_device(module)):
            if not captured:
                raise AnalyzerError(f"layer {layer!r} did not run during the forward pass: choose a layer the "
                                    f"model calls")
            # the first call of a layer that runs twice (a shared block) is the one read
            yield start, target, captured[0].float()
            captured.clear()


@runs_in_worker
def layer_activations(model, inputs, *, layer: str, batch_size: int = 64, reduce: str = "mean") -> LayerActivations:
    """The output of `layer` for `inputs` (a few samples), channels first, with each unit's response
    (`reduce` over its positions: "mean" by default, "max") and the units of each sample strongest first."""
    _check_options(batch_size=batch_size, reduce=reduce)
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise AnalyzerError("no samples given: pass at least one")
    parts, strengths, kind = [], [], None
    for _, layer_module, out in _batches(model, inputs, layer, batch_size):
        kind = kind or _kind_of(layer_module, out)
        maps = _channels_first(out, kind)
        parts.append(maps.cpu().numpy())
        strengths.append(_responses(maps, reduce)[0].cpu().numpy())
    strength = np.concatenate(strengths).astype(np.float32)
    return LayerActivations(layer=layer, kind=kind, reduce=reduce,
                            activations=np.concatenate(parts).astype(np.float32), strength=strength,
                            order=np.argsort(-strength, axis=1, kind="stable").astype(np.int64))


@runs_in_worker
def top_activating(model, inputs, *, layer: str, k: int = 9, batch_size: int = 256, reduce: str = "max",
                   on_batch=None) -> TopActivating:
    """For each unit of `layer`, the `k` rows of `inputs` whose response (`reduce` of the unit's map: "max" by
    default, "mean") is highest, read in batches of `batch_size` and kept as a running top-k (memory: units × k, not
    the dataset's activations). `on_batch(done, total)` reports progress. Ties keep the earlier row."""
    import torch

    _check_options(batch_size=batch_size, reduce=reduce, k=k)
    n = len(inputs)
    if n == 0:
        raise AnalyzerError("no samples given: pass at least one")
    k = min(int(k), n)
    best_scores = best_rows = best_positions = None
    total, kind, map_shape = None, None, None
    for start, layer_module, out in _batches(model, inputs, layer, batch_size):
        kind = kind or _kind_of(layer_module, out)
        maps = _channels_first(out, kind)
        map_shape = tuple(int(d) for d in maps.shape[2:])
        response, argmax = _responses(maps, reduce)  # (B, units)
        rows = torch.arange(start, start + len(response)).expand(response.shape[1], -1)  # (units, B)
        scores, positions = response.T.cpu(), argmax.T.cpu()
        total = response.sum(dim=0).double().cpu() if total is None else total + response.sum(dim=0).double().cpu()
        if best_scores is not None:  # the running best first: on a tie the earlier row stays ahead
            scores = torch.cat([best_scores, scores], dim=1)
            rows = torch.cat([best_rows, rows], dim=1)
            positions = torch.cat([best_positions, positions], dim=1)
        keep = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_rows = scores.gather(1, keep), rows.gather(1, keep)
        best_positions = positions.gather(1, keep)
        if on_batch is not None:
            on_batch(min(start + batch_size, n), n)
    return TopActivating(layer=layer, kind=kind, reduce=reduce, rows=best_rows.numpy().astype(np.int64),
                         scores=best_scores.numpy().astype(np.float32),
                         positions=best_positions.numpy().astype(np.int64),
                         mean_response=(total / n).numpy().astype(np.float32), map_shape=map_shape, num_samples=n)


def _stored_path(run, layer: str) -> Path:
    """One file per layer; two names that reduce to one file name share it (its key tells them apart)."""
    from ..loading.workspace import safe_filename

    return run.file(f"{TOP_ACTIVATING}/{safe_filename(layer)}.npz")


def run_top_activating(run_dir, *, layer: str, k: int = 9, batch_size: int = 256, reduce: str = "max", model=None,
                       dataset=None, on_batch=None) -> tuple[TopActivating, list]:
    """`top_activating` over a stored run's dataset, and the sample ids of its rows ((units, k) of str). Kept in the
    run (network/top_activating/<layer>.npz) and read back while the model's and the data's hashes and the options
    are those it was computed with; `model`/`dataset` (already loaded) skip reloading them."""
    import json

    from ..engines.pipeline import load_run_inputs
    from ..loading.runs import open_run, write_atomic

    _check_options(batch_size=batch_size, reduce=reduce, k=k)
    run = open_run(run_dir)
    key = {"model": run.info["model"]["sha256"], "data": run.info["dataset"]["sha256"], "layer": layer, "k": int(k),
           "reduce": reduce}
    path = _stored_path(run, layer)
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["key"])) == key:
                result = TopActivating(layer=layer, kind=str(stored["kind"]), reduce=reduce,
                                       rows=stored["rows"], scores=stored["scores"], positions=stored["positions"],
                                       mean_response=stored["mean_response"],
                                       map_shape=tuple(int(d) for d in stored["map_shape"]),
                                       num_samples=int(stored["num_samples"]))
                return result, stored["ids"].tolist()
    if model is None or dataset is None:
        model, dataset = load_run_inputs(run)
    result = top_activating(model, dataset.x, layer=layer, k=k, batch_size=batch_size, reduce=reduce,
                            on_batch=on_batch)
    if result.num_samples != len(dataset.x):
        raise AnalyzerError(f"the top-activating samples cover {result.num_samples} rows of a dataset of "
                            f"{len(dataset.x)}: run the analysis again")
    ids = np.asarray([str(i) for i in dataset.ids], dtype=str)[result.rows]

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=json.dumps(key, sort_keys=True), kind=result.kind, rows=result.rows,
                     scores=result.scores, positions=result.positions, mean_response=result.mean_response,
                     map_shape=np.asarray(result.map_shape, dtype=np.int64), num_samples=result.num_samples, ids=ids)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _save)
    return result, ids.tolist()
