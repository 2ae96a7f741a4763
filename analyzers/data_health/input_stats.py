"""The inputs as the model receives them: per-channel statistics, a grid of samples per class, flags for inputs that
look unnormalised, and corrupted samples.

`input_stats(x, *, labels, class_names, reference)` reads the array the model is fed (after the run's
preprocessing), `STATS_BATCH` rows at a time, with float64 sums:
- `channels`: per channel (axis 1 of an (N, C, ...) image or sequence array; per feature of an (N, F) table) the
  mean, standard deviation, minimum and maximum over every value of that channel;
- `grid`: for each class (or "all" without labels) up to `per_class` rows drawn without replacement by
  `numpy.random.default_rng(seed)`, so the same run shows the same samples;
- `flags`: dataset-level warnings, each {code, channel, message}, and `rows` where the flag concerns a few rows:
  - "range-0-255": the values look like 8-bit pixels that were never divided by 255: every value of the inputs
    lies in [0, 255], the largest is above `UNIT_RANGE_LIMIT` (1.5) and `INTEGRAL_SHARE` (90%) of the values are
    whole numbers; or, for a few rows only, rows on that scale among rows in [0, 1]: their maximum above 1.5 and
    `SCALE_FACTOR` times the median row's (the message counts them);
  - "mean-far" / "std-far": given a `reference` (the training split's rows) or an `expected_mean` /
    `expected_std` per channel, a channel of the other rows (the corrupted ones left out of both) whose mean lies more than `MEAN_SHIFT` (0.5) expected
    standard deviations from the expected mean, or whose std is more than `STD_RATIO` (2) times larger or smaller:
    inputs not normalised as the model's training data were (or a shifted source);
- `corrupted`: rows of images (N, C, H, W) and sequences (N, C, L) that look broken, each with its reasons (a row
  may have several), where rows are compared with the rest of the same array:
  - "non-finite": a NaN or infinite value (tables too);
  - "constant": every value the same (a blank frame);
  - "out-of-scale": the row's range (max - min) is more than `SCALE_FACTOR` (25) times the median row's: the 0-255
    row among [0, 1] rows (about 250 times), or a decoding gone wrong;
  - "saturated": at least `SATURATED_SHARE` (60%) of the row's values sit at or beyond the inputs' ceiling (or
    floor): the 90th percentile of the rows' maxima (the 10th of their minima), the level at which most rows clip,
    which a few rows on another scale do not move: over- or under-exposed. An out-of-scale row is not also
    saturated;
  - "noise": the row's roughness, the mean absolute difference between neighbours along the last axis over
    1.128 (= 2 / sqrt(pi)) times its standard deviation, is above `NOISE_ROUGHNESS` (0.8). Independent noise gives
    about 1 whatever its distribution (Gaussian exactly 1; uniform 1.15), images of objects far less (the shapes
    samples 0.05 to 0.3): a buffer of random bytes decoded as an image.
  The saturated and noise rules also ask the row to stand out from the others of the same array: its share (or
  roughness) more than `ROBUST_Z` (8) robust standard deviations (1.4826 x MAD) above the rows' median. Without
  that, scikit-learn's 8x8 digits (coarse strokes on a black background: roughness up to 1.0, up to 75% of the
  pixels at 0, a thin "1" 5.7 robust deviations above the median share) had 79 of 450 rows flagged; with it, none,
  while drift's planted rows stand far out (roughness 1.02 against a median of 0.18; 88-99% of the values at 1
  against a median near 0). A noisy row must also fill the value range like the others (its standard deviation at
  least `NOISE_SPREAD` (half) the median row's): an empty scene, a flat background with sensor noise, is rough but
  faint. The noise rule reads images only:
  one-hot DNA letters are independent values by nature. A check whose rule more than half of the rows meet
  describes the data, not a corruption, and is dropped for that array; a constant row is reported as constant
  only.
The thresholds are round numbers with wide margins on the samples (see tests/test_data_health_inputs.py), not fitted.
Text (an object array) is refused: its inputs are token ids, whose statistics are not the model's view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError, whole_number

STATS_BATCH = 2048  # rows read at a time
UNIT_RANGE_LIMIT = 1.5  # a maximum above this, among inputs in [0, 255], is not a [0, 1] image
INTEGRAL_SHARE = 0.9  # whole-number share of the values at or above which [0, 255] inputs look like raw bytes
MEAN_SHIFT = 0.5  # expected standard deviations a channel's mean may move before it is flagged
STD_RATIO = 2.0  # how many times larger or smaller a channel's std may be before it is flagged
# a row's range over the median row's above which it is out of scale: a 0-255 row among [0, 1] ones is about 250
# times the range, one among normalised rows about 50; the multispectral sample's real near-infrared tail reaches 10
SCALE_FACTOR = 25.0
SATURATED_SHARE = 0.6  # share of a row's values at the inputs' ceiling (or floor) at which it is saturated
ROBUST_Z = 8.0  # a saturated or noisy row must also stand this many robust standard deviations above the others
EXTREME_PERCENTILE = 10  # the ceiling: the 90th percentile of the rows' maxima (the floor: the 10th of the minima)
NOISE_ROUGHNESS = 0.8  # roughness above which a row looks like independent noise
NOISE_SPREAD = 0.5  # ... when its standard deviation is at least this share of the median row's
MEAN_ABS_DIFF = 2 / np.sqrt(np.pi)  # E|a - b| / sd for independent Gaussian a, b: sqrt(2) * sqrt(2 / pi)
REASONS = ("non-finite", "constant", "out-of-scale", "saturated", "noise")
DEFAULT_PER_CLASS = 8


@dataclass(frozen=True)
class InputStats:
    """Per-channel statistics, the sample grid, flags and corrupted rows of one input array."""

    shape: tuple  # the array's shape
    channels: object  # pandas DataFrame: channel, mean, std, min, max
    grid: dict  # class name (or "all") -> row indices
    flags: list  # [{code, channel, message, and rows for a flag about a few rows}]
    corrupted: object  # pandas DataFrame: row, reason (one row per row and reason)
    per_row: object  # pandas DataFrame, one row per input row: min, max, std, range, roughness
    expected: dict  # {"mean": [...], "std": [...], "source": ...} or {}

    def to_json(self) -> dict:
        return {"shape": [int(s) for s in self.shape],
                "channels": [{k: (int(v) if k == "channel" else float(v)) for k, v in row.items()}
                             for row in self.channels.to_dict("records")],
                "grid": {str(k): [int(r) for r in v] for k, v in self.grid.items()},
                "flags": [dict(f) for f in self.flags],
                "corrupted": [{"row": int(r), "reason": str(reason)} for r, reason in
                              zip(self.corrupted["row"], self.corrupted["reason"])],
                "expected": {k: (list(map(float, v)) if k in ("mean", "std") else v)
                             for k, v in self.expected.items()},
                "thresholds": {"unit_range_limit": UNIT_RANGE_LIMIT, "integral_share": INTEGRAL_SHARE,
                               "mean_shift": MEAN_SHIFT, "std_ratio": STD_RATIO, "scale_factor": SCALE_FACTOR,
                               "saturated_share": SATURATED_SHARE, "noise_roughness": NOISE_ROUGHNESS}}


def _array(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind in "USO":
        raise AnalyzerError("input statistics need numeric inputs; text is read as token ids, whose statistics say "
                            "nothing about the model's view")
    if arr.ndim < 2 or not len(arr):
        raise AnalyzerError(f"input statistics need an (N, C, ...) or (N, F) array, got shape {arr.shape}")
    return arr


class _ChannelSums:
    """Running float64 sums per channel of values, squares, minima and maxima; `add(chunk, -1)` takes rows back
    out of the counts and sums (not of the extremes, which the normalisation flags do not read)."""

    def __init__(self, channels: int):
        self.count = np.zeros(channels)
        self.total = np.zeros(channels)
        self.squares = np.zeros(channels)
        self.low = np.full(channels, np.inf)
        self.high = np.full(channels, -np.inf)

    def add(self, chunk: np.ndarray, sign: int = 1) -> None:
        if not len(chunk):
            return
        values = np.moveaxis(chunk, 1, 0).reshape(chunk.shape[1], -1)
        if np.isfinite(values).all():  # the usual chunk: no masks, and float64 only where the sums need it
            self.count += sign * values.shape[1]
            self.total += sign * values.sum(1, dtype=np.float64)
            wide = values.astype(np.float64)
            self.squares += sign * np.einsum("ij,ij->i", wide, wide)
            if sign > 0:
                self.low = np.minimum(self.low, values.min(1))
                self.high = np.maximum(self.high, values.max(1))
            return
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        values = np.where(finite, values, 0.0)
        self.count += sign * finite.sum(1)
        self.total += sign * values.sum(1)
        self.squares += sign * (values * values).sum(1)
        if sign < 0:
            return
        self.low = np.minimum(self.low, np.where(finite, values, np.inf).min(1))
        self.high = np.maximum(self.high, np.where(finite, values, -np.inf).max(1))

    def add_sums(self, row_sums: np.ndarray, row_squares: np.ndarray, per_row: int, chunk=None) -> None:
        """Rows already summed per channel (float64, (rows, channels) each, `per_row` finite values per row and
        channel), and, from `chunk` (those rows), the channels' extremes: what `add` adds, without a second copy of
        the rows."""
        self.count += len(row_sums) * per_row
        self.total += row_sums.sum(0)
        self.squares += row_squares.sum(0)
        if chunk is not None and len(chunk):
            axes = (0, *range(2, chunk.ndim))
            self.low = np.minimum(self.low, chunk.min(axis=axes))
            self.high = np.maximum(self.high, chunk.max(axis=axes))

    def table(self):
        import pandas as pd

        count = np.maximum(self.count, 1)
        mean = self.total / count
        std = np.sqrt(np.maximum(self.squares / count - mean * mean, 0.0))
        return pd.DataFrame({"channel": np.arange(len(mean)), "mean": mean, "std": std, "min": self.low,
                             "max": self.high})


def _grid(labels, class_names, n: int, per_class: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if labels is None:
        return {"all": np.sort(rng.choice(n, min(per_class, n), replace=False)).tolist()}
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise AnalyzerError(f"labels must hold one class per row ({n}), got shape {labels.shape}")
    grid = {}
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        name = class_names[int(value)] if class_names is not None and 0 <= int(value) < len(class_names) \
            else str(value)
        grid[str(name)] = np.sort(rng.choice(rows, min(per_class, len(rows)), replace=False)).tolist()
    return grid


def far_above(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Rows whose value lies more than ROBUST_Z robust standard deviations (1.4826 x the median absolute
    deviation) above the median of the rows `among`: unusual for this array, not just past a fixed level."""
    typical = values[among]
    if not len(typical):
        return np.zeros(len(values), dtype=bool)
    median = float(np.median(typical))
    spread = 1.4826 * float(np.median(np.abs(typical - median)))
    return values > median + ROBUST_Z * spread


