"""`tabular`: an MLP on scikit-learn's bundled breast-cancer data (30 named features, no download).

The model standardises its raw inputs itself (train-set mean and std stored as buffers), so it takes feature values
as they are in the data and attributions refer to the real features.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import SampleData

SUMMARY = "Breast-cancer measurements (30 named features) and an MLP; nothing planted: real data, real errors."
CLASS_NAMES = ("malignant", "benign")  # scikit-learn's target 0 = malignant, 1 = benign
INPUT_SHAPE = (30,)


class Standardize(nn.Module):
    """(x - mean) / std with the training set's statistics, saved with the weights."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, x):
        return (x - self.mean) / self.std


def build_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        standardize=Standardize(INPUT_SHAPE[0]),
        fc1=nn.Linear(INPUT_SHAPE[0], 32), relu1=nn.ReLU(),
        dropout=nn.Dropout(0.2),
        fc2=nn.Linear(32, 16), relu2=nn.ReLU(),
        fc3=nn.Linear(16, len(CLASS_NAMES)),
    ))


def load_data(split: str) -> SampleData:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float32)
    ids = np.arange(len(x))
    x_tr, x_te, y_tr, y_te, id_tr, id_te = train_test_split(x, bunch.target, ids, test_size=0.3, random_state=0,
                                                            stratify=bunch.target)
    x, y, ids = (x_tr, y_tr, id_tr) if split == "train" else (x_te, y_te, id_te)
    return SampleData(x=x, y=y.astype(np.int64), ids=ids,
                      feature_names=tuple(str(name) for name in bunch.feature_names))


def standardised(build, train_x: np.ndarray):
    """A builder of `build()`'s model with its `standardize` buffers set to the training inputs' mean and std."""
    def build_standardised() -> nn.Module:
        model = build()
        # Statistics from the training split only, so the test split stays unseen.
        model.standardize.mean.copy_(torch.as_tensor(train_x.mean(0)))
        model.standardize.std.copy_(torch.as_tensor(train_x.std(0) + 1e-6))
        return model

    return build_standardised


def train(out_dir) -> dict:
    from .training import fit

    train_data = load_data("train")
    return fit("tabular", standardised(build_model, train_data.x), train_data, load_data("test"), out_dir=out_dir, epochs=40, lr=1e-3,
               batch_size=32, weight_decay=1e-2)
