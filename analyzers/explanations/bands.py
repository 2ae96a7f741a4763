"""Each band's share of an attribution map: which input channels (a multispectral image's bands, an RGB image's
colours, a sequence's letters) the map says the prediction rests on. Pure computation on maps already made."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AnalyzerError


@dataclass(frozen=True)
class BandShares:
    """`per_sample` (N, C): each band's share of the sample's total |attribution| (a row sums to 1; NaN for a map
    that is zero everywhere, which says nothing); `mean` (C,): the shares averaged over the samples with a map, each
    sample weighing the same; `names`: the bands' names, in channel order, or None."""

    per_sample: np.ndarray
    mean: np.ndarray
    names: tuple | None = None

    def labels(self) -> tuple:
        """The bands' names, or `band 1`, `band 2`, ... when none were given."""
        return self.names if self.names is not None else tuple(f"band {c + 1}" for c in range(len(self.mean)))

    def ranked(self) -> list:
        """(name, mean share) pairs, the largest share first."""
        order = np.argsort(-np.nan_to_num(self.mean, nan=-1.0), kind="stable")
        return [(self.labels()[c], float(self.mean[c])) for c in order]

    def largest(self) -> str:
        """The name of the band with the largest mean share."""
        return self.ranked()[0][0]

    def as_dict(self) -> dict:
        """{name: mean share}, in channel order."""
        return {name: float(share) for name, share in zip(self.labels(), self.mean)}


def band_shares(attributions, names=None) -> BandShares:
    """Each band's share of the total |attribution|, per sample and on average.

    `attributions`: maps (N, C, ...) with the input's shape (images N x C x H x W, sequences N x C x L), as
    `attributions.explain` returns them; one map `m` (C, H, W) is `band_shares(m[None])`.
    `names`: one name per band (C of them), or None. Signs do not cancel: a band pushing the score down matters as
    much as one pushing it up."""
    values = np.asarray(attributions)
    if values.dtype.kind not in "fiu" or values.ndim < 3:
        raise AnalyzerError(f"band shares need numeric maps shaped (N, C, ...) with the bands on axis 1, got an "
                            f"array of shape {values.shape} and dtype {values.dtype}")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise AnalyzerError(f"band shares need at least one map of at least one band, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise AnalyzerError("band shares need finite attributions: the maps hold NaN or infinite values")
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != values.shape[1]:
            raise AnalyzerError(f"{len(names)} band names given for maps of {values.shape[1]} bands: give one name "
                                f"per band, in channel order")
    per_band = np.abs(values.astype(np.float64)).reshape(values.shape[0], values.shape[1], -1).sum(axis=2)
    total = per_band.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample = np.where(total > 0, per_band / np.where(total > 0, total, 1.0), np.nan)
    informative = ~np.isnan(per_sample[:, 0])
    mean = per_sample[informative].mean(axis=0) if informative.any() else np.full(values.shape[1], np.nan)
    return BandShares(per_sample=per_sample, mean=mean, names=names)
