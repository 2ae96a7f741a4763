"""Built-in sample models: small real models with their training code, shipped weights and training logs.

Each sample is a module `sample_models.<name>` that defines:
- `CLASS_NAMES` (tuple of str) and `INPUT_SHAPE` (shape of one sample, without the batch dimension);
- `build_model() -> torch.nn.Module` (the architecture, freshly initialised);
- `load_data(split) -> SampleData` for split "train" or "test", generated or from scikit-learn's bundled data;
- `train(out_dir) -> dict` writing `<name>.safetensors` and `<name>.log.jsonl` (see `sample_models.training`);
- `SUMMARY`: one line on what the sample is and what it plants (the dashboard offers the samples with it).
Optionally `RUN_SPLITS` (tuple of split names, e.g. ("train", "test")): a run of `sample:<name>` then holds those
splits concatenated, with a metadata column `split` (`Sample.run_splits`; empty: the test split alone).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_NAMES = ("digits", "tabular", "dna", "shapes", "prices", "fraud", "scenes", "multispectral", "text",
                "audio", "drift")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class SampleData:
    """One split of a sample's data. `metadata` and `extras` arrays have one row per sample.

    `ground_truth` names the metadata columns that hold planted answers (flipped labels, motif positions): a person
    can look at them, but analyses that search for explanations must not use them.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    feature_names: tuple | None = None
    extras: dict = field(default_factory=dict)
    ground_truth: tuple = ()


@dataclass(frozen=True)
class Sample:
    name: str
    module: object

    @property
    def class_names(self) -> tuple:
        return tuple(self.module.CLASS_NAMES)

    @property
    def summary(self) -> str:
        return str(self.module.SUMMARY)

    @property
    def task(self) -> str:
        """What the sample's model does (`analyzers.evaluation.tasks`): classification unless the module says."""
        return getattr(self.module, "TASK", "classification")

    @property
    def run_splits(self) -> tuple:
        """The splits a run of this sample holds, concatenated (empty: the test split alone)."""
        return tuple(getattr(self.module, "RUN_SPLITS", ()))

    @property
    def input_shape(self) -> tuple:
        return tuple(self.module.INPUT_SHAPE)

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def log_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.log.jsonl"

    def build_model(self):
        return self.module.build_model()

    def load_data(self, split: str = "test") -> SampleData:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.module.load_data(split)


def get_sample(name: str) -> Sample:
    if name not in SAMPLE_NAMES:
        raise KeyError(name)
    return Sample(name=name, module=importlib.import_module(f"sample_models.{name}"))
