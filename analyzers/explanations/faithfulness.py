"""Is an attribution map worth looking at? Scores computed next to every map.

(Perturbation scores, deletion and insertion, are in `perturbation`; completeness is in `completeness`.)

- `randomisation_check` (Adebayo et al., 2018): re-initialise the layers of a copy from the top down and measure the
  rank correlation between the original map and the map of the randomised model; a map that barely changes does not
  reflect the model and is flagged. `randomised_correlation` is its last step alone (every layer randomised), for a
  verdict on a fixed probe set and one more map per sample after it.
- `ground_truth_scores`: fraction of attribution mass inside a planted ground truth and the pointing-game hit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import AnalyzerError
from .attributions import _as_batch, _scores_module, _targets, explain, model_fingerprint
from ..guard import analysis_mode, unwrap
from ..engines.inference import module_device

SANITY_THRESHOLD = 0.5  # mean |rank correlation| with the fully randomised model's map above this: flagged


# --- randomisation sanity check ----------------------------------------------------------------------------------------

def degenerate_maps(attributions) -> np.ndarray:
    """Per sample, whether its map is constant (all zero included): it ranks nothing, so it gets no faithfulness
    score and fails the sanity check. Constant up to float rounding, relative to the map's largest magnitude."""
    flat = np.asarray(attributions, dtype=np.float64).reshape(len(attributions), -1)
    if flat.shape[1] == 0:
        return np.ones(len(flat), dtype=bool)
    scale = np.abs(flat).max(axis=1)
    return np.ptp(flat, axis=1) <= 1e-6 * scale


def _flagged(corr: np.ndarray, degenerate: np.ndarray, threshold: float) -> bool:
    """The maps barely change when the model is destroyed (mean correlation over the non-degenerate maps above
    `threshold`), or are all constant: they do not reflect what the model learned."""
    kept = corr[~degenerate]
    return bool(degenerate.all()) or (len(kept) > 0 and float(np.mean(kept)) > threshold)


@dataclass(frozen=True)
class SanityCheck:
    layers: tuple  # layers re-initialised, top (output) first; step k has layers[:k+1] randomised
    rank_corr: np.ndarray  # (len(layers), N) Spearman correlation of |map| with the original map's |map|
    threshold: float
    degenerate: np.ndarray  # (N,) the original map is constant: it cannot reflect the model, so it fails

    @property
    def final_corr(self) -> np.ndarray:
        """Per sample: correlation with the map of the fully randomised model (NaN for a degenerate map, whose
        rank correlation means nothing)."""
        return np.where(self.degenerate, np.nan, self.rank_corr[-1])

    @property
    def mean_final_corr(self) -> float:
        """Over the samples whose map is not degenerate (NaN when every map is)."""
        kept = self.rank_corr[-1][~self.degenerate]
        return float(np.mean(kept)) if len(kept) else math.nan

    @property
    def flagged(self) -> bool:
        return _flagged(self.rank_corr[-1], self.degenerate, self.threshold)


