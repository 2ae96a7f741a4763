"""Completeness of additive attributions: the maps of Integrated Gradients (and SHAP) sum to f(x) - f(baseline), and
the relative gap says how far a map is from that. `ig_completeness` raises n_steps until the gap is small.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attributions import _as_batch, _scores_module, _targets, baseline_for, explain
from ..guard import analysis_mode, unwrap
from ..engines.inference import module_device
from ..loading.inputs import layout_of


@dataclass(frozen=True)
class Completeness:
    attributions: np.ndarray  # the Integrated Gradients at the n_steps each sample needed
    gap: np.ndarray  # (N,) |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(baseline)|; NaN where skipped
    n_steps: np.ndarray  # (N,) steps used
    difference: np.ndarray  # (N,) f(x) - f(baseline) on the class score

    @property
    def skipped(self) -> np.ndarray:
        return np.isnan(self.gap)


def ig_completeness(model, inputs, target=None, *, baseline="zeros", background=None, n_steps: int = 50,
                    max_steps: int = 1600, tolerance: float = 0.01, min_difference: float = 1e-3,
                    batch_size: int = 64, internal_batch_size: int | None = None) -> Completeness:
    """Integrated Gradients with their completeness gap, doubling n_steps for samples whose gap exceeds
    `tolerance` (up to `max_steps`). Samples with |f(x) - f(baseline)| < `min_difference` are skipped (gap NaN)."""

    x, _ = _as_batch(model, inputs)
    layout = layout_of(model)
    base = baseline_for(x, baseline, background, layout=layout)
    module = unwrap(model)
    scores = _scores_module(model)
    with analysis_mode(module), torch.no_grad():
        device = module_device(module)
        targets = _targets(scores, x, target, batch_size, device)
        f_x, f_b = [], []
        for start in range(0, len(x), batch_size):
            sl = slice(start, start + batch_size)
            t = torch.as_tensor(targets[sl], device=device)[:, None]
            f_x.append(scores(torch.as_tensor(x[sl], device=device)).gather(1, t)[:, 0].cpu())
            f_b.append(scores(torch.as_tensor(base[sl], device=device)).gather(1, t)[:, 0].cpu())
    difference = (torch.cat(f_x) - torch.cat(f_b)).numpy().astype(np.float64)
    attributions = np.zeros((len(x), layout.token_length) if layout.packed else x.shape, dtype=np.float32)
    gap = np.full(len(x), np.nan)
    steps_used = np.zeros(len(x), dtype=np.int64)
    todo = np.arange(len(x))
    steps = int(n_steps)
    while len(todo):
        attr = explain(model, x[todo], targets[todo], "integrated_gradients", baseline=base[todo], n_steps=steps,
                       batch_size=batch_size, internal_batch_size=internal_batch_size)
        attributions[todo] = attr
        steps_used[todo] = steps
        total = attr.reshape(len(todo), -1).sum(1, dtype=np.float64)
        diff = difference[todo]
        ok = np.abs(diff) >= min_difference
        gap[todo] = np.where(ok, np.abs(total - diff) / np.where(ok, np.abs(diff), 1.0), np.nan)
        if steps * 2 > max_steps:
            break
        todo = todo[ok & (gap[todo] > tolerance)]
        steps *= 2
    return Completeness(attributions=attributions, gap=gap, n_steps=steps_used, difference=difference)


