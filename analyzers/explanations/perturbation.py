"""Perturbation scores: does removing what a map calls important change the model's output?

- `deletion_insertion`: remove (or add) the most-attributed features first and watch the target probability; the
  area under each curve (deletion low and insertion high means the map found what the model uses). Beside the raw
  areas, scores that compare across samples and targets: the curves normalised by the input's own probability, and
  the same sample's curves in a seeded random order of removal.
- `road`: RemOve And Debias (Rong et al., 2022): the removed positions are filled by noisy linear imputation from
  their neighbours instead of a baseline, so the removal itself does not tell the model which positions were chosen;
  most relevant first (MoRF) and least relevant first (LeRF) at a few removal fractions.

Which score is the headline: `deletion_vs_random` (`DeletionInsertion.deletion_vs_random`). A raw deletion AUC mostly
measures where the curve starts: a target with p(x) = 0.03 has a deletion AUC of at most about 0.03 whatever the map,
which reads as "excellent" against the 0.3 of a confident target. Divided by p(x), and taken against the random
order of the same sample, it is 0 for a map no better than chance and positive for one that finds what the model
uses, whatever the starting probability; it exists for every modality (ROAD does not apply to tables or tokens) and,
unlike the insertion scores, needs no span between two probabilities that can be nearly equal.

A regression (output kind "value") explains its predicted value: the curves are the raw output (its first column),
and since a value has no zero and no range of 1 to divide by, every normalised score is in units of the sample's own
span f(x) - f(b), f(b) the baseline's value (`VALUE_MIN_SPAN`). A signed map is then read as evidence for that span:
positions are ranked by attribution times the sign of f(x) - f(b), so that the order of a map that finds what the
model uses drives the normalised curve from 1 to 0 fastest whichever side of the baseline the input lies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AnalyzerError, InvalidOption
from .attributions import _as_batch, _scores_module, _targets, baseline_for, sample_rngs
from ..guard import analysis_mode, unwrap
from ..engines.inference import class_log_probs, module_device
from ..loading.inputs import layout_of
from ..evaluation.tasks import VALUE_OUTPUT  # the output kind of a regression: its curves follow the value

# |p(x) - p(baseline)| below this: the insertion scores are NaN. Insertion is normalised by that span, and a span of a
# few thousandths makes the score the ratio of two rounding errors (a low-probability target whose baseline is about
# as (im)probable as the input).
MIN_SPAN = 0.01
# A value output (a regression): the normalised curve (f - f(b)) / (f(x) - f(b)) runs from 1 (nothing removed) to 0
# (all removed), and the span f(x) - f(b) is NaN (so are all its normalised scores) when either
#   |f(x) - f(b)| < VALUE_MIN_SPAN x R, R = max - min of the value over the sample's own deletion and insertion
#     curves (they hold f(x) and f(b)): R stands in for a probability's range of 1, so this is MIN_SPAN's rule; a
#     start within 1% of the range the curves cover makes the scores a ratio of the excursions to a near cancellation
#     (features that push the value up and down by about as much), hundreds of times their usual size; or
#   |f(x) - f(b)| <= VALUE_RTOL x max(|f(x)|, |f(b)|): float32 holds about 7 significant digits, and two values that
#     agree to 5 of them differ by a few dozen roundings (a model that ignores the removed features, an input whose
#     value equals the baseline's).
VALUE_MIN_SPAN = MIN_SPAN
VALUE_RTOL = 1e-5

ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the paper's curves run over 10%..90% removed
# Noise std of the imputation, as a fraction of each sample's standard deviation. The reference implementation
# (tleemann/road_evaluation, NoisyLinearImputer(noise=0.01)) adds an absolute 0.01 to ImageNet-normalised images,
# whose standard deviation is about 1; relative to the sample's own spread, the same noise fits inputs of any scale.
ROAD_NOISE = 0.01
# Noisy linear imputation's neighbours, (offset, weight): on an image the 8-neighbourhood, direct neighbours 1/6 and
# diagonal ones 1/12 (Rong et al., 2022, Sec. 4; the reference's `neighbors_weights`), so the weights sum to 1.
GRID_NEIGHBOURS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
                   ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))
# On a sequence (N, C, L) the 1-D analogue: the position before and the one after, 1/2 each (our choice: the paper
# defines only images). A tabular row has no neighbours (the order of its columns is arbitrary): ROAD is skipped.
CHAIN_NEIGHBOURS = (((1,), 1 / 2), ((-1,), 1 / 2))


@dataclass(frozen=True)
class DeletionInsertion:
    """The curves and their areas. The normalised scores (properties, computed from the fields) of a probability:

    - `deletion_auc_norm` = AUC of deletion(f) / p(x) = deletion_auc / p(x): the share of the starting probability
      left on average; 1 when removing changes nothing (lower is better; above 1 when removal raises it).
    - `insertion_auc_norm` = AUC of (insertion(f) - p(b)) / (p(x) - p(b)) = (insertion_auc - p(b)) / (p(x) - p(b)),
      p(b) the baseline's probability: how much of the way from the baseline's probability to the input's the curve
      covers on average (higher is better); NaN when |p(x) - p(b)| < MIN_SPAN.
    - `deletion_vs_random` = (random_deletion_auc - deletion_auc) / p(x): the normalised deletion AUC of the seeded
      random order minus the map's; 0 no better than chance, positive better (the headline, see the module's doc).
    - `insertion_vs_random` = (insertion_auc - random_insertion_auc) / (p(x) - p(b)): likewise for insertion.

    Of a value (`value`, a regression; the curves are f, the predicted value), every score is in units of the span
    f(x) - f(b) (NaN by the rule of VALUE_MIN_SPAN): `deletion_auc_norm` = AUC of (deletion(f) - f(b)) / (f(x) - f(b))
    = (deletion_auc - f(b)) / (f(x) - f(b)), 1 when removing changes nothing and 0 when the first removal takes the
    value to the baseline's (lower is better); `deletion_vs_random` = (random_deletion_auc - deletion_auc) /
    (f(x) - f(b)), 0 no better than chance, positive better; the insertion scores as for a probability.
    """
    fractions: np.ndarray  # (S+1,) fraction of features removed / inserted
    deletion: np.ndarray  # (N, S+1) target probability (or value) as the most-attributed features become the baseline
    insertion: np.ndarray  # (N, S+1) target probability (or value) as they are put back into the baseline
    deletion_auc: np.ndarray  # (N,) lower is better
    insertion_auc: np.ndarray  # (N,) higher is better
    # (N, S+1) the same with positions in a seeded random order (the same steps); None when not asked for
    random_deletion: np.ndarray | None = None
    random_insertion: np.ndarray | None = None
    value: bool = False  # the curves are a regression's predicted value (output kind "value"), not a probability

    @property
    def start(self) -> np.ndarray:
        """p(x): the target probability (or value) of the input itself (nothing removed)."""
        return self.deletion[:, 0]

    @property
    def floor(self) -> np.ndarray:
        """p(b): the target probability (or value) of the baseline (nothing inserted)."""
        return self.insertion[:, 0]

    def _span(self) -> np.ndarray:
        if self.value:
            return _value_span(self.start, self.floor, self.deletion, self.insertion)
        span = self.start.astype(np.float64) - self.floor
        return np.where(np.abs(span) < MIN_SPAN, np.nan, span)

    def _per_start(self, values) -> np.ndarray:
        start = self.start.astype(np.float64)
        return np.divide(values, start, out=np.full(len(start), np.nan), where=start > 0).astype(np.float32)

    @property
    def deletion_auc_norm(self) -> np.ndarray:
        if self.value:  # the curve from the baseline's value up: f(b) over the whole of 0..1 is an area of f(b)
            return ((self.deletion_auc - self.floor.astype(np.float64)) / self._span()).astype(np.float32)
        return self._per_start(self.deletion_auc)

    @property
    def insertion_auc_norm(self) -> np.ndarray:
        return ((self.insertion_auc - self.floor.astype(np.float64)) / self._span()).astype(np.float32)

    @property
    def random_deletion_auc(self) -> np.ndarray | None:
        return None if self.random_deletion is None else _auc(self.random_deletion, self.fractions)

    @property
    def random_insertion_auc(self) -> np.ndarray | None:
        return None if self.random_insertion is None else _auc(self.random_insertion, self.fractions)

    @property
    def deletion_vs_random(self) -> np.ndarray:
        if self.random_deletion is None:
            return np.full(len(self.deletion), np.nan, np.float32)
        if self.value:
            return ((self.random_deletion_auc.astype(np.float64) - self.deletion_auc) / self._span()).astype(np.float32)
        return self._per_start(self.random_deletion_auc.astype(np.float64) - self.deletion_auc)

    @property
    def insertion_vs_random(self) -> np.ndarray:
        if self.random_insertion is None:
            return np.full(len(self.insertion), np.nan, np.float32)
        return ((self.insertion_auc - self.random_insertion_auc.astype(np.float64)) / self._span()).astype(np.float32)


def _auc(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    return np.trapezoid(curves, fractions, axis=1).astype(np.float32)


def _value_span(start, floor, *curves) -> np.ndarray:
    """f(x) - f(b) per sample (float64), NaN where it is too small to divide by (the rule of VALUE_MIN_SPAN); R is
    taken over `start`, `floor` and the `curves` (N, ...) given."""
    start, floor = np.asarray(start, np.float64), np.asarray(floor, np.float64)
    span = start - floor
    values = np.concatenate([start[:, None], floor[:, None],
                             *[np.asarray(c, np.float64).reshape(len(start), -1) for c in curves]], axis=1)
    reach = values.max(axis=1) - values.min(axis=1)
    size = np.maximum(np.abs(start), np.abs(floor))
    small = (np.abs(span) < VALUE_MIN_SPAN * reach) | (np.abs(span) <= VALUE_RTOL * size) | ~np.isfinite(span)
    return np.where(small, np.nan, span)


def _importance(attr: np.ndarray) -> np.ndarray:
    """Per position importance (N, P): attribution summed over channels, so a pixel or base is removed whole."""
    attr = np.asarray(attr, dtype=np.float32)
    return attr.reshape(len(attr), -1) if attr.ndim == 2 else attr.sum(axis=1).reshape(len(attr), -1)


def _ranks(order: np.ndarray) -> np.ndarray:
    """ranks[i, p]: where position p comes in sample i's order (0 first)."""
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
    return ranks


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidOption(f"{name} must be an integer of at least {low}, got {value!r}")


