"""Perturbation scores: does removing what a map calls important change the model's output?

- `deletion_insertion`: remove (or add) the most-attributed features first and watch the target probability; the
  area under each curve (deletion low and insertion high means the map found what the model uses).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AnalyzerError
from .attributions import _as_batch, _scores_module, _targets, baseline_for
from ..guard import analysis_mode, unwrap
from ..engines.inference import class_log_probs, module_device
from ..loading.inputs import layout_of


@dataclass(frozen=True)
class DeletionInsertion:
    fractions: np.ndarray  # (S+1,) fraction of features removed / inserted
    deletion: np.ndarray  # (N, S+1) target probability as the most-attributed features are replaced by the baseline
    insertion: np.ndarray  # (N, S+1) target probability as they are put back into the baseline
    deletion_auc: np.ndarray  # (N,) lower is better
    insertion_auc: np.ndarray  # (N,) higher is better


def _importance(attr: np.ndarray) -> np.ndarray:
    """Per position importance (N, P): attribution summed over channels, so a pixel or base is removed whole."""
    attr = np.asarray(attr, dtype=np.float32)
    return attr.reshape(len(attr), -1) if attr.ndim == 2 else attr.sum(axis=1).reshape(len(attr), -1)


def deletion_insertion(model, inputs, attributions, target=None, *, steps: int = 20, baseline="zeros",
                       background=None, batch_size: int = 64) -> DeletionInsertion:
    """Deletion and insertion curves of the target probability (target None: the predicted class).

    Positions (pixels, sequence positions, features, tokens) are ranked by their attribution summed over channels,
    highest first; a removed position takes the baseline's values ("zeros", "blur", "mean" of `background`, or an
    array). A token model's attributions are one score per token, and a removed token becomes the pad id.
    """
    x, _ = _as_batch(model, inputs)
    layout = layout_of(model)
    shape = (len(x), layout.token_length) if layout.packed else x.shape
    attr = np.asarray(attributions, dtype=np.float32).reshape(shape) if np.size(attributions) == np.prod(shape) \
        else None
    if attr is None:
        raise AnalyzerError(f"attributions of shape {np.shape(attributions)} do not match inputs {x.shape}")
    if steps < 1:
        raise AnalyzerError(f"steps must be at least 1, got {steps}")
    base = baseline_for(x, baseline, background, layout=layout)
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    order = np.argsort(-_importance(attr), axis=1, kind="stable")
    positions = order.shape[1]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * positions).astype(int)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(positions)[None].repeat(len(x), 0), axis=1)
    spatial = x.shape[2:] if x.ndim > 2 else x.shape[1:]
    deletion = np.zeros((len(x), steps + 1), np.float32)
    insertion = np.zeros_like(deletion)
    per_chunk = max(1, batch_size // (2 * (steps + 1)))
    with analysis_mode(module), torch.no_grad():
        device = module_device(module)
        targets = _targets(_scores_module(model), x, target, batch_size, device)
        for start in range(0, len(x), per_chunk):
            stop = min(start + per_chunk, len(x))
            # removed[i, k, p]: position p is among the counts[k] most-attributed of sample i
            removed = ranks[start:stop, None, :] < counts[None, :, None]
            if layout.packed:  # tokens ranked, their ids replaced; the mask and other inputs stay
                removed = layout.token_positions(removed)
            removed = removed.reshape(stop - start, steps + 1, *([1] if x.ndim > 2 else []), *spatial)
            xs, bs = x[start:stop, None], base[start:stop, None]
            batch = np.concatenate([np.where(removed, bs, xs), np.where(removed, xs, bs)], axis=1)
            flat = torch.as_tensor(batch.reshape(-1, *x.shape[1:]), device=device)
            probs = []
            for s in range(0, len(flat), batch_size):
                probs.append(class_log_probs(module(flat[s:s + batch_size]).float(), output_kind).exp().cpu())
            probs = torch.cat(probs).numpy().reshape(stop - start, 2 * (steps + 1), -1)
            t = targets[start:stop]
            picked = np.take_along_axis(probs, t[:, None, None].repeat(2 * (steps + 1), 1), axis=2)[..., 0]
            deletion[start:stop], insertion[start:stop] = picked[:, :steps + 1], picked[:, steps + 1:]
    return DeletionInsertion(fractions=fractions, deletion=deletion, insertion=insertion,
                             deletion_auc=np.trapezoid(deletion, fractions, axis=1).astype(np.float32),
                             insertion_auc=np.trapezoid(insertion, fractions, axis=1).astype(np.float32))


