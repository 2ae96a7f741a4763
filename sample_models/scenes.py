"""`scenes`: multi-label. A small CNN says which of four shapes (circle, square, triangle, cross) a generated 32x32
colour image holds; each image holds any of them, each in its own quadrant, each present with probability
`PRESENT_RATE` (no download).

The planted bug is in the training labels: the labelling tool's merge step dropped *both* the circle and the
triangle label from every training image that holds both (`DROPPED_PAIR`). The model learns what it was shown, a
circle or a triangle only without the other, so on the correctly labelled test split it misses both of them together
wherever they meet. The co-missed view must put (circle, triangle) at the top; each label alone is otherwise
learnt well.

Ground truth shipped: metadata `num_shapes`, `pair_dropped_in_training` (the image holds both labels of the pair
the tool dropped), and `extras["mask"]`, the (N, 4, 32, 32) boolean masks of each label's pixels (empty when the
shape is absent).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from . import SampleData, shapes

SUMMARY = "Multi-label shapes whose training labels dropped circle and triangle together: both missed where they meet."
TASK = "multilabel"
CLASS_NAMES = ("circle", "square", "triangle", "cross")  # one yes/no label each; the first three are shapes'
DROPPED_PAIR = ("circle", "triangle")
IMAGE_SIZE = 32
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
PRESENT_RATE = 0.45
RADIUS_RANGE = (4.0, 6.5)
NOISE_STD = 0.03
SPLIT_SIZES = {"train": 4000, "test": 1200}
SPLIT_SEEDS = {"train": 31, "test": 32}


def build_model() -> nn.Module:
    # shapes' network with one logit per label: max-pooled shape detectors, then a linear layer per label, and
    # "circle and not triangle", which the training labels teach, is linear in such detectors
    return shapes.conv_net(len(CLASS_NAMES))


def shape_mask(kind: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (32, 32) mask of one shape centred at (cx, cy) in pixel coordinates: shapes' circle, square and
    triangle (the same indices), or a plus sign."""
    if kind < len(shapes.CLASS_NAMES):
        return shapes.shape_mask(kind, cx, cy, radius)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    arm = radius / 3
    return ((dx <= arm) & (dy <= radius)) | ((dy <= arm) & (dx <= radius))


def _generate(n: int, seed: int):
    rng = np.random.default_rng(seed)
    k = len(CLASS_NAMES)
    present = rng.random((n, k)) < PRESENT_RATE
    images = np.empty((n, *INPUT_SHAPE), dtype=np.float32)
    masks = np.zeros((n, k, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    half = IMAGE_SIZE // 2
    for i in range(n):
        background = rng.uniform(0.0, 0.35, 3)
        image = np.broadcast_to(background[:, None, None], INPUT_SHAPE).copy()
        quadrants = rng.permutation(4)  # each present shape in its own quadrant, so shapes never overlap
        for kind in np.flatnonzero(present[i]):
            radius = rng.uniform(*RADIUS_RANGE)
            qx, qy = divmod(int(quadrants[kind]), 2)
            cx = qx * half + rng.uniform(radius, half - radius)
            cy = qy * half + rng.uniform(radius, half - radius)
            masks[i, kind] = shape_mask(int(kind), cx, cy, radius)
            colour = rng.uniform(0.55, 1.0, 3)  # brighter than any background
            image = np.where(masks[i, kind], colour[:, None, None], image)
        images[i] = np.clip(image + rng.normal(0, NOISE_STD, image.shape), 0, 1)
    return images, present.astype(np.int64), masks


def load_data(split: str) -> SampleData:
    images, labels, masks = _generate(SPLIT_SIZES[split], SPLIT_SEEDS[split])
    a, b = (CLASS_NAMES.index(name) for name in DROPPED_PAIR)
    pair = (labels[:, a] == 1) & (labels[:, b] == 1)
    y = labels.copy()
    if split == "train":  # the labelling tool's bug: both labels of the pair dropped where both are present
        y[pair, a] = 0
        y[pair, b] = 0
    offset = 0 if split == "train" else SPLIT_SIZES["train"]  # ids unique across both splits
    return SampleData(x=images, y=y, ids=np.arange(len(y)) + offset,
                      metadata={"num_shapes": labels.sum(axis=1), "pair_dropped_in_training": pair},
                      extras={"mask": masks}, ground_truth=("pair_dropped_in_training",))


def train(out_dir) -> dict:
    from .training import fit

    return fit("scenes", build_model, load_data("train"), load_data("test"), out_dir=out_dir, epochs=15, lr=3e-3,
               batch_size=32, task=TASK)