def _attributions_for(model, x: np.ndarray, attributions) -> np.ndarray:
    layout = layout_of(model)
    shape = (len(x), layout.token_length) if layout.packed else x.shape
    if np.size(attributions) != np.prod(shape):
        raise AnalyzerError(f"attributions of shape {np.shape(attributions)} do not match inputs {x.shape}")
    attr = np.asarray(attributions, dtype=np.float32).reshape(shape)
    if not np.isfinite(attr).all():
        raise AnalyzerError("the attributions hold NaN or inf: recompute the map (a NaN ranks nowhere)")
    return attr


def _target_probs(module, output_kind: str, batch: np.ndarray, targets: np.ndarray, batch_size: int,
                  device) -> np.ndarray:
    """p(target) of each row of `batch` (M, ...), `targets` (M,), in forward passes of `batch_size`."""
    flat = torch.as_tensor(np.ascontiguousarray(batch, dtype=np.float32), device=device)
    probs = []
    for s in range(0, len(flat), batch_size):
        log_p = class_log_probs(module(flat[s:s + batch_size]).float(), output_kind)
        t = torch.as_tensor(targets[s:s + batch_size], device=log_p.device)
        probs.append(log_p.gather(1, t[:, None])[:, 0].exp().cpu())
    return torch.cat(probs).numpy()