@dataclass(frozen=True)
class RandomisedCorrelation:
    """The last step of the cascade alone: each map against the map of the fully randomised model."""
    corr: np.ndarray  # (N,) Spearman correlation of |map| with the randomised model's |map|; NaN where degenerate
    degenerate: np.ndarray  # (N,)
    threshold: float

    @property
    def mean_corr(self) -> float:
        kept = self.corr[~self.degenerate]
        return float(np.mean(kept)) if len(kept) else math.nan

    @property
    def flagged(self) -> bool:
        return _flagged(self.corr, self.degenerate, self.threshold)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of `a` with the same row of `b`.

    Positions where both maps are exactly zero are left out: there the method is zero by construction (an input
    equal to the baseline, for Integrated Gradients, input x gradient or occlusion), whatever the model, and their
    ties would make any two maps of the same input look alike. A constant row against a varying one counts 0, two
    identical rows 1.
    """
    from scipy.stats import pearsonr, rankdata

    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    corr = np.zeros(len(a))
    for i, (ra, rb) in enumerate(zip(a, b)):
        keep = (ra != 0) | (rb != 0)
        if keep.sum() >= 3:
            ra, rb = ra[keep], rb[keep]
        if np.array_equal(ra, rb):
            corr[i] = 1.0
        elif np.ptp(ra) == 0 or np.ptp(rb) == 0:
            corr[i] = 0.0
        else:
            corr[i] = pearsonr(rankdata(ra), rankdata(rb)).statistic
    return corr


def _parameter_layers(module: nn.Module, x: torch.Tensor) -> list:
    """Names of the modules owning parameters, in the order they run (leaves first to finish first)."""
    owners = {name: sub for name, sub in module.named_modules() if any(True for _ in sub.parameters(recurse=False))}
    order, handles = [], []
    for name, sub in owners.items():
        handles.append(sub.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    ran = list(dict.fromkeys(order))
    # owners that never ran (e.g. parameters used functionally by a parent) go last, in definition order
    return ran + [n for n in owners if n not in ran]


def reinitialise(sub: nn.Module, generator: torch.Generator) -> None:
    """Fresh random parameters for one module: its own reset_parameters, or PyTorch's default scheme applied
    directly (unflattened .pt2 submodules are InterpreterModules, which have no reset_parameters)."""
    params = dict(sub.named_parameters(recurse=False))
    if hasattr(sub, "reset_parameters") and type(sub).__module__.startswith("torch.nn.modules"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
            sub.reset_parameters()
        return
    weights = [p for p in params.values() if p.ndim >= 2]
    fan_in = int(np.prod(weights[0].shape[1:])) if weights else 0
    with torch.no_grad():
        for p in params.values():
            if p.ndim >= 2:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
            else:
                bound = 1.0 / math.sqrt(fan_in or p.numel())
                p.uniform_(-bound, bound, generator=generator)


def _model_like(model, module: nn.Module):
    """`model` with its module replaced (a LoadedModel keeps its output kind and layer kinds)."""
    if dataclasses.is_dataclass(model) and hasattr(model, "module"):
        return dataclasses.replace(model, module=module)
    return module


def _copy_module(model) -> nn.Module:
    if hasattr(model, "copy_module"):
        return model.copy_module()
    import copy

    try:
        return copy.deepcopy(unwrap(model))
    except Exception as exc:
        raise AnalyzerError(f"the model could not be copied for the randomisation check ({exc}): load it with "
                            f"analyzers.load_model so .pt2 copies are made by reloading its bytes") from exc


def _key_text(value) -> str:
    # arrays (a background sample, a baseline) enter the cache key by content, not by their truncated repr
    if isinstance(value, (np.ndarray, torch.Tensor)):
        data = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        return f"array{data.shape}:{hashlib.sha256(data.tobytes()).hexdigest()}"
    return str(value)


def _cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=_key_text).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"sanity-{digest}.npz"


def _score_map(attributions, ndim: int) -> np.ndarray:
    """|map| per position: summed over channels for images and sequences, as is for features and tokens."""
    a = np.abs(np.asarray(attributions, dtype=np.float32))
    return a.reshape(len(a), -1) if ndim == 2 else a.sum(axis=1).reshape(len(a), -1)


def _cascade(model, example: np.ndarray) -> tuple[nn.Module, list, dict]:
    """A copy of the model, its parameter layers top (output) first, and its submodules by name: what the cascade
    re-initialises, one more layer at each step."""
    copy = _copy_module(model)
    copy.eval()
    layers = _parameter_layers(copy, torch.as_tensor(example[:1], device=module_device(copy)))[::-1]
    if not layers:
        raise AnalyzerError("the model has no parameters to randomise: the sanity check needs a trained model")
    return copy, layers, dict(copy.named_modules())


RANDOMISED_COPIES_KEPT = 2
_RANDOMISED: "OrderedDict[tuple, object]" = OrderedDict()
_RANDOMISED_LOCK = threading.Lock()


def randomised_model(model, example: np.ndarray, *, seed: int = 0):
    """`model` with every parameter layer re-initialised, top first: the cascade's last step, with the same weights
    for the same seed. The newest RANDOMISED_COPIES_KEPT are kept in memory, so that checking one more sample
    costs one map, not one copy and one map per layer."""
    key = (model_fingerprint(model), seed)
    # one lock for the table: a trusted model is shared by every session, and two first clicks would make two copies
    with _RANDOMISED_LOCK:
        if key in _RANDOMISED:
            _RANDOMISED.move_to_end(key)
            return _RANDOMISED[key]
        copy, layers, subs = _cascade(model, example)
        generator = torch.Generator().manual_seed(seed)
        for layer in layers:
            reinitialise(subs[layer], generator)
        _RANDOMISED[key] = randomised = _model_like(model, copy)
        while len(_RANDOMISED) > RANDOMISED_COPIES_KEPT:
            _RANDOMISED.popitem(last=False)
        return randomised


def randomised_correlation(model, inputs, method: str = "saliency", target=None, *, attributions=None,
                           batch_size: int = 64, threshold: float = SANITY_THRESHOLD, seed: int = 0, cache_dir=None,
                           **options) -> RandomisedCorrelation:
    """Each map against the map of the fully randomised model (`randomised_model`): the verdict of
    `randomisation_check` at the cost of one more map per sample. `attributions` (the original maps, already
    computed) save one pass. With `cache_dir` the result is stored per (model, method, options, inputs) and reused:
    a fixed probe set is checked once per model, method and layer."""
    x, _ = _as_batch(model, inputs)
    module = unwrap(model)
    with analysis_mode(module):
        targets = _targets(_scores_module(model), x, target, batch_size, module_device(module))
    key = path = None
    if cache_dir is not None:
        key = {"check": "randomised", "model": model_fingerprint(model), "method": method, "options": options,
               "seed": seed, "inputs": np.asarray(x), "targets": targets.tolist(), "threshold": threshold}
        path = _cache_path(cache_dir, key)
        from ..loading.runs import read_cache_entry

        cached = read_cache_entry(path)  # None when missing or damaged: recomputed
        if cached is not None and set(cached) == {"corr", "degenerate"} and cached["corr"].shape == (len(x),) \
                and cached["corr"].dtype.kind == "f" and cached["degenerate"].dtype == bool \
                and cached["degenerate"].shape == (len(x),):
            return RandomisedCorrelation(corr=cached["corr"], degenerate=cached["degenerate"], threshold=threshold)
    original = attributions if attributions is not None else explain(model, x, targets, method,
                                                                     batch_size=batch_size, seed=seed, **options)
    degenerate = degenerate_maps(original)
    randomised = explain(randomised_model(model, x, seed=seed), x, targets, method, batch_size=batch_size, seed=seed,
                         **options)
    corr = np.where(degenerate, np.nan, spearman_rows(_score_map(original, x.ndim), _score_map(randomised, x.ndim)))
    if path is not None:
        from ..loading.runs import write_atomic

        def _save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, corr=corr, degenerate=degenerate)

        write_atomic(path, _save)
    return RandomisedCorrelation(corr=corr, degenerate=degenerate, threshold=threshold)


def randomisation_check(model, inputs, method: str | Callable = "saliency", target=None, *, batch_size: int = 64,
                        threshold: float = SANITY_THRESHOLD, seed: int = 0, max_layers: int | None = None,
                        cache_dir=None, sample_ids=None, **options) -> SanityCheck:
    """Cascading randomisation: re-initialise the model's layers from the output down, one more at each step, on a
    copy, and correlate each map with the original (Spearman on |map| summed over channels).

    `method` is a method name of `explain` (with `options`) or a function (model, inputs, targets) -> array. Targets
    are fixed from the original model (None: its predicted class). With `cache_dir` and `sample_ids` the result is
    stored per (model, method, options, samples) and reused. `max_layers` limits the cascade to the top layers.
    """

    x, _ = _as_batch(model, inputs)
    module = unwrap(model)
    with analysis_mode(module):
        targets = _targets(_scores_module(model), x, target, batch_size, module_device(module))
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    key = None
    if cache_dir is not None and sample_ids is not None and isinstance(method, str):
        key = {"model": model_fingerprint(model), "method": name, "options": options, "seed": seed,
               "ids": [str(i) for i in sample_ids], "targets": targets.tolist(), "threshold": threshold,
               "max_layers": max_layers}
        from ..loading.runs import read_cache_entry

        cached = read_cache_entry(_cache_path(cache_dir, key))  # None when missing or damaged: recomputed
        if cached is not None and {"layers", "rank_corr", "degenerate"} <= set(cached) and cached["rank_corr"].shape \
                == (len(cached["layers"]), len(x)) and cached["rank_corr"].dtype.kind == "f" and \
                cached["degenerate"].shape == (len(x),) and cached["degenerate"].dtype == bool:
            return SanityCheck(layers=tuple(str(s) for s in cached["layers"]), rank_corr=cached["rank_corr"],
                               threshold=threshold, degenerate=cached["degenerate"])

    def attribute(m):
        if callable(method):
            return np.asarray(method(m, x, targets), dtype=np.float32)
        return explain(m, x, targets, method, batch_size=batch_size, seed=seed, **options)

    original_attr = attribute(model)
    degenerate = degenerate_maps(original_attr)
    original = _score_map(original_attr, x.ndim)
    copy, layers, subs = _cascade(model, x)
    if max_layers is not None:
        layers = layers[:max_layers]
    generator = torch.Generator().manual_seed(seed)
    randomised = _model_like(model, copy)
    corr = np.zeros((len(layers), len(x)))
    for step, layer in enumerate(layers):
        reinitialise(subs[layer], generator)
        corr[step] = spearman_rows(original, _score_map(attribute(randomised), x.ndim))
    result = SanityCheck(layers=tuple(layers), rank_corr=corr, threshold=threshold, degenerate=degenerate)
    if key is not None:
        from ..loading.runs import write_atomic

        def _save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, layers=np.asarray(layers, dtype=str), rank_corr=corr, degenerate=degenerate)

        write_atomic(_cache_path(cache_dir, key), _save)
    return result


# --- planted ground truth ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroundTruthScores:
    mass_inside: np.ndarray  # (N,) fraction of |attribution| inside the ground truth (NaN for an all-zero map)
    pointing_hit: np.ndarray  # (N,) bool: the most-attributed position lies inside it

    @property
    def pointing_rate(self) -> float:
        return float(np.mean(self.pointing_hit))

    @property
    def mean_mass_inside(self) -> float:
        return float(np.nanmean(self.mass_inside)) if np.isfinite(self.mass_inside).any() else float("nan")


def interval_mask(starts, ends, length: int) -> np.ndarray:
    """(N, length) bool masks of the half-open intervals [start, end) (e.g. a planted motif in a sequence)."""
    positions = np.arange(length)[None]
    return (positions >= np.asarray(starts)[:, None]) & (positions < np.asarray(ends)[:, None])


def ground_truth_scores(attributions, mask, *, tolerance: int = 0) -> GroundTruthScores:
    """Mass inside and pointing game of `attributions` (N, C, ...) or (N, F) against a boolean `mask` shaped like one
    channel (N, H, W) / (N, L) / (N, F), or like the attributions (then any channel counts). Importance is |attr|
    summed over channels. `tolerance` (positions) widens the mask for the pointing game only, as in Zhang et al.
    (2018), so a peak on an object's edge counts."""
    attr = np.asarray(attributions, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if attr.ndim > 2:
        importance = np.abs(attr).sum(axis=1)
        if mask.shape == attr.shape:
            mask = mask.any(axis=1)
    else:
        importance = np.abs(attr)
    if mask.shape != importance.shape:
        raise AnalyzerError(f"ground-truth mask of shape {mask.shape} does not match attributions {attr.shape}")
    pointing_mask = mask
    if tolerance > 0:
        from scipy.ndimage import binary_dilation

        structure = np.ones((1, *([2 * tolerance + 1] * (mask.ndim - 1))), dtype=bool)
        pointing_mask = binary_dilation(mask, structure=structure)
    importance = importance.reshape(len(attr), -1)
    mask = mask.reshape(len(attr), -1)
    total = importance.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass = np.where(total > 0, (importance * mask).sum(1) / total, np.nan)
    hit = np.take_along_axis(pointing_mask.reshape(len(attr), -1), importance.argmax(1)[:, None], axis=1)[:, 0]
    hit &= total > 0
    return GroundTruthScores(mass_inside=mass, pointing_hit=hit)
