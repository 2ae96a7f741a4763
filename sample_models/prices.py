"""`prices`: a regression. An MLP predicts flat prices (thousands) from area, rooms, age and distance to the centre.

The planted bug is a missing feature: flats in the harbour district (about 12%, a metadata column the model never
sees) sell for 60 more than their features say, since the redevelopment. The model cannot know which flats those
are, so it is systematically wrong there: it underpredicts the harbour flats by about 50 and overpredicts the others
a little. The error slices must name `district == "harbour"`; `harbour_premium` holds the planted amount (ground
truth: shown, never searched).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import SampleData

SUMMARY = "A regression of flat prices missing a feature: the harbour district is underpredicted by about 50."
TASK = "regression"
CLASS_NAMES = ()  # a regression has one output, its predicted value
INPUT_SHAPE = (4,)
FEATURES = ("area_m2", "rooms", "age_years", "distance_km")
DISTRICTS = ("centre", "north", "south", "harbour")
HARBOUR_SHARE = 0.12
HARBOUR_PREMIUM = 60.0
NOISE = 5.0


class Affine(nn.Module):
    """x * scale + shift with fixed statistics saved with the weights: inputs standardised by the training set's
    mean and std, the output turned back into prices."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))

    def forward(self, x):
        return x * self.scale + self.shift


def build_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        standardize=Affine(INPUT_SHAPE[0]),
        fc1=nn.Linear(INPUT_SHAPE[0], 32), relu1=nn.ReLU(),
        fc2=nn.Linear(32, 16), relu2=nn.ReLU(),
        fc3=nn.Linear(16, 1),
        to_price=Affine(1),
    ))


def true_price(x: np.ndarray, harbour: np.ndarray) -> np.ndarray:
    """The planted price before noise: linear in the features, plus the harbour premium."""
    area, rooms, age, distance = x.T.astype(np.float64)
    return 2.0 * area + 15.0 * rooms - 0.8 * age - 3.0 * distance + 80.0 + HARBOUR_PREMIUM * harbour


def load_data(split: str) -> SampleData:
    n, seed = (3000, 0) if split == "train" else (1500, 1)
    rng = np.random.default_rng(seed)
    area = rng.uniform(30, 160, n)
    rooms = np.clip(np.round(area / 30 + rng.normal(0, 0.7, n)), 1, 6)
    age = rng.uniform(0, 80, n)
    distance = rng.uniform(0.5, 25, n)
    x = np.column_stack([area, rooms, age, distance]).astype(np.float32)
    district = rng.choice(3, n)
    harbour = rng.random(n) < HARBOUR_SHARE
    district = np.where(harbour, 3, district)
    y = true_price(x, harbour) + rng.normal(0, NOISE, n)
    ids = np.arange(n) + (0 if split == "train" else 100_000)
    return SampleData(x=x, y=y.astype(np.float64), ids=ids, feature_names=FEATURES,
                      metadata={"district": np.asarray(DISTRICTS)[district],
                                "harbour_premium": np.where(harbour, HARBOUR_PREMIUM, 0.0)},
                      ground_truth=("harbour_premium",))


def train(out_dir) -> dict:
    from .training import fit

    train_data = load_data("train")

    def build_standardised() -> nn.Module:
        model = build_model()
        # statistics of the training split only, so the test split stays unseen
        mean, std = train_data.x.mean(0), train_data.x.std(0) + 1e-6
        model.standardize.scale.copy_(torch.as_tensor(1 / std))
        model.standardize.shift.copy_(torch.as_tensor(-mean / std))
        model.to_price.scale.fill_(float(train_data.y.std()))
        model.to_price.shift.fill_(float(train_data.y.mean()))
        return model

    return fit("prices", build_standardised, train_data, load_data("test"), out_dir=out_dir, epochs=60, lr=3e-3,
               batch_size=64, task=TASK)