def _target_scores(module, output_kind: str, batch: np.ndarray, targets: np.ndarray, batch_size: int,
                   device) -> np.ndarray:
    """What the curves follow: p(target) (`_target_probs`), or for a value output (a regression) the predicted value
    itself, the raw output's first column (the value, or a mean-and-variance model's mean; `targets` are not
    read)."""
    if output_kind != VALUE_OUTPUT:
        return _target_probs(module, output_kind, batch, targets, batch_size, device)
    flat = torch.as_tensor(np.ascontiguousarray(batch, dtype=np.float32), device=device)
    values = []
    for s in range(0, len(flat), batch_size):
        out = module(flat[s:s + batch_size]).float()
        values.append(out.reshape(len(out), -1)[:, 0].cpu())
    return torch.cat(values).numpy()


def _check_signed(signed) -> None:
    if not isinstance(signed, (bool, np.bool_)):
        raise InvalidOption(f"signed must be True or False, got {signed!r}")


def _directions(module, output_kind: str, x: np.ndarray, base: np.ndarray, targets: np.ndarray, signed,
                batch_size: int, device) -> np.ndarray:
    """(N, 1) the factor each sample's attributions are ranked by: the sign of f(x) - f(b) for a signed map of a
    value output (its evidence for the span the scores are in units of; +1 where the span is 0), else 1."""
    if output_kind != VALUE_OUTPUT or not signed:
        return np.ones((len(x), 1), np.float32)
    both = _target_scores(module, output_kind, np.concatenate([x, base]), np.concatenate([targets, targets]),
                          batch_size, device).astype(np.float64)
    return np.where(both[:len(x)] - both[len(x):] < 0, -1.0, 1.0).astype(np.float32)[:, None]


