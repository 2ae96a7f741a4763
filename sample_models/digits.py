"""`digits`: a small CNN on scikit-learn's bundled 8x8 handwritten digits (no download)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from . import SampleData

SUMMARY = "8×8 handwritten digits and a small CNN; nothing planted: a clean baseline to learn the pages on."
CLASS_NAMES = tuple(str(d) for d in range(10))
INPUT_SHAPE = (1, 8, 8)


def build_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(32 * 4 * 4, 64), relu3=nn.ReLU(),
        fc2=nn.Linear(64, 10),
    ))


def load_data(split: str) -> SampleData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    ids = np.arange(len(x))
    x_tr, x_te, y_tr, y_te, id_tr, id_te = train_test_split(x, digits.target, ids, test_size=0.25, random_state=0,
                                                            stratify=digits.target)
    x, y, ids = (x_tr, y_tr, id_tr) if split == "train" else (x_te, y_te, id_te)
    # Ink amount is a per-sample property a person can slice on (faint or heavy strokes).
    return SampleData(x=x, y=y.astype(np.int64), ids=ids, metadata={"ink": x.reshape(len(x), -1).mean(1)})


def train(out_dir) -> dict:
    from .training import fit

    return fit("digits", build_model, load_data("train"), load_data("test"), out_dir=out_dir, epochs=30, lr=3e-3)
