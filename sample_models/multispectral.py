"""`multispectral`: a small CNN on generated 6-band 24x24 satellite-like tiles (blue, green, red, red edge,
near-infrared, short-wave infrared) of three land covers: water, bare ground and vegetation (no download).

The class depends on one band's relation to another, and on nothing else: the tile's mean vegetation index
NDVI = (nir - red) / (nir + red) is below `NDVI_THRESHOLDS[0]` for water, above `NDVI_THRESHOLDS[1]` for vegetation,
bare ground between. Each tile draws its NDVI level uniformly over `NDVI_RANGE` (so some tiles lie close to a
threshold: there the model errs), its red reflectance independently of the class, and its near-infrared band from
the two (nir = red * (1 + ndvi) / (1 - ndvi), pixel by pixel over a textured NDVI field). Red alone says nothing
about the class; near-infrared, read against red, says everything. The other four bands are distractors: smooth
textures and sensor noise drawn independently of the class, except short-wave infrared, which is a little darker over
water (`SWIR_WATER_SHIFT`, a weak cue, as real water absorbs SWIR).

Ground truth shipped: metadata `ndvi` (the tile's mean NDVI, before sensor noise, which decides its class) and
`ndvi_margin` (its distance to the nearest class threshold); `PLANTED_BAND` is the band whose attributions must
carry the largest share of a faithful map (`analyzers.explanations.bands.band_shares`), `PARTNER_BAND` the one it is
read against.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from . import SampleData

SUMMARY = "6-band satellite tiles whose class is near-infrared read against red: do the maps find that band?"
CLASS_NAMES = ("water", "bare", "vegetation")
BAND_NAMES = ("blue", "green", "red", "red_edge", "nir", "swir")
PLANTED_BAND = "nir"
PARTNER_BAND = "red"
IMAGE_SIZE = 24
INPUT_SHAPE = (len(BAND_NAMES), IMAGE_SIZE, IMAGE_SIZE)
NDVI_RANGE = (-0.35, 0.75)
NDVI_THRESHOLDS = (0.0, 0.35)  # water below the first, vegetation above the second
NDVI_TEXTURE = 0.08  # spatial spread of NDVI within a tile
RED_RANGE = (0.06, 0.20)  # the tile's red reflectance, drawn independently of the class
DISTRACTOR_RANGE = (0.05, 0.40)  # each distractor band's tile level
SWIR_WATER_SHIFT = 0.04  # how much darker SWIR is over water: weak beside the levels' spread of 0.35
TEXTURE = 0.15  # relative spatial texture of every band's reflectance
NOISE_STD = 0.01  # sensor noise
SPLIT_SIZES = {"train": 2400, "test": 800}
SPLIT_SEEDS = {"train": 41, "test": 42}
EPOCHS = 12


def build_model() -> nn.Module:
    # Average pooling at the end: the evidence (a band ratio) is everywhere in the tile, not in one place.
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(len(BAND_NAMES), 16, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(32, 32, 3, padding=1), relu3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(32, len(CLASS_NAMES)),
    ))


def ndvi(x: np.ndarray) -> np.ndarray:
    """Per-pixel NDVI of tiles (N, 6, H, W) or one tile (6, H, W), from their nir and red bands."""
    x = np.asarray(x, dtype=np.float64)
    nir, red = x[..., BAND_NAMES.index("nir"), :, :], x[..., BAND_NAMES.index("red"), :, :]
    return (nir - red) / np.maximum(nir + red, 1e-6)


def classify_ndvi(values: np.ndarray) -> np.ndarray:
    """The class index of each mean NDVI: the planted rule."""
    return np.digitize(np.asarray(values), NDVI_THRESHOLDS).astype(np.int64)


def _upsampling(coarse: int, fine: int) -> np.ndarray:
    """The (fine, coarse) matrix of bilinear interpolation between cell centres (edges held)."""
    position = np.clip((np.arange(fine) + 0.5) * coarse / fine - 0.5, 0, coarse - 1)
    low = np.minimum(np.floor(position).astype(int), coarse - 2)
    weight = position - low
    matrix = np.zeros((fine, coarse))
    matrix[np.arange(fine), low] = 1 - weight
    matrix[np.arange(fine), low + 1] = weight
    return matrix


def _texture(rng: np.random.Generator, n: int, bands: int) -> np.ndarray:
    """Smooth zero-mean fields (n, bands, 24, 24) of unit spread: 6x6 noise, upsampled bilinearly."""
    up = _upsampling(6, IMAGE_SIZE)
    fine = up @ rng.normal(0, 1, (n, bands, 6, 6)) @ up.T
    fine -= fine.mean(axis=(2, 3), keepdims=True)
    return fine / (fine.std(axis=(2, 3), keepdims=True) + 1e-9)


def _generate(n: int, seed: int):
    rng = np.random.default_rng(seed)
    level = rng.uniform(*NDVI_RANGE, n)
    field = np.clip(level[:, None, None] + NDVI_TEXTURE * _texture(rng, n, 1)[:, 0], -0.9, 0.9)
    mean_ndvi = field.mean(axis=(1, 2))
    labels = classify_ndvi(mean_ndvi)
    texture = _texture(rng, n, len(BAND_NAMES))
    red = rng.uniform(*RED_RANGE, n)[:, None, None] * (1 + TEXTURE * texture[:, BAND_NAMES.index("red")])
    bands = {"red": red, "nir": red * (1 + field) / (1 - field)}  # so that (nir - red) / (nir + red) = field
    for name in BAND_NAMES:
        if name in bands:
            continue
        tile = rng.uniform(*DISTRACTOR_RANGE, n)
        if name == "swir":
            tile = tile - SWIR_WATER_SHIFT * (labels == CLASS_NAMES.index("water"))
        bands[name] = tile[:, None, None] * (1 + TEXTURE * texture[:, BAND_NAMES.index(name)])
    x = np.stack([bands[name] for name in BAND_NAMES], axis=1)
    x = np.clip(x + rng.normal(0, NOISE_STD, x.shape), 0, None).astype(np.float32)
    margin = np.min(np.abs(mean_ndvi[:, None] - np.asarray(NDVI_THRESHOLDS)[None]), axis=1)
    return x, labels, mean_ndvi.astype(np.float32), margin.astype(np.float32)


def load_data(split: str) -> SampleData:
    x, labels, mean_ndvi, margin = _generate(SPLIT_SIZES[split], SPLIT_SEEDS[split])
    offset = 0 if split == "train" else SPLIT_SIZES["train"]  # ids unique across both splits
    return SampleData(x=x, y=labels, ids=np.arange(len(labels)) + offset,
                      metadata={"ndvi": mean_ndvi, "ndvi_margin": margin},
                      feature_names=BAND_NAMES,  # the bands' names, in channel order: the dashboard shows them
                      ground_truth=("ndvi", "ndvi_margin"))


def train(out_dir) -> dict:
    from .training import fit

    # One thread: the same numbers on any machine, and on tiles this small faster than two busy cores (measured:
    # 17 ms a step against 160 ms with two threads beside other work).
    return fit("multispectral", build_model, load_data("train"), load_data("test"), out_dir=out_dir,
               epochs=EPOCHS, lr=3e-3, batch_size=32, threads=1)