def deletion_insertion(model, inputs, attributions, target=None, *, steps: int = 20, baseline="zeros",
                       background=None, batch_size: int = 64, random_order: bool = True,
                       seed: int = 0, signed: bool = True) -> DeletionInsertion:
    """Deletion and insertion curves of the target probability (target None: the predicted class), or of a
    regression's predicted value (output kind "value"; see the module's doc and `DeletionInsertion`).

    Positions (pixels, sequence positions, features, tokens) are ranked by their attribution summed over channels,
    highest first; a removed position takes the baseline's values ("zeros", "blur", "mean" of `background`, or an
    array). A token model's attributions are one score per token, and a removed token becomes the pad id.

    With `random_order` the same steps are also taken in a seeded random order of positions (per sample, from `seed`
    and the sample's content), for `deletion_vs_random` and `insertion_vs_random`; it doubles the forward passes.

    `signed` (a value output only): the map's sign is the direction of each position's effect (`MethodInfo.signed`),
    so positions are ranked by attribution times the sign of f(x) - f(b); False (magnitudes: saliency, Grad-CAM)
    ranks them as they are. A probability's ranking is the attribution's either way.
    """
    x, _ = _as_batch(model, inputs)
    layout = layout_of(model)
    attr = _attributions_for(model, x, attributions)
    # options before any forward pass: a mistyped option fails at once, not after a minute of curves
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if not isinstance(random_order, (bool, np.bool_)):
        raise InvalidOption(f"random_order must be True or False, got {random_order!r}")
    _check_signed(signed)
    base = baseline_for(x, baseline, background, layout=layout)
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    fractions = np.linspace(0.0, 1.0, steps + 1)
    spatial = x.shape[2:] if x.ndim > 2 else x.shape[1:]
    with analysis_mode(module), torch.no_grad():
        device = module_device(module)
        targets = _targets(_scores_module(model), x, target, batch_size, device)
        importance = _importance(attr)
        if output_kind == VALUE_OUTPUT:
            importance = importance * _directions(module, output_kind, x, base, targets, signed, batch_size, device)
        order = np.argsort(-importance, axis=1, kind="stable")
        positions = order.shape[1]
        counts = np.round(fractions * positions).astype(int)
        rankings = [_ranks(order)]
        if random_order:
            # a random permutation read as ranks is a uniformly random order of removal
            rankings.append(np.stack([rng.permutation(positions) for rng in sample_rngs(x, seed)]))
        curves = np.zeros((2 * len(rankings), len(x), steps + 1), np.float32)
        per_chunk = max(1, batch_size // (2 * len(rankings) * (steps + 1)))
        for start in range(0, len(x), per_chunk):
            stop = min(start + per_chunk, len(x))
            xs, bs = x[start:stop, None], base[start:stop, None]
            parts = []
            for ranks in rankings:
                # removed[i, k, p]: position p is among the counts[k] first of sample i's order
                removed = ranks[start:stop, None, :] < counts[None, :, None]
                if layout.packed:  # tokens ranked, their ids replaced; the mask and other inputs stay
                    removed = layout.token_positions(removed)
                removed = removed.reshape(stop - start, steps + 1, *([1] if x.ndim > 2 else []), *spatial)
                parts += [np.where(removed, bs, xs), np.where(removed, xs, bs)]
            batch = np.concatenate(parts, axis=1)  # (n, 2 * len(rankings) * (steps + 1), ...)
            t = np.repeat(targets[start:stop], batch.shape[1])
            picked = _target_scores(module, output_kind, batch.reshape(-1, *x.shape[1:]), t, batch_size, device)
            picked = picked.reshape(stop - start, len(parts), steps + 1)
            curves[:, start:stop] = picked.transpose(1, 0, 2)
    deletion, insertion = curves[0], curves[1]
    return DeletionInsertion(fractions=fractions, deletion=deletion, insertion=insertion,
                             deletion_auc=_auc(deletion, fractions), insertion_auc=_auc(insertion, fractions),
                             random_deletion=curves[2] if random_order else None,
                             random_insertion=curves[3] if random_order else None,
                             value=output_kind == VALUE_OUTPUT)


# --- ROAD: RemOve And Debias -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Road:
    """ROAD curves (Rong et al., 2022). At fraction f, MoRF has removed the f most relevant positions and LeRF the
    f least relevant (the reference code's LeRF percentage p removes the 1 - p least relevant: our f = 1 - p), each
    filled by noisy linear imputation.

    The areas are normalised by p(x), like `deletion_auc_norm`, so targets of any probability compare: the mean of
    p/p(x) over 0..fractions[-1] (trapezoid, p/p(x) = 1 at 0 removed, divided by fractions[-1]). MoRF low and LeRF
    high mean the map ranks what the model uses; `gap` = LeRF - MoRF, positive when it does (the symmetric summary
    of both orders, as Blücher et al., 2024, take it).

    Of a value (`value`, a regression; the curves are f, the predicted value), a curve is read as deletion's:
    (f - f(b)) / (f(x) - f(b)), f(b) the value of deletion's baseline (`floor`), 1 at 0 removed; NaN by the rule of
    VALUE_MIN_SPAN, its range R taken over f(x), f(b) and both curves."""
    fractions: np.ndarray  # (F,) in (0, 1), increasing
    start: np.ndarray  # (N,) p(x), the target probability (or value) of the input itself
    morf: np.ndarray  # (N, F) target probability (or value), most relevant removed first
    lerf: np.ndarray  # (N, F) target probability (or value), least relevant removed first
    floor: np.ndarray | None = None  # (N,) f(b), the baseline's value: a value output's reference (None otherwise)
    value: bool = False  # the curves are a regression's predicted value (output kind "value"), not a probability

    def _area(self, curve: np.ndarray) -> np.ndarray:
        if self.value:
            return self._value_area(curve)
        start = self.start.astype(np.float64)[:, None]
        relative = np.divide(curve, start, out=np.full(curve.shape, np.nan), where=start > 0)
        f = np.concatenate([[0.0], self.fractions])
        relative = np.concatenate([np.where(start > 0, 1.0, np.nan), relative], axis=1)
        return (np.trapezoid(relative, f, axis=1) / f[-1]).astype(np.float32)

    def _value_area(self, curve: np.ndarray) -> np.ndarray:
        span = _value_span(self.start, self.floor, self.morf, self.lerf)[:, None]
        relative = (curve - np.asarray(self.floor, np.float64)[:, None]) / span
        f = np.concatenate([[0.0], self.fractions])
        relative = np.concatenate([np.where(np.isfinite(span), 1.0, np.nan), relative], axis=1)
        return (np.trapezoid(relative, f, axis=1) / f[-1]).astype(np.float32)

    @property
    def morf_auc(self) -> np.ndarray:
        return self._area(self.morf)

    @property
    def lerf_auc(self) -> np.ndarray:
        return self._area(self.lerf)

    @property
    def gap(self) -> np.ndarray:
        return self.lerf_auc - self.morf_auc


def road_skip_reason(model, inputs) -> str | None:
    """Why ROAD does not apply to these inputs (one line), or None when it does: it imputes a removed position from
    its neighbours, and tabular features and token ids have none to average."""
    if layout_of(model).packed:
        return ("ROAD does not apply to token models: a removed token would be imputed as the mean of its neighbours' "
                "ids, which is no token; use the deletion and insertion scores")
    if np.ndim(inputs) == 2:
        return ("ROAD does not apply to tabular rows: a feature has no neighbours to impute it from (the order of the "
                "columns is arbitrary); use the deletion and insertion scores (baseline 'mean' removes a feature by "
                "its mean)")
    return None


def _neighbours(grid: tuple) -> tuple:
    return GRID_NEIGHBOURS if len(grid) == 2 else CHAIN_NEIGHBOURS


def _linear_imputation(values: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Noise-free linear imputation of many masks at once: `values` (M, C, *grid), `removed` (M, *grid) bool.

    Each removed position x_i is the weighted mean of its neighbours inside the grid, known or removed alike:
        sum_j w_ij x_i - sum_{j removed} w_ij x_j = sum_{j known} w_ij v_j  (j over i's neighbours inside the grid),
    the reference's system (a neighbour outside the image drops out and the weights left are renormalised). One
    sparse system over every removed position of every mask (block diagonal, one block per mask), solved by scipy's
    sparse LU for all channels at once. It is nonsingular as long as each mask keeps one position: every group of
    removed positions then touches a known one (the grid is connected), which makes the matrix irreducibly
    diagonally dominant."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    m, c = values.shape[:2]
    grid = removed.shape[1:]
    shape = (m, *grid)
    flat_removed = removed.reshape(-1)
    unknown = np.flatnonzero(flat_removed)  # mask-major: each mask's unknowns are one block
    out = np.array(values, dtype=np.float64)
    if len(unknown) == 0:
        return out
    keeps = (~removed).reshape(m, -1).any(axis=1)
    if not keeps.all():
        raise AnalyzerError("a ROAD mask removes every position: nothing is left to impute from; keep a fraction "
                            "below 1")
    at = np.full(flat_removed.size, -1)
    at[unknown] = np.arange(len(unknown))
    where = np.unravel_index(unknown, shape)
    per_position = np.moveaxis(out, 1, -1).reshape(-1, c)  # (M * P, C)
    diag = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), c))
    rows, cols, data = [np.arange(len(unknown))], [np.arange(len(unknown))], []
    for offset, weight in _neighbours(grid):
        moved = [where[k + 1] + offset[k] for k in range(len(grid))]
        inside = np.logical_and.reduce([(0 <= p) & (p < n) for p, n in zip(moved, grid)])
        eq = np.flatnonzero(inside)  # the equations (removed positions) that have this neighbour
        nb = np.ravel_multi_index((where[0][eq], *[p[eq] for p in moved]), shape)
        diag[eq] += weight
        missing = flat_removed[nb]
        rows.append(eq[missing])
        cols.append(at[nb[missing]])
        data.append(np.full(int(missing.sum()), -weight))
        rhs[eq[~missing]] += weight * per_position[nb[~missing]]  # each equation once per offset: no add.at needed
    matrix = csc_matrix((np.concatenate([diag, *data]), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(len(unknown), len(unknown)))
    solved = np.asarray(spsolve(matrix, rhs)).reshape(len(unknown), c)
    per_position[unknown] = solved
    return np.moveaxis(per_position.reshape(m, *grid, c), -1, 1)


def _spread(x: np.ndarray) -> np.ndarray:
    """Each sample's standard deviation over all its values: the unit of the imputation's noise."""
    return x.reshape(len(x), -1).std(axis=1).astype(np.float64)


def _check_noise(noise) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating, np.integer)) or \
            not math.isfinite(noise) or noise < 0:
        raise InvalidOption(f"noise must be a finite number of at least 0 (a fraction of each sample's std), got "
                            f"{noise!r}")


