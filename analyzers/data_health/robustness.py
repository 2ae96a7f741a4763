"""Robustness curves: how the model's metric falls as its inputs are perturbed more and more.

`robustness_curve(model, x, y, *, perturbation, strengths, batch_size=256, seed=0, slices=None, on_batch=None)`
perturbs every sample at each strength, runs the model on it in batches (`engines.inference.forward_batches`, in
eval mode under the model's lock, `guard.analysis_mode`, and `torch.inference_mode`: the model is handed back as it
came) and returns a `RobustnessCurve`:
- the metric at each strength, overall, per class (tasks with classes) and per slice (`slices`: name -> boolean row
  mask); the curve always starts at strength 0, the unperturbed inputs (0 is added when it is not asked for);
- the share of samples whose prediction changed from the unperturbed one (`flip_rate`), and each sample's first
  flip (`first_flip`): the lowest strength asked for at which its prediction differs from its unperturbed one,
  `np.inf` when it never does; `first_flipping(k)` lists the rows that flip first, for a page to show.

The metric is the task's (`evaluation.tasks.task_of(model)`), asked and never branched on by name: where the task's
answers are exactly right or wrong (`Task.exactly_right`: a class, a set of labels) it is the accuracy, the share of
samples that `Task.wrong` does not call wrong (a multi-label model's subset accuracy); otherwise (a regression, whose
`wrong` is relative to the other samples' errors and so would stay near 10 % whatever the noise) it is the mean of
`Task.errors` (the mean absolute error), lower being better (`higher_is_better`). Either is a mean over samples, so
the per-class curves weighted by the class counts give the overall curve. A prediction "changes" when
`Task.predictions` differs (any label of a multi-label model); a real-valued prediction always moves a little, so it
changes when it moves by more than the median of the unperturbed errors (the model's typical error).

Perturbations (`PERTURBATIONS`; the inputs' modality is read from their shape: images (N, C, H, W), sequences
(N, C, L), tables (N, F); axis 1, a channel or a feature, is what the statistics below are taken per):
- `gaussian_noise` (images, sequences) and `feature_noise` (tables): x + s·σ_c·z, z standard normal per value and
  σ_c the channel's (feature's) standard deviation over the given data, so strength 1 is noise as large as the
  data's own spread whatever its scale (pixels in 0..1, normalised pixels, a feature in thousands);
- `brightness` (images): x + s·σ_c, every value of channel c raised by s of its standard deviations;
- `contrast` (images), s in [0, 1]: m + (1 - s)(x - m), m each image's own mean per channel: 1 is a flat image;
- `blur` (images, sequences): a Gaussian blur of sigma s pixels (samples) over the spatial axes only
  (the values of `scipy.ndimage.gaussian_filter(mode="nearest")`: the edge value extends beyond the border),
  computed as one torch matrix product per axis (`blur_matrix`): about 1 ms per batch of 256 3x32x32 images,
  where scipy took 5 to 19 ms (sigma 0.5 to 4) against 16 to 24 ms for the shapes network's forward of that batch,
  and separable torch convolutions 67 to 350 ms;
- `occlusion` (images, sequences), s in [0, 1]: the image is cut into square cells of side
  max(2, ceil(min(H, W) / 8)) pixels (segments of max(2, ceil(L / 16)) for a sequence) and a fraction s of them,
  chosen at random per sample, is filled with each channel's mean over the data (cells at the border may be cut
  short, so the area covered is s up to one cell's rounding);
- `feature_dropout` (tables), s in [0, 1]: a fraction s of each row's features, chosen at random per row, replaced
  by their mean over the data.
A channel or feature that is constant over the data (σ 0) takes σ = 1: its values move in the data's own units
(brightness on a constant image adds s). A perturbation that does not apply to the inputs' modality is refused
(`InvalidOption`) naming those that do; a model of token ids, or of several inputs packed in one row, is refused.

Strength 0 is the identity for every perturbation (the rows are read as they are; the perturbation is not
called). The random draws (noise, the cells and features chosen) are made per block of 64 rows from
`numpy.random.default_rng([seed, block])`, so a sample's draws depend on the seed and its row only: the same seed
gives the same curve whatever the batch size, and the perturbations are nested: one draw, scaled by the strength
(noise), or taken in one seeded order (the cells and features: those occluded at 0.2 are among those occluded at
0.4). Nested perturbations do not make a curve monotone (a sample can be wrong at 0.5 and right again at 1.0), so
a curve may rise a little: see the measured numbers below.

`fgsm_curve(model, x, y, *, epsilons, ...)`: Captum's fast gradient sign method (`captum.robust.FGSM`: x + ε·sign(∇x
loss), the loss the task's own, `Task.loss_from_raw`, against the labels) at each ε, in the inputs' own units. Its
result is marked `adversarial=True`: it is the worst direction for each sample, not a perturbation nature makes, and a
page must not show it as one.

Measured on the shipped samples' test splits (seed 0; accuracy at each strength):
- digits (450 images 1x8x8), strengths 0, 0.25, 0.5, 1, 2: gaussian_noise 0.987, 0.982, 0.942, 0.707, 0.356;
  blur 0.987, 0.987, 0.978, 0.840, 0.413; brightness 0.987, 0.982, 0.980, 0.949, 0.862; strengths 0, 0.1, 0.25,
  0.5, 0.75, 1: contrast 0.987, 0.987, 0.984, 0.978, 0.933, 0.100 (a flat image: one class); occlusion 0.987,
  0.940, 0.873, 0.649, 0.407, 0.100; FGSM at ε 0, 0.01, 0.03, 0.1 (pixels in 0..1): 0.987, 0.978, 0.936, 0.451.
- tabular (171 rows of 30 features): feature_noise at 0, 0.25, 0.5, 1, 2: 0.959, 0.959, 0.953, 0.918, 0.807;
  feature_dropout at 0, 0.1, 0.25, 0.5, 0.75, 1: 0.959, 0.942, 0.936, 0.942, 0.895, 0.374 (the one rise seen: one
  sample of 171, 0.006, from 0.25 to 0.5); FGSM at ε 0, 0.01, 0.03, 0.1 (raw feature units, some in thousands, so
  the step is tiny for those and large for the small ones): 0.959, 0.778, 0.228, 0.006.
- The noise curves never rose; tests allow a rise of 0.01 between strengths.
- Other tasks and modalities, the same code: prices (a regression) mean absolute error 12.9, 36.3, 66.8 at
  feature_noise 0, 0.5, 1; scenes (multi-label) subset accuracy 0.778, 0.758, 0.609 at gaussian_noise 0, 0.5, 1;
  dna (sequences 4x100) 0.910, 0.727, 0.503 at occlusion 0, 0.2, 0.5; audio (spectrograms 1x32x49) 0.960, 0.148,
  0.134 at gaussian_noise 0, 0.5, 1. Through a sandboxed worker the digits curve is identical to the one in
  process.
- Cost (one CPU thread, 5 strengths, interleaved with a bare batched forward of the same rows to cancel the shared
  cores' drift, median of 9): digits 1.16x a bare forward per strength for gaussian_noise, 1.11x for occlusion;
  tabular 9.8x, since its forward takes 0.16 ms for all 171 rows and the task's bookkeeping per strength (outputs,
  predictions, wrong, per class) about 1.5 ms; FGSM 1.8x per strength on digits (a backward per batch).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import AnalyzerError, InvalidOption, whole_number
from ..loading.sandbox import runs_in_worker

MODALITIES = {4: "image", 3: "sequence", 2: "table"}  # the inputs' number of dimensions, the batch's included
DRAW_BLOCK = 64  # rows per seeded generator: a row's draws depend on the seed and its row only
IMAGE_CELLS = 8  # occlusion: an image's shorter side holds this many cells (a cell is 2 pixels at least)
SEQUENCE_CELLS = 16  # occlusion: a sequence holds this many segments
MIN_CELL = 2


@dataclass(frozen=True)
class _Perturbation:
    name: str
    modalities: tuple  # the MODALITIES it applies to
    max_strength: float  # math.inf when unbounded
    apply: object  # (batch float32 (B, ...), strength, _Context, start, stop) -> perturbed batch
    unit: str  # what a strength of 1 means, for a page's axis


@dataclass(frozen=True)
class _Context:
    """What a perturbation needs beyond the batch: the seed, the inputs' per-channel (per-feature) statistics over
    the data, and the shape of one sample."""

    seed: int
    mean: np.ndarray  # (C,) float32
    scale: np.ndarray  # (C,) float32, the standard deviation (1 where it is 0)
    sample_shape: tuple
    # the noise draws of each batch (start, stop), kept from one strength to the next (the same draw, scaled) while
    # all of them fit NOISE_CACHE_BYTES: drawing them again took most of a noisy strength's extra time
    draws: dict = field(default_factory=dict, compare=False)


def _row_draws(seed: int, start: int, stop: int, draw) -> np.ndarray:
    """`draw(rng, rows)` for rows start..stop-1, made per block of DRAW_BLOCK rows from default_rng([seed, block]):
    the draws of a row do not depend on which batch it is read in."""
    first, last = start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK
    parts = [draw(np.random.default_rng([seed, block]), DRAW_BLOCK) for block in range(first, last + 1)]
    offset = start - first * DRAW_BLOCK
    return np.concatenate(parts)[offset:offset + stop - start]


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast over a batch of `ndim` dimensions along axis 1."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def _normals(seed: int, start: int, stop: int, shape: tuple) -> np.ndarray:
    """The standard normal draws `_row_draws` makes for rows start..stop-1, written in place into one float32 array
    (a whole block straight from its generator): the same values without a list of blocks, their concatenation and
    its copy, which took half the time of a noisy batch."""
    out = np.empty((stop - start,) + tuple(shape), dtype=np.float32)
    for block in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1):
        lo, hi = block * DRAW_BLOCK, (block + 1) * DRAW_BLOCK
        rng = np.random.default_rng([seed, block])
        if start <= lo and hi <= stop:
            rng.standard_normal(out=out[lo - start:hi - start], dtype=np.float32)
        else:  # a block the batch cuts: draw it whole, keep the batch's rows
            whole = rng.standard_normal((DRAW_BLOCK,) + tuple(shape), dtype=np.float32)
            keep = slice(max(start, lo), min(stop, hi))
            out[keep.start - start:keep.stop - start] = whole[keep.start - lo:keep.stop - lo]
    return out


NOISE_CACHE_BYTES = 256 << 20  # noise draws kept across strengths: 10,000 3x32x32 images hold 123 MB


def _noise(batch, strength, ctx: _Context, start, stop):
    z = ctx.draws.get((start, stop))
    if z is None:
        z = _normals(ctx.seed, start, stop, ctx.sample_shape)
        if sum(d.nbytes for d in ctx.draws.values()) + z.nbytes <= NOISE_CACHE_BYTES:
            ctx.draws[(start, stop)] = z
    out = z * (np.float32(strength) * _per_channel(ctx.scale, batch.ndim))
    out += batch
    return out


def _brightness(batch, strength, ctx: _Context, start, stop):
    return batch + np.float32(strength) * _per_channel(ctx.scale, batch.ndim)


def _contrast(batch, strength, ctx: _Context, start, stop):
    mean = batch.mean(axis=tuple(range(2, batch.ndim)), keepdims=True)
    return mean + np.float32(1.0 - strength) * (batch - mean)


BLUR_MATRIX_LIMIT = 1024  # an axis up to this long is blurred by one matrix product (n x n floats), a longer one by scipy


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 B with B @ v = scipy.ndimage.gaussian_filter1d(v, sigma, mode="nearest") for a length-n v:
    scipy's kernel (exp(-x^2 / 2 sigma^2) for |x| <= int(4 sigma + 0.5), summing to 1) with each tap's index
    clamped to the axis, which is what extending the edge value means, however wide the kernel."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    matrix, rows = np.zeros((n, n)), np.arange(n)
    for offset, weight in zip(offsets.astype(np.int64), weights):
        np.add.at(matrix, (rows, np.clip(rows + offset, 0, n - 1)), weight)
    return matrix.astype(np.float32)


def _blur(batch, strength, ctx: _Context, start, stop):
    """A Gaussian blur of each channel over the spatial axes only (never across channels): per axis, one torch matrix
    product with `blur_matrix` (about 1 ms for 256 3x32x32 images at any sigma, where scipy's gaussian_filter took
    5 to 19 ms, as long as the shapes network's forward), or scipy's gaussian_filter1d for an axis longer than
    BLUR_MATRIX_LIMIT; the values agree with scipy's to float32 rounding."""
    import torch
    from scipy.ndimage import gaussian_filter1d

    out = np.asarray(batch, dtype=np.float32)
    sigma = float(strength)
    for axis in range(2, out.ndim):
        n = out.shape[axis]
        if n > BLUR_MATRIX_LIMIT:
            out = gaussian_filter1d(out, sigma, axis=axis, mode="nearest").astype(np.float32, copy=False)
            continue
        # torch's matmul, in the thread pool the model's forward uses: numpy's BLAS starts threads of its own that
        # kept spinning through the next forward and made it 2.5 times slower on two cores
        matrix = torch.from_numpy(blur_matrix(n, sigma))
        with torch.inference_mode():
            moved = torch.from_numpy(np.ascontiguousarray(out)).movedim(axis, -1)
            out = torch.matmul(moved, matrix.T).movedim(-1, axis).contiguous().numpy()
    return out


def _ranks(ctx: _Context, start: int, stop: int, count: int) -> np.ndarray:
    """(rows, count) each row's seeded random order of `count` items, as ranks 0..count-1."""
    order = _row_draws(ctx.seed, start, stop, lambda rng, n: rng.random((n, count)))
    return order.argsort(axis=1, kind="stable").argsort(axis=1, kind="stable")


def _covered(strength: float, count: int) -> int:
    return int(math.floor(strength * count + 0.5))


def occlusion_cell(spatial: tuple) -> int:
    """The side (or length) of an occlusion cell for one sample's spatial shape (H, W) or (L,)."""
    parts = IMAGE_CELLS if len(spatial) == 2 else SEQUENCE_CELLS
    return min(min(spatial), max(MIN_CELL, math.ceil(min(spatial) / parts)))


def _occlusion(batch, strength, ctx: _Context, start, stop):
    spatial = batch.shape[2:]
    side = occlusion_cell(spatial)
    grid = tuple(math.ceil(d / side) for d in spatial)
    cells = math.prod(grid)
    hidden = _ranks(ctx, start, stop, cells) < _covered(strength, cells)  # (B, cells)
    mask = hidden.reshape((len(batch),) + grid)
    for axis, size in enumerate(spatial):  # each cell over its pixels, cut at the border
        mask = np.repeat(mask, side, axis=axis + 1).take(np.arange(size), axis=axis + 1)
    mask = mask[:, None]  # every channel of a cell
    return np.where(mask, _per_channel(ctx.mean, batch.ndim), batch).astype(np.float32, copy=False)


def _feature_dropout(batch, strength, ctx: _Context, start, stop):
    features = batch.shape[1]
    dropped = _ranks(ctx, start, stop, features) < _covered(strength, features)
    return np.where(dropped, ctx.mean[None, :], batch).astype(np.float32, copy=False)


PERTURBATIONS = {p.name: p for p in (
    _Perturbation("gaussian_noise", ("image", "sequence"), math.inf, _noise, "standard deviations of each channel"),
    _Perturbation("blur", ("image", "sequence"), math.inf, _blur, "pixels (the Gaussian's sigma)"),
    _Perturbation("brightness", ("image",), math.inf, _brightness, "standard deviations of each channel"),
    _Perturbation("contrast", ("image",), 1.0, _contrast, "share of the contrast removed"),
    _Perturbation("occlusion", ("image", "sequence"), 1.0, _occlusion, "share of the area covered"),
    _Perturbation("feature_noise", ("table",), math.inf, _noise, "standard deviations of each feature"),
    _Perturbation("feature_dropout", ("table",), 1.0, _feature_dropout, "share of the features replaced"),
)}


@dataclass(frozen=True)
class RobustnessCurve:
    """The metric against perturbation strength, overall, per class and per slice, and each sample's first flip.
    See the module's docstring."""

    perturbation: str
    modality: str  # "image", "sequence" or "table"
    unit: str  # what a strength of 1 means
    adversarial: bool  # True for an attack (FGSM): the worst direction per sample, not a natural perturbation
    metric: str  # "accuracy", or "mean <the task's error>" for a task whose answers are never exactly right
    higher_is_better: bool
    strengths: np.ndarray  # (S,) float64 ascending, strengths[0] == 0 (the unperturbed inputs)
    values: np.ndarray  # (S,) the metric at each strength
    flip_rate: np.ndarray  # (S,) share of samples whose prediction differs from the unperturbed one
    class_values: np.ndarray  # (K, S) per class (NaN for a class without samples); (0, S) for a task without classes
    class_counts: np.ndarray  # (K,) int64
    slice_names: tuple
    slice_values: np.ndarray  # (M, S) per slice (NaN for an empty slice)
    slice_counts: np.ndarray  # (M,) int64
    first_flip: np.ndarray  # (N,) float64: the lowest strength whose prediction differs, np.inf when none does
    num_samples: int
    seed: int

    def __post_init__(self):
        # what a sandboxed worker sends is checked before a page draws it
        for name in ("strengths", "values", "flip_rate", "class_values", "slice_values", "first_flip"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        for name in ("class_counts", "slice_counts"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        object.__setattr__(self, "slice_names", tuple(str(s) for s in self.slice_names))
        s, n = self.strengths.shape, int(self.num_samples)
        if (self.strengths.ndim != 1 or not len(self.strengths) or self.strengths[0] != 0
                or np.any(np.diff(self.strengths) <= 0) or self.values.shape != s or self.flip_rate.shape != s
                or self.class_values.ndim != 2 or self.class_values.shape[1:] != s
                or self.class_counts.shape != self.class_values.shape[:1]
                or self.slice_values.shape != (len(self.slice_names),) + s
                or self.slice_counts.shape != (len(self.slice_names),) or self.first_flip.shape != (n,)
                or np.any(self.first_flip[np.isfinite(self.first_flip)] <= 0)):
            raise AnalyzerError("the robustness curve came back malformed (arrays that do not match the strengths, "
                                "classes, slices or samples): run the analysis again")

    def first_flipping(self, k: int = 10) -> np.ndarray:
        """The rows of at most `k` samples that flip first (lowest first flip, then row order); never those that do
        not flip."""
        flipped = np.flatnonzero(np.isfinite(self.first_flip))
        order = flipped[np.argsort(self.first_flip[flipped], kind="stable")]
        return order[:max(0, int(k))]

    def table(self):
        """One row per strength: the strength, the metric, the flip rate, and a column per class and per slice."""
        import pandas as pd

        columns = {"strength": self.strengths, self.metric: self.values, "flip_rate": self.flip_rate}
        columns.update({f"class {k}": row for k, row in enumerate(self.class_values)})
        columns.update({f"slice {name}": row for name, row in zip(self.slice_names, self.slice_values)})
        return pd.DataFrame(columns)


def _strengths(values, name: str, most: float) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidOption(f"{name} must be a list of numbers (such as 0, 0.25, 0.5, 1), got {values!r}") from None
    if not len(out) or not np.all(np.isfinite(out)) or np.any(out < 0):
        raise InvalidOption(f"{name} must be a non-empty list of finite numbers of at least 0 (such as 0, 0.25, "
                            f"0.5, 1), got {values!r}")
    if np.any(out > most):
        raise InvalidOption(f"{name} must be at most {most:g} for this perturbation (a share), got "
                            f"{float(out.max()):g}: use strengths from 0 to {most:g}")
    return np.union1d(out, [0.0])  # sorted, each once, starting at 0 (the unperturbed inputs)


def _check_inputs(model, x, y, task, slices):
    """The inputs' modality, the labels as the task reads them, and the slices as (names, (M, N) masks)."""
    layout = getattr(model, "input_layout", None)
    if layout is not None and (len(layout.inputs) > 1 or any(i.is_integer for i in layout.inputs)):
        raise InvalidOption("this model takes token ids or several inputs packed in one row: robustness curves "
                            "perturb images, sequences and tables of real values")
    if getattr(x, "dtype", np.dtype(np.float32)).kind not in "fiub" or np.ndim(x) not in MODALITIES:
        raise InvalidOption(f"the inputs must be numbers shaped (N, C, H, W), (N, C, L) or (N, F), got "
                            f"{np.shape(x)}: pass the dataset's inputs")
    n = len(x)
    if n == 0:
        raise InvalidOption("no inputs given: pass the dataset's inputs")
    labels = task.check_labels(y)
    if len(labels) != n:
        raise InvalidOption(f"{len(labels)} labels for {n} inputs: pass one label per input")
    names, masks = [], []
    if slices is not None:
        if not isinstance(slices, dict):
            raise InvalidOption("slices must be a dict of name -> boolean mask over the inputs")
        for name, mask in slices.items():
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != (n,):
                raise InvalidOption(f"slice {str(name)[:40]!r} must be a boolean mask of {n} rows, got "
                                    f"{mask.dtype} of shape {mask.shape}")
            names.append(str(name))
            masks.append(mask)
    return MODALITIES[np.ndim(x)], labels, tuple(names), np.array(masks, dtype=bool).reshape(len(masks), n)


def _channel_stats(x, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(C,) mean and standard deviation of axis 1 over every row and position, in float64, chunk by chunk (the
    inputs may be memory-mapped)."""
    total = squares = 0.0
    count = 0
    first = np.asarray(x[:chunk], dtype=np.float32)
    # a shifted sum of squares: no cancellation for data far from 0
    shift = first.reshape(len(first), first.shape[1], -1).mean(axis=(0, 2), dtype=np.float64).astype(np.float32)
    for start in range(0, len(x), chunk):
        part = first if start == 0 else np.asarray(x[start:start + chunk], dtype=np.float32)
        # (rows, channels, positions), centred in float32 and summed in float64 along contiguous memory: a third of
        # the time of float64 copies summed over axes (0, 2, 3)
        centred = part.reshape(len(part), part.shape[1], -1) - shift[None, :, None]
        total = total + centred.sum(axis=(0, 2), dtype=np.float64)
        squares = squares + np.square(centred).sum(axis=(0, 2), dtype=np.float64)
        count += part.size // part.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return (mean + shift.astype(np.float64)).astype(np.float32), std.astype(np.float32)


class _PerturbedRows:
    """The inputs as `forward_batches` reads them (`len`, and a slice of rows as an array), each slice perturbed at
    one strength when it is read: nothing perturbed is kept beyond the batch (the noise draws, unscaled, are kept
    for the next strength while they fit NOISE_CACHE_BYTES)."""

    def __init__(self, x, perturb, strength: float):
        self.x, self.perturb, self.strength = x, perturb, float(strength)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, rows: slice):
        start, stop, _ = rows.indices(len(self.x))
        batch = np.array(self.x[start:stop], dtype=np.float32)
        if self.strength == 0 or stop <= start:
            return batch
        return self.perturb(batch, self.strength, start, stop)


def _curve(model, x, labels, task, strengths, perturb, *, batch_size, slices, on_batch, grad=False):
    """The per-strength metric, flip rate and first flips of `perturb(batch, strength, start, stop)`."""
    import torch

    from ..engines.inference import forward_batches, module_device
    from ..guard import analysis_mode, unwrap

    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    n, count = len(x), len(strengths)
    right_or_wrong = bool(task.exactly_right)
    values, flip_rate = np.zeros(count), np.zeros(count)
    classes = int(task.num_outputs) if task.has_classes else 0
    class_counts = np.bincount(labels, minlength=classes)[:classes] if classes else np.zeros(0, np.int64)
    class_values = np.full((classes, count), np.nan)
    slice_names, masks = slices
    slice_values = np.full((len(slice_names), count), np.nan)
    first_flip = np.full(n, np.inf)
    clean_pred, tolerance = None, 0.0
    # an attack needs gradients with respect to its inputs: inference mode is off while it perturbs, and on while
    # the model is scored
    context = torch.no_grad if grad else torch.inference_mode
    with analysis_mode(module):
        device = module_device(module)
        for index, strength in enumerate(strengths):
            parts = []
            with context():
                for start, batch, out in forward_batches(module, _PerturbedRows(x, perturb, strength),
                                                         batch_size=batch_size, device=device):
                    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
                        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise AnalyzerError(f"the model returned {shape} for a batch of {len(batch)}; expected "
                                            f"(N, outputs)")
                    if not torch.isfinite(out).all():
                        last = start + len(batch) - 1
                        raise AnalyzerError(f"the model returned NaN or inf on samples {start}..{last} at strength "
                                            f"{strength:g}: lower the strengths")
                    parts.append(task.outputs_from_raw(out.float(), output_kind).cpu().numpy())
                    if on_batch is not None:
                        on_batch(index * n + start + len(batch), count * n)
            outputs = np.concatenate(parts).astype(np.float64)
            score = ((~task.wrong(labels, outputs)).astype(np.float64) if right_or_wrong
                     else task.errors(labels, outputs))
            pred = np.asarray(task.predictions(outputs))
            if clean_pred is None:  # strength 0: the unperturbed inputs
                clean_pred = pred
                tolerance = 0.0 if right_or_wrong else float(np.median(task.errors(labels, outputs)))
            moved = np.abs(pred.astype(np.float64) - clean_pred).reshape(n, -1).max(axis=1) > tolerance
            first_flip[moved & np.isinf(first_flip)] = strength
            values[index], flip_rate[index] = score.mean(), moved.mean()
            if classes:
                sums = np.bincount(labels, weights=score, minlength=classes)[:classes]
                with np.errstate(invalid="ignore", divide="ignore"):
                    class_values[:, index] = np.where(class_counts > 0, sums / np.maximum(class_counts, 1), np.nan)
            for m, mask in enumerate(masks):
                slice_values[m, index] = score[mask].mean() if mask.any() else np.nan
    metric = "accuracy" if right_or_wrong else f"mean {task.error_name}"
    return dict(metric=metric, higher_is_better=right_or_wrong, strengths=strengths, values=values,
                flip_rate=flip_rate, class_values=class_values, class_counts=class_counts, slice_names=slice_names,
                slice_values=slice_values, slice_counts=masks.sum(axis=1), first_flip=first_flip, num_samples=n)


@runs_in_worker
def robustness_curve(model, x, y, *, perturbation: str, strengths, batch_size: int = 256, seed: int = 0,
                     slices=None, on_batch=None) -> RobustnessCurve:
    """The task's metric against `perturbation`'s strength, overall, per class and per slice, with each sample's
    first flip; see the module's docstring for every perturbation and choice."""
    from ..evaluation.tasks import task_of

    if perturbation not in PERTURBATIONS:
        raise InvalidOption(f"unknown perturbation {perturbation!r}: choose one of {', '.join(PERTURBATIONS)}")
    chosen = PERTURBATIONS[perturbation]
    strengths = _strengths(strengths, "strengths", chosen.max_strength)
    batch_size = whole_number(batch_size, "batch_size", 1, "use 256, or less if memory is short")
    seed = whole_number(seed, "seed", 0, "use 0 or another non-negative integer")
    task = task_of(model)
    modality, labels, names, masks = _check_inputs(model, x, y, task, slices)
    if modality not in chosen.modalities:
        fitting = [name for name, p in PERTURBATIONS.items() if modality in p.modalities]
        raise InvalidOption(f"{perturbation} does not apply to {modality} inputs {tuple(np.shape(x)[1:])}: choose "
                            f"one of {', '.join(fitting)}")
    mean, std = _channel_stats(x)
    ctx = _Context(seed=seed, mean=mean, scale=np.where(std > 0, std, np.float32(1.0)).astype(np.float32),
                   sample_shape=tuple(np.shape(x)[1:]))

    def perturb(batch, strength, start, stop):
        return chosen.apply(batch, strength, ctx, start, stop)

    result = _curve(model, x, labels, task, strengths, perturb, batch_size=batch_size, slices=(names, masks),
                    on_batch=on_batch)
    return RobustnessCurve(perturbation=perturbation, modality=modality, unit=chosen.unit, adversarial=False,
                           seed=seed, **result)


def perturbed_inputs(x, *, perturbation: str, strength: float, seed: int = 0, rows=None) -> np.ndarray:
    """`x` (or its rows start..stop-1, `rows=(start, stop)`) perturbed at one strength exactly as
    `robustness_curve` perturbs them, the statistics taken over all of `x`: for a page to show a perturbed sample."""
    if perturbation not in PERTURBATIONS:
        raise InvalidOption(f"unknown perturbation {perturbation!r}: choose one of {', '.join(PERTURBATIONS)}")
    chosen = PERTURBATIONS[perturbation]
    strength = float(_strengths([strength], "strength", chosen.max_strength)[-1])
    seed = whole_number(seed, "seed", 0, "use 0 or another non-negative integer")
    modality = MODALITIES.get(np.ndim(x))
    if modality not in chosen.modalities:
        fitting = [name for name, p in PERTURBATIONS.items() if modality in p.modalities]
        raise InvalidOption(f"{perturbation} does not apply to inputs of shape {np.shape(x)}: choose one of "
                            f"{', '.join(fitting) or 'none (inputs must be (N, C, H, W), (N, C, L) or (N, F))'}")
    start, stop = (0, len(x)) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= start < stop <= len(x):
        raise InvalidOption(f"rows must be (start, stop) within 0..{len(x)}, got {rows!r}")
    mean, std = _channel_stats(x)
    ctx = _Context(seed=seed, mean=mean, scale=np.where(std > 0, std, np.float32(1.0)).astype(np.float32),
                   sample_shape=tuple(np.shape(x)[1:]))
    return _PerturbedRows(x, lambda b, s, a, z: chosen.apply(b, s, ctx, a, z), strength)[start:stop]


@runs_in_worker
def fgsm_curve(model, x, y, *, epsilons, batch_size: int = 256, slices=None, on_batch=None) -> RobustnessCurve:
    """The metric against the fast gradient sign method's step ε (Captum's `captum.robust.FGSM`, untargeted, the
    task's own loss against the labels), in the inputs' own units; marked `adversarial=True`."""
    import torch
    from captum.robust import FGSM

    from ..engines.inference import module_device
    from ..evaluation.tasks import task_of
    from ..guard import unwrap

    strengths = _strengths(epsilons, "epsilons", math.inf)
    batch_size = whole_number(batch_size, "batch_size", 1, "use 256, or less if memory is short")
    task = task_of(model)
    modality, labels, names, masks = _check_inputs(model, x, y, task, slices)
    module = unwrap(model)
    output_kind = getattr(model, "output_kind", "logits")
    targets = torch.as_tensor(np.asarray(labels, dtype=task.label_dtype))

    def loss(raw, target):  # per sample: Captum's FGSM sums it when it differentiates
        return task.loss_from_raw(raw.float(), target, output_kind)

    attack = FGSM(module, loss_func=loss)

    def perturb(batch, strength, start, stop):
        with torch.inference_mode(False), torch.enable_grad():
            inputs = torch.from_numpy(batch).to(module_device(module)).requires_grad_()
            adversarial = attack.perturb(inputs, float(strength), target=targets[start:stop].to(inputs.device))
        return adversarial.detach().cpu().numpy().astype(np.float32, copy=False)

    result = _curve(model, x, labels, task, strengths, perturb, batch_size=batch_size, slices=(names, masks),
                    on_batch=on_batch, grad=True)
    return RobustnessCurve(perturbation="fgsm", modality=modality, unit="the inputs' own units (the step ε)",
                           adversarial=True, seed=0, **result)
