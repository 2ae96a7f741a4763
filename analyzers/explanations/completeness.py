"""Completeness of additive attributions: the maps of Integrated Gradients sum to f(x) - f(baseline), SHAP's
(expected gradients, shap's GradientExplainer) to f(x) - E[f(background)], both on the class score the method
explains. The relative gap |sum(map) - difference| / |difference| says how far a map is from that.

`ig_completeness` doubles n_steps and `shap_completeness` doubles nsamples, each sample until its gap is within the
tolerance or the cap is reached (`_double_until_complete`, shared by both), and both report the gap either way.
`explain` runs them by default for these two methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attributions import (IG_MAX_STEPS, IG_TOLERANCE, SHAP_MAX_NSAMPLES, SHAP_TOLERANCE, _as_batch, _scores_module,
                           _targets, baseline_for, explain)
from ..errors import AnalyzerError
from ..guard import analysis_mode, unwrap
from ..engines.inference import module_device
from ..loading.inputs import layout_of
from ..loading.sandbox import runs_in_worker


@dataclass(frozen=True)
class Completeness:
    attributions: np.ndarray  # the maps at the budget each sample needed
    gap: np.ndarray  # (N,) |sum(attr) - difference| / |difference|; NaN where skipped
    budget: np.ndarray  # (N,) n_steps (Integrated Gradients) or nsamples (SHAP) each sample ended with
    difference: np.ndarray  # (N,) f(x) - f(baseline), or f(x) - E[f(background)] for SHAP, on the class score
    method: str = "integrated_gradients"
    settings: dict = field(default_factory=dict)  # the call's settings (`attributions.ExplainResult.settings`)

    @property
    def skipped(self) -> np.ndarray:
        return np.isnan(self.gap)

    @property
    def n_steps(self) -> np.ndarray:
        """Integrated Gradients' steps per sample (-1 for SHAP)."""
        return self.budget if self.method == "integrated_gradients" else np.full(len(self.budget), -1)

    @property
    def nsamples(self) -> np.ndarray:
        """SHAP's draws per sample (-1 for Integrated Gradients)."""
        return self.budget if self.method == "shap" else np.full(len(self.budget), -1)