def _check_fractions(fractions) -> np.ndarray:
    try:
        f = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        f = None
    if f is None or f.ndim != 1 or len(f) == 0 or not np.isfinite(f).all() or (f <= 0).any() or (f >= 1).any() \
            or (np.diff(f) <= 0).any():
        raise InvalidOption(f"fractions must be increasing numbers strictly between 0 and 1 (a mask must keep "
                            f"something to impute from), got {fractions!r}")
    return f


def noisy_linear_imputation(inputs, removed, *, noise: float = ROAD_NOISE, seed: int = 0) -> np.ndarray:
    """ROAD's imputation of images (N, C, H, W) or sequences (N, C, L): each position where `removed` (N, H, W) or
    (N, L) is True is replaced by the weighted mean of its neighbours (GRID_NEIGHBOURS, CHAIN_NEIGHBOURS), solved for
    all removed positions at once, plus Gaussian noise of std `noise` x the sample's std (seeded per sample)."""
    x = np.asarray(inputs, dtype=np.float64)
    mask = np.asarray(removed, dtype=bool)
    if x.ndim not in (3, 4):
        raise AnalyzerError(f"inputs of shape {x.shape} are not images (N, C, H, W) or sequences (N, C, L): ROAD "
                            f"imputes from neighbouring positions")
    if mask.shape != (x.shape[0], *x.shape[2:]):
        raise AnalyzerError(f"removed has shape {mask.shape}: it must be one flag per position, "
                            f"{(x.shape[0], *x.shape[2:])}")
    _check_noise(noise)
    _check_int("seed", seed, 0)
    out = _linear_imputation(x, mask)
    if noise > 0:
        scale = noise * _spread(x)
        for i, rng in enumerate(sample_rngs(np.asarray(inputs, dtype=np.float32), seed)):
            out[i] += np.where(mask[i][None], rng.standard_normal(x.shape[1:]) * scale[i], 0.0)
    return out.astype(np.float32)


