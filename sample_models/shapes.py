"""`shapes`: a small CNN on generated 32x32 colour images of circles, squares and triangles (no download).

The training set carries a spurious cue: the background colour goes with the class (circle on red, square on green,
triangle on blue) in `TRAIN_CUE_RATE` of the images. In the test set only `TEST_CUE_RATE` follow it, so the model's
errors gather where the background disagrees with the shape (e.g. `label == "circle" and background == "green"`).

Ground truth shipped: metadata `background` (colour name), `size` (shape width / image width), `cue_consistent`,
and `extras["mask"]`, the (N, 32, 32) boolean mask of the shape's pixels, for checking saliency maps.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from . import SampleData

SUMMARY = "Shapes whose training backgrounds give the class away: errors gather where background and shape disagree."
CLASS_NAMES = ("circle", "square", "triangle")
BACKGROUNDS = ("red", "green", "blue")  # the cue colour of each class, in CLASS_NAMES order
BACKGROUND_RGB = np.array([[0.80, 0.15, 0.15], [0.15, 0.70, 0.20], [0.15, 0.25, 0.80]], dtype=np.float32)
IMAGE_SIZE = 32
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
TRAIN_CUE_RATE = 0.9
TEST_CUE_RATE = 0.5
RADIUS_RANGE = (6.0, 12.0)  # half-width of the shape in pixels
NOISE_STD = 0.03
SPLIT_SIZES = {"train": 3000, "test": 1000}
SPLIT_SEEDS = {"train": 21, "test": 22}


def conv_net(num_outputs: int) -> nn.Module:
    """Three conv blocks, global max pooling and one linear layer (also the `scenes` sample's network)."""
    # Global max pooling lets a few local shape features (corners, an apex) decide; with average pooling the
    # background colour, present at every position, won outright and the model never learnt the shapes.
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(8, 16, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(16, 32, 3, padding=1), relu3=nn.ReLU(),
        pool=nn.AdaptiveMaxPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(32, num_outputs),
    ))


def build_model() -> nn.Module:
    return conv_net(len(CLASS_NAMES))


def shape_mask(kind: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (32, 32) mask of one shape centred at (cx, cy) in pixel coordinates."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if CLASS_NAMES[kind] == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if CLASS_NAMES[kind] == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    # Upright triangle: apex at the top, base of width 2*radius at the bottom.
    return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)


def _generate(n: int, seed: int, cue_rate: float):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), n)
    cue = rng.random(n) < cue_rate
    # A background that breaks the cue is one of the other classes' colours, chosen at random.
    backgrounds = np.where(cue, labels, (labels + rng.integers(1, len(BACKGROUNDS), n)) % len(BACKGROUNDS))
    images = np.empty((n, *INPUT_SHAPE), dtype=np.float32)
    masks = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    radii = rng.uniform(*RADIUS_RANGE, n)
    for i in range(n):
        radius = radii[i]
        cx, cy = rng.uniform(radius, IMAGE_SIZE - radius, 2)
        masks[i] = shape_mask(int(labels[i]), cx, cy, radius)
        background = np.clip(BACKGROUND_RGB[backgrounds[i]] + rng.uniform(-0.1, 0.1, 3), 0, 1)
        while True:  # a shape colour that stands out from the background, independent of the class
            colour = rng.uniform(0, 1, 3)
            if np.linalg.norm(colour - background) >= 0.5:
                break
        image = np.where(masks[i], colour[:, None, None], background[:, None, None])
        images[i] = np.clip(image + rng.normal(0, NOISE_STD, image.shape), 0, 1)
    return images, labels, backgrounds, 2 * radii / IMAGE_SIZE, cue, masks


def load_data(split: str) -> SampleData:
    cue_rate = TRAIN_CUE_RATE if split == "train" else TEST_CUE_RATE
    images, labels, backgrounds, sizes, cue, masks = _generate(SPLIT_SIZES[split], SPLIT_SEEDS[split], cue_rate)
    offset = 0 if split == "train" else SPLIT_SIZES["train"]  # ids unique across both splits
    return SampleData(
        x=images, y=labels.astype(np.int64), ids=np.arange(len(labels)) + offset,
        metadata={"background": np.array(BACKGROUNDS)[backgrounds], "size": sizes.astype(np.float32),
                  "cue_consistent": cue},
        extras={"mask": masks}, ground_truth=("cue_consistent",))


def train(out_dir) -> dict:
    from .training import fit

    return fit("shapes", build_model, load_data("train"), load_data("test"), out_dir=out_dir, epochs=20, lr=3e-3,
               batch_size=32)