def _check_budget(start_name: str, start: int, cap_name: str, cap: int, least: int, tolerance: float,
                  min_difference: float) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < least:
        raise AnalyzerError(f"{start_name} must be an integer of at least {least}, got {start!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < start:
        raise AnalyzerError(f"{cap_name} must be an integer of at least {start_name} ({start}), got {cap!r}")
    if not isinstance(tolerance, (int, float, np.number)) or not 0 < tolerance < 1:
        raise AnalyzerError(f"tolerance must be a relative gap between 0 and 1 (0.01 is 1%), got {tolerance!r}")
    if not isinstance(min_difference, (int, float, np.number)) or not min_difference >= 0:
        raise AnalyzerError(f"min_difference must be 0 or more, got {min_difference!r}")


def _double_until_complete(attribute, difference: np.ndarray, shape: tuple, *, start: int, cap: int,
                           tolerance: float, min_difference: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The doubling both methods share: (maps, gap, budget used). `attribute(rows, budget, previous)` returns the
    maps of `rows` at `budget` (`previous`: those rows' maps at budget / 2, None the first time). Samples whose
    |difference| is below `min_difference` get one pass and a NaN gap (there is nothing to compare with); the
    others double until their gap is within `tolerance` or the next budget would pass `cap`."""
    n = len(difference)
    attributions = np.zeros(shape, dtype=np.float32)
    gap = np.full(n, np.nan)
    used = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    budget = int(start)
    previous = None
    while len(todo):
        attr = attribute(todo, budget, previous)
        attributions[todo] = attr
        used[todo] = budget
        total = attr.reshape(len(todo), -1).sum(1, dtype=np.float64)
        diff = difference[todo]
        ok = np.abs(diff) >= min_difference
        gap[todo] = np.where(ok, np.abs(total - diff) / np.where(ok, np.abs(diff), 1.0), np.nan)
        if budget * 2 > cap:
            break
        again = ok & (gap[todo] > tolerance)
        todo, previous = todo[again], attr[again]
        budget *= 2
    return attributions, gap, used


def _class_scores(model, x: np.ndarray, targets: np.ndarray, batch_size: int) -> np.ndarray:
    """The class score each method explains (logits, or log-probabilities of a probability model), in float64."""
    scores = _scores_module(model)
    module = unwrap(model)
    out = []
    with analysis_mode(module), torch.no_grad():
        device = module_device(module)
        for start in range(0, len(x), batch_size):
            t = torch.as_tensor(targets[start:start + batch_size], device=device)[:, None]
            out.append(scores(torch.as_tensor(x[start:start + batch_size], device=device)).gather(1, t)[:, 0].cpu())
    return torch.cat(out).numpy().astype(np.float64)


def _resolved_targets(model, x: np.ndarray, target, batch_size: int) -> np.ndarray:
    module = unwrap(model)
    with analysis_mode(module):
        return _targets(_scores_module(model), x, target, batch_size, module_device(module))


@runs_in_worker
def ig_completeness(model, inputs, target=None, *, baseline="zeros", background=None, n_steps: int = 50,
                    max_steps: int = IG_MAX_STEPS, tolerance: float = IG_TOLERANCE, min_difference: float = 1e-3,
                    batch_size: int = 64, internal_batch_size: int | None = None) -> Completeness:
    """Integrated Gradients with their completeness gap, doubling n_steps for samples whose gap exceeds
    `tolerance` (up to `max_steps`). Samples with |f(x) - f(baseline)| < `min_difference` are skipped (gap NaN)."""
    _check_budget("n_steps", n_steps, "max_steps", max_steps, 2, tolerance, min_difference)
    x, _ = _as_batch(model, inputs)
    layout = layout_of(model)
    base = baseline_for(x, baseline, background, layout=layout)
    targets = _resolved_targets(model, x, target, batch_size)
    difference = _class_scores(model, x, targets, batch_size) - _class_scores(model, base, targets, batch_size)
    settings = {}

    def attribute(rows, steps, _previous):
        # the baseline as chosen (its name, recomputed per sample: the same array), so the settings name it
        given = base[rows] if not isinstance(baseline, str) else baseline
        result = explain(model, x[rows], targets[rows], "integrated_gradients", baseline=given, background=background,
                         n_steps=steps, batch_size=batch_size, internal_batch_size=internal_batch_size,
                         check_completeness=False, details=True)
        settings.update(result.settings)
        return result.attributions

    shape = (len(x), layout.token_length) if layout.packed else x.shape
    attributions, gap, used = _double_until_complete(attribute, difference, shape, start=int(n_steps),
                                                     cap=int(max_steps), tolerance=tolerance,
                                                     min_difference=min_difference)
    settings.update({"baseline": baseline if isinstance(baseline, str) else "array", "n_steps": int(n_steps),
                     "max_steps": int(max_steps), "tolerance": float(tolerance)})
    return Completeness(attributions=attributions, gap=gap, budget=used, difference=difference,
                        method="integrated_gradients", settings=settings)


@runs_in_worker
def shap_completeness(model, inputs, target=None, *, background, nsamples: int = 200,
                      max_nsamples: int = SHAP_MAX_NSAMPLES, tolerance: float = SHAP_TOLERANCE,
                      min_difference: float = 1e-3, batch_size: int = 64, seed: int = 0) -> Completeness:
    """SHAP values (expected gradients) with their efficiency gap against f(x) - E[f(background)] on the class
    score, doubling nsamples for samples whose gap exceeds `tolerance` (up to `max_nsamples`).

    Doubling draws as many fresh samples as there were, with the next seed (seed + 1, seed + 2, ...), and
    averages them with the map so far: the mean of independent estimates is the estimate from all their draws, so a
    sample ending at nsamples N cost N draws. The first pass is `explain(..., check_completeness=False)` at `seed`.
    """
    _check_budget("nsamples", nsamples, "max_nsamples", max_nsamples, 1, tolerance, min_difference)
    if background is None:
        raise AnalyzerError("SHAP needs background=: pass a sample of the dataset (e.g. 50-200 rows)")
    x, _ = _as_batch(model, inputs)
    background = np.asarray(background, dtype=np.float32)
    if background.ndim != x.ndim or background.shape[1:] != x.shape[1:] or len(background) == 0:
        raise AnalyzerError(f"background must be samples shaped like the inputs (M, {x.shape[1:]}), got "
                            f"{background.shape}")
    targets = _resolved_targets(model, x, target, batch_size)
    # E[f(background)] per class explained: the mean over every background row, as shap draws from all of them
    expected = np.zeros(len(x))
    for cls in np.unique(targets):
        expected[targets == cls] = _class_scores(model, background, np.full(len(background), cls), batch_size).mean()
    difference = _class_scores(model, x, targets, batch_size) - expected
    settings, passes = {}, [0]

    def attribute(rows, budget, previous):
        fresh = budget if previous is None else budget - budget // 2
        result = explain(model, x[rows], targets[rows], "shap", background=background, nsamples=fresh,
                         batch_size=batch_size, seed=seed + passes[0], check_completeness=False, details=True)
        passes[0] += 1
        settings.update(result.settings)
        if previous is None:
            return result.attributions
        return ((previous.astype(np.float64) * (budget // 2) + result.attributions.astype(np.float64) * fresh)
                / budget).astype(np.float32)

    attributions, gap, used = _double_until_complete(attribute, difference, x.shape, start=int(nsamples),
                                                     cap=int(max_nsamples), tolerance=tolerance,
                                                     min_difference=min_difference)
    settings.update({"nsamples": int(nsamples), "max_nsamples": int(max_nsamples), "tolerance": float(tolerance),
                     "seed": int(seed)})
    return Completeness(attributions=attributions, gap=gap, budget=used, difference=difference, method="shap",
                        settings=settings)