def road(model, inputs, attributions, target=None, *, fractions=ROAD_FRACTIONS, noise: float = ROAD_NOISE,
         seed: int = 0, batch_size: int = 64, baseline="zeros", background=None, signed: bool = True) -> Road:
    """ROAD's MoRF and LeRF curves of the target probability (target None: the predicted class), or of a
    regression's predicted value, for images and sequences (`road_skip_reason` says why not otherwise).

    A value output only: `baseline` ("zeros", "blur", "mean" of `background`, or an array, as in
    `deletion_insertion`) gives the reference value f(b) its curves are normalised by, and `signed` ranks the
    positions by attribution times the sign of f(x) - f(b), as deletion does. A probability's ROAD uses neither.

    Positions are ranked as in `deletion_insertion` (attribution summed over channels), ties broken in a seeded
    random order (as the reference adds 1e-4 noise to the map: a flat region removed in raster order would carve a
    shape the model can read). At each fraction f, floor(f x positions) of them are removed, all channels together,
    and imputed (`noisy_linear_imputation`); noise is drawn per sample from `seed` and the sample's content."""
    x, _ = _as_batch(model, inputs)
    reason = road_skip_reason(model, x)
    if reason is not None:
        raise AnalyzerError(reason)
    attr = _attributions_for(model, x, attributions)
    _check_noise(noise)
    f = _check_fractions(fractions)
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    _check_signed(signed)
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    value = output_kind == VALUE_OUTPUT
    base = baseline_for(x, baseline, background, layout=layout_of(model)) if value else None
    grid = x.shape[2:]
    importance = _importance(attr)
    positions = importance.shape[1]
    rngs = sample_rngs(x, seed)
    tiebreak = np.stack([rng.random(positions) for rng in rngs])
    counts = np.minimum(np.floor(f * positions + 1e-9).astype(int), positions - 1)
    masks = 2 * len(f)
    spread = _spread(x)
    curves = np.zeros((len(x), masks), np.float32)
    per_chunk = max(1, batch_size // masks)
    with analysis_mode(module), torch.no_grad():
        device = module_device(module)
        targets = _targets(_scores_module(model), x, target, batch_size, device)
        if value:
            importance = importance * _directions(module, output_kind, x, base, targets, signed, batch_size, device)
        ranks = _ranks(np.lexsort((tiebreak, -importance), axis=1))
        for start in range(0, len(x), per_chunk):
            stop = min(start + per_chunk, len(x))
            r = ranks[start:stop, None, :]
            morf = r < counts[None, :, None]
            lerf = r >= positions - counts[None, :, None]
            removed = np.concatenate([morf, lerf], axis=1).reshape(stop - start, masks, *grid)
            values = np.repeat(x[start:stop], masks, axis=0)
            imputed = _linear_imputation(values, removed.reshape(-1, *grid)).reshape(stop - start, masks,
                                                                                       *x.shape[1:])
            if noise > 0:
                for i in range(stop - start):
                    eps = rngs[start + i].standard_normal(imputed.shape[1:]) * (noise * spread[start + i])
                    imputed[i] += np.where(removed[i][:, None], eps, 0.0)
            t = np.repeat(targets[start:stop], masks)
            probs = _target_scores(module, output_kind, imputed.reshape(-1, *x.shape[1:]), t, batch_size, device)
            curves[start:stop] = probs.reshape(stop - start, masks)
        start_probs = _target_scores(module, output_kind, x, targets, batch_size, device)
        floor = _target_scores(module, output_kind, base, targets, batch_size, device) if value else None
    return Road(fractions=f, start=start_probs, morf=curves[:, :len(f)], lerf=curves[:, len(f):], floor=floor,
                value=value)


# --- the per-run table's columns ---------------------------------------------------------------------------------------

# Column -> what it means, in one sentence (the Explain page can show these). All normalised scores are per sample.
# For a regression (a value output) read "target probability" as the predicted value, and p(x) and the
# baseline-to-input span as f(x) - f(b): its normalised curves run from 1 to 0 (`DeletionInsertion`).
PERTURBATION_COLUMNS = {
    "deletion_auc_norm": "Deletion AUC divided by the input's own target probability p(x): the share of it left on "
                         "average as the most relevant positions are removed (lower is better, 1 = no effect).",
    "insertion_auc_norm": "Insertion AUC rescaled from the baseline's probability (0) to the input's (1): how much "
                          "of that way the curve covers on average (higher is better; empty when the two are within "
                          "0.01).",
    "deletion_vs_random": "The headline: how much faster than a random order of removal the map's order destroys "
                          "the target probability, in units of p(x) (0 = no better than chance, higher is better).",
    "insertion_vs_random": "How much faster than a random order the map's order restores the target probability, "
                           "in units of the baseline-to-input span (0 = no better than chance, higher is better).",
    "road_morf_auc": "ROAD, most relevant first: mean target probability relative to p(x) as 10-90% of positions "
                     "are removed and imputed from their neighbours (lower is better; empty for tables and tokens).",
    "road_lerf_auc": "ROAD, least relevant first: the same with the least relevant removed first (higher is "
                     "better).",
    "road_gap": "ROAD LeRF minus MoRF: positive when the map ranks what the model uses (higher is better).",
}


def perturbation_columns(curves: DeletionInsertion, road_result: Road | None) -> dict:
    """The per-sample columns of PERTURBATION_COLUMNS (float32; the ROAD ones NaN when `road_result` is None)."""
    nan = np.full(len(curves.deletion), np.nan, np.float32)
    columns = {"deletion_auc_norm": curves.deletion_auc_norm, "insertion_auc_norm": curves.insertion_auc_norm,
               "deletion_vs_random": curves.deletion_vs_random, "insertion_vs_random": curves.insertion_vs_random,
               "road_morf_auc": nan if road_result is None else road_result.morf_auc,
               "road_lerf_auc": nan if road_result is None else road_result.lerf_auc,
               "road_gap": nan if road_result is None else road_result.gap}
    return {k: np.asarray(v, dtype=np.float32) for k, v in columns.items()}