def _normalisation_flags(table, expected_mean, expected_std, source: str) -> list:
    flags = []
    mean, std = np.asarray(expected_mean, dtype=np.float64), np.asarray(expected_std, dtype=np.float64)
    if mean.shape != (len(table),) or std.shape != (len(table),):
        raise AnalyzerError(f"expected_mean and expected_std need one value per channel ({len(table)})")
    for c, row in table.iterrows():
        scale = std[c] if std[c] > 0 else 1.0
        moved = abs(row["mean"] - mean[c]) / scale
        if moved > MEAN_SHIFT:
            flags.append({"code": "mean-far", "channel": int(c),
                          "message": f"channel {c}: mean {row['mean']:.3g} against {mean[c]:.3g} {source}, "
                                     f"{moved:.1f} standard deviations away: normalised differently, or a shifted "
                                     f"source"})
        if std[c] > 0 and (row["std"] > STD_RATIO * std[c] or row["std"] < std[c] / STD_RATIO):
            flags.append({"code": "std-far", "channel": int(c),
                          "message": f"channel {c}: standard deviation {row['std']:.3g} against {std[c]:.3g} "
                                     f"{source} ({row['std'] / std[c]:.2g} times): scaled differently"})
    return flags


def input_stats(x, *, labels=None, class_names=None, reference=None, expected_mean=None, expected_std=None,
                per_class: int = DEFAULT_PER_CLASS, seed: int = 0, batch_size: int = STATS_BATCH) -> InputStats:
    """Statistics, grid, flags and corrupted rows of the inputs `x`; see the module's docstring. `reference` (N
    booleans) marks the rows the model was trained on: their channel means and stds are the expected ones for the
    other rows (an explicit `expected_mean` / `expected_std` wins)."""
    import pandas as pd

    arr = _array(x)
    n = len(arr)
    per_class = whole_number(per_class, "per_class", 1)
    batch_size = whole_number(batch_size, "batch_size", 1)
    if reference is not None:
        reference = np.asarray(reference)
        if reference.shape != (n,) or reference.dtype != bool:
            raise AnalyzerError(f"reference must be a boolean array of one value per row ({n})")
        if reference.all() or not reference.any():
            reference = None
    channel_count = arr.shape[1]
    sums, others, ref_sums = _ChannelSums(channel_count), _ChannelSums(channel_count), _ChannelSums(channel_count)
    spatial = arr.ndim >= 3
    lows, highs, stds, rough = (np.empty(n) for _ in range(4))
    finite = np.empty(n, dtype=bool)
    integral, total_values = 0, 0
    # the finite chunks' whole numbers are counted only where the 0-255 check reads them: most inputs are not in
    # [0, 255] above 1.5 (a round and a comparison of every value, per chunk)
    finite_chunks = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(arr[start:start + batch_size])
        span = slice(start, start + len(chunk))
        flat = chunk.reshape(len(chunk), -1)
        inside = reference[span] if reference is not None else None
        if np.isfinite(flat).all():  # the usual chunk: each statistic in one pass, float64 where it sums
            finite[span] = True
            lows[span], highs[span] = flat.min(1), flat.max(1)
            # one float64 copy of the rows serves the channels' sums (per row and channel, then added up) and the
            # rows' spread: a second copy per channel took a fifth of the stage's input statistics
            wide = flat.astype(np.float64)
            per_channel = wide.reshape(len(chunk), channel_count, -1)
            row_sums, row_squares = per_channel.sum(2), np.einsum("bcp,bcp->bc", per_channel, per_channel)
            sums.add_sums(row_sums, row_squares, per_channel.shape[2], chunk)
            if inside is not None:
                ref_sums.add_sums(row_sums[inside], row_squares[inside], per_channel.shape[2])
                others.add_sums(row_sums[~inside], row_squares[~inside], per_channel.shape[2])
            elif expected_mean is not None:
                others.add_sums(row_sums, row_squares, per_channel.shape[2])
            wide -= (row_sums.sum(1) / flat.shape[1])[:, None]  # centred in place: two passes, as numpy's std
            stds[span] = np.sqrt(np.einsum("ij,ij->i", wide, wide) / flat.shape[1])
            del wide, per_channel
            if spatial:
                steps = np.diff(chunk, axis=-1)
                np.abs(steps, out=steps)
                with np.errstate(divide="ignore", invalid="ignore"):
                    rough[span] = steps.reshape(len(chunk), -1).mean(1, dtype=np.float64) / (MEAN_ABS_DIFF *
                                                                                           stds[span])
            total_values += int(flat.size)
            finite_chunks.append(start)
            continue
        sums.add(chunk)
        if inside is not None:
            ref_sums.add(chunk[inside])
            others.add(chunk[~inside])
        elif expected_mean is not None:
            others.add(chunk)
        rows = flat.astype(np.float64)
        ok = np.isfinite(rows)
        finite[span] = ok.all(1)
        clean = np.where(ok, rows, np.nan)
        lows[span] = np.nanmin(np.where(ok.any(1, keepdims=True), clean, 0.0), axis=1)
        highs[span] = np.nanmax(np.where(ok.any(1, keepdims=True), clean, 0.0), axis=1)
        stds[span] = np.nanstd(np.where(ok.any(1, keepdims=True), clean, 0.0), axis=1)
        if spatial:
            steps = np.abs(np.diff(np.where(np.isfinite(chunk), chunk, 0.0).astype(np.float64), axis=-1))
            mean_step = steps.reshape(len(chunk), -1).mean(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rough[span] = mean_step / (MEAN_ABS_DIFF * stds[span])
        integral += int((ok & (rows == np.round(rows))).sum())
        total_values += int(ok.sum())
    channels = sums.table()
    low, high = float(np.nanmin(lows)), float(np.nanmax(highs))
    ranges = highs - lows

    flags, reasons = [], {r: np.zeros(n, dtype=bool) for r in REASONS}
    reasons["non-finite"] = ~finite
    if spatial:
        constant = finite & (ranges == 0)
        reasons["constant"] = constant
        median_range = float(np.median(ranges[finite]))
        reasons["out-of-scale"] = finite & (ranges > SCALE_FACTOR * median_range) if median_range > 0 else \
            np.zeros(n, dtype=bool)
        # the ceiling and floor most rows reach, not the overall extremes: a few rows on a 0-255 scale must not hide
        # the over-exposed [0, 1] rows (nor the median maximum, below the clipping level for half the rows)
        top = float(np.percentile(highs[finite], 100 - EXTREME_PERCENTILE))
        bottom = float(np.percentile(lows[finite], EXTREME_PERCENTILE))
        if top > bottom:
            at_high, at_low = np.zeros(n), np.zeros(n)
            for start in range(0, n, batch_size):
                rows = np.asarray(arr[start:start + batch_size]).reshape(-1, int(np.prod(arr.shape[1:])))
                at_high[start:start + len(rows)] = (rows >= top).mean(1)
                at_low[start:start + len(rows)] = (rows <= bottom).mean(1)
            usual = finite & ~constant
            reasons["saturated"] = usual & ~reasons["out-of-scale"] & (
                ((at_high >= SATURATED_SHARE) & far_above(at_high, usual))
                | ((at_low >= SATURATED_SHARE) & far_above(at_low, usual)))
        if arr.ndim == 4:  # images only: a sequence of one-hot letters is independent values by nature
            roughness = np.nan_to_num(rough, nan=0.0)
            usual = finite & ~constant
            spread = float(np.median(stds[usual])) if usual.any() else 0.0
            reasons["noise"] = usual & (roughness > NOISE_ROUGHNESS) & far_above(roughness, usual) & (
                stds >= NOISE_SPREAD * spread)
        for name in ("constant", "out-of-scale", "saturated", "noise"):
            if reasons[name].sum() > n / 2:  # the data's nature, not a corruption
                reasons[name][:] = False
        if 0 <= low and high <= 255:
            if high > UNIT_RANGE_LIMIT:
                for start in finite_chunks:
                    flat = np.asarray(arr[start:start + batch_size]).reshape(-1)
                    integral += int(np.count_nonzero(flat == np.round(flat)))
            if high > UNIT_RANGE_LIMIT and total_values and integral / total_values >= INTEGRAL_SHARE:
                flags.append({"code": "range-0-255", "channel": None,
                              "message": f"the inputs range over [{low:.3g}, {high:.3g}] in whole numbers: 8-bit "
                                         "pixels never divided by 255; scale them to [0, 1] (and normalise) as "
                                         "the model's training did"})
            else:
                typical_high = float(np.median(highs[finite]))
                big = finite & (highs > UNIT_RANGE_LIMIT) & (highs > SCALE_FACTOR * typical_high)
                if big.any() and typical_high <= UNIT_RANGE_LIMIT:
                    flags.append({"code": "range-0-255", "channel": None, "rows": np.flatnonzero(big).tolist(),
                                  "message": f"{int(big.sum())} inputs reach values up to {highs[big].max():.3g} "
                                             f"while the typical one stays within [0, {np.median(highs[finite]):.2g}]"
                                             ": on a 0-255 scale, never divided by 255"})
    corrupt = np.zeros(n, dtype=bool)
    for name in REASONS:
        corrupt |= reasons[name]
    if corrupt.any():  # the normalisation flags read the rows that are not corrupted
        for row in np.flatnonzero(corrupt):
            (ref_sums if reference is not None and reference[row] else others).add(np.asarray(arr[row:row + 1]), -1)
    if expected_mean is not None or expected_std is not None:
        if expected_mean is None or expected_std is None:
            raise AnalyzerError("give both expected_mean and expected_std, or neither")
        expected = {"mean": list(np.asarray(expected_mean, dtype=float)),
                    "std": list(np.asarray(expected_std, dtype=float)), "source": "given"}
        flags += _normalisation_flags(others.table(), expected["mean"], expected["std"], "expected")
    elif reference is not None:
        ref = ref_sums.table()
        expected = {"mean": ref["mean"].tolist(), "std": ref["std"].tolist(), "source": "reference rows"}
        flags += _normalisation_flags(others.table(), expected["mean"], expected["std"], "on the training rows")
    else:
        expected = {}
    corrupted = [(int(r), name) for name in REASONS for r in np.flatnonzero(reasons[name])
                 if name == "constant" or not reasons["constant"][r]]
    corrupted.sort()
    per_row = pd.DataFrame({"min": lows, "max": highs, "std": stds, "range": ranges,
                            "roughness": rough if spatial else np.full(n, np.nan)})
    return InputStats(shape=tuple(arr.shape), channels=channels,
                      grid=_grid(labels, class_names, n, per_class, seed), flags=flags,
                      corrupted=pd.DataFrame(corrupted, columns=["row", "reason"]).astype({"row": np.int64}),
                      per_row=per_row, expected=expected)
