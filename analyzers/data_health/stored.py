"""Robustness curves and the inference profile of a stored run, computed on demand and kept in it.

Both cost many forward passes, so they are not stages of every run: the Data health page (or a script) asks for
them, and they are kept under the run's `health/` folder (a derived folder, `runs.DERIVED_DIRS`: a run that replaces
one of the same model and data keeps them), keyed by the model's and the data's hashes and every option, so a
result is read back only while it is the one those would compute.

- `run_robustness(run_dir, perturbation=..., strengths=None, max_samples=MAX_SAMPLES)`: `robustness.robustness_curve`
  (or `fgsm_curve` for "fgsm", an attack and not a natural perturbation) on a seeded subset of at most `max_samples`
  rows (every row when the run has fewer), with the curve of each of the run's top error slices (`SLICES`) and of
  each split; `stored_robustness(run_dir)` lists what is kept.
- `run_profile(run_dir, batch_sizes=...)`: `profile.inference_profile` on the run's own inputs, on the device asked
  for (the run's model is where it runs: a sandboxed model in its worker).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import AnalyzerError, InvalidOption, first_line, whole_number

HEALTH_DIR = "health"
ROBUSTNESS_DIR = f"{HEALTH_DIR}/robustness"
PROFILE_FILE = f"{HEALTH_DIR}/profile.npz"
MAX_SAMPLES = 1000  # rows a curve runs on by default: 5 strengths x 1000 rows costs 5 forwards of 1000
SLICES = 5  # the run's top error slices, each with its own curve
# strengths per perturbation (0, the unperturbed inputs, is always first); each in the perturbation's own unit
DEFAULT_STRENGTHS = {"gaussian_noise": (0.25, 0.5, 1.0, 2.0), "blur": (0.5, 1.0, 2.0, 4.0),
                     "brightness": (0.5, 1.0, 2.0, 3.0), "contrast": (0.25, 0.5, 0.75, 0.9),
                     "occlusion": (0.1, 0.25, 0.5, 0.75), "feature_noise": (0.25, 0.5, 1.0, 2.0),
                     "feature_dropout": (0.1, 0.25, 0.5, 0.75)}
# FGSM's steps as shares of the inputs' overall standard deviation (its ε is in the inputs' own units)
FGSM_STEPS = (0.01, 0.03, 0.1, 0.3)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def save_result(path: Path, key: dict, result, **extra) -> None:
    """A frozen result dataclass of arrays, numbers, text and tuples of text, kept at `path` (.npz) with its key."""
    from ..loading.runs import write_atomic

    fields = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        fields[f.name] = np.asarray(value, dtype=str) if isinstance(value, tuple) else np.asarray(value)

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, _key=json.dumps(key, sort_keys=True), _extra=json.dumps(extra, sort_keys=True), **fields)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _save)


def load_result(path: Path, cls, key: dict | None = None):
    """(key, extra, result) kept at `path` by `save_result`, when it is there and (given `key`) was computed for
    it; None otherwise. A damaged file is one line naming it and the fix."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_key = json.loads(str(stored["_key"]))
            if key is not None and stored_key != key:
                return None
            extra = json.loads(str(stored["_extra"]))
            values = {}
            for f in dataclasses.fields(cls):
                value = stored[f.name]
                values[f.name] = (tuple(str(v) for v in value.tolist()) if value.dtype.kind == "U" and value.ndim
                                  else value.item() if value.ndim == 0 else value)
        return stored_key, extra, cls(**values)
    except (OSError, ValueError, KeyError, TypeError, AnalyzerError, zipfile.BadZipFile) as exc:
        raise AnalyzerError(f"{path.name} in the run's {path.parent.name} folder cannot be read ({first_line(exc)}): "
                            f"delete it and compute it again") from None


def _run_key(run) -> dict:
    return {"model": run.info["model"]["sha256"], "data": run.info["dataset"]["sha256"]}


def curve_rows(n: int, max_samples: int, seed: int) -> np.ndarray:
    """The rows a curve runs on: all `n`, or a seeded sorted subset of `max_samples`."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))


def _slice_masks(run, rows: np.ndarray) -> dict:
    """name -> boolean mask over `rows`: the run's top error slices and its splits."""
    from ..loading.splits import SPLIT_COLUMN, split_names

    samples = run.sample_table
    masks = {}
    ids = samples["id"].astype(str).to_numpy()[rows]
    if run.has("slices.parquet"):
        slices = run.read_parquet("slices.parquet").head(SLICES)
        for row in slices.itertuples():
            masks[f"slice: {row.description}"] = np.isin(ids, np.asarray([str(i) for i in row.ids]))
    for name in split_names(samples):
        masks[f"split: {name}"] = samples[SPLIT_COLUMN].astype(str).to_numpy()[rows] == name
    return {k: v for k, v in masks.items() if v.any()}


def run_robustness(run_dir, *, perturbation: str, strengths=None, max_samples: int = MAX_SAMPLES, seed: int = 0,
                   batch_size: int = 256, model=None, dataset=None, on_batch=None):
    """The robustness curve of `perturbation` on the run (see the module's docstring), kept in it; returns
    (RobustnessCurve, the ids of its rows in order)."""
    from ..loading.runs import open_run
    from .robustness import PERTURBATIONS, RobustnessCurve, fgsm_curve, robustness_curve

    if perturbation != "fgsm" and perturbation not in PERTURBATIONS:
        raise InvalidOption(f"unknown perturbation {perturbation!r}: choose fgsm or one of {', '.join(PERTURBATIONS)}")
    max_samples = whole_number(max_samples, "max_samples", 1, "use 1000, or more for steadier curves")
    seed = whole_number(seed, "seed", 0)
    run = open_run(run_dir)
    rows = curve_rows(run.num_samples, max_samples, seed)
    if strengths is None:
        strengths = FGSM_STEPS if perturbation == "fgsm" else DEFAULT_STRENGTHS[perturbation]
    strengths = [float(s) for s in strengths]
    key = {**_run_key(run), "perturbation": perturbation, "strengths": strengths, "max_samples": max_samples,
           "seed": seed}
    path = run.file(f"{ROBUSTNESS_DIR}/{_digest(key)}.npz")
    stored = load_result(path, RobustnessCurve, key)
    if stored is not None:
        return stored[2], stored[1]["ids"]
    if model is None or dataset is None:
        from ..engines.pipeline import load_run_inputs

        model, dataset = load_run_inputs(run)
    x, y = dataset.x[rows], dataset.y[rows]
    masks = _slice_masks(run, rows)
    if perturbation == "fgsm":
        scale = float(np.std(x)) or 1.0  # ε in the inputs' units, as shares of their spread
        curve = fgsm_curve(model, x, y, epsilons=[s * scale for s in strengths], batch_size=batch_size,
                           slices=masks or None, on_batch=on_batch)
    else:
        curve = robustness_curve(model, x, y, perturbation=perturbation, strengths=strengths, batch_size=batch_size,
                                 seed=seed, slices=masks or None, on_batch=on_batch)
    from .shift import json_value

    ids = [json_value(i) for i in np.asarray(dataset.ids)[rows].tolist()]
    save_result(path, key, curve, ids=ids)
    return curve, ids


def stored_robustness(run_dir) -> list:
    """The curves kept in the run for its model and data as they are: (key, RobustnessCurve, ids), newest first."""
    from ..loading.runs import open_run
    from .robustness import RobustnessCurve

    run = open_run(run_dir)
    folder = run.file(ROBUSTNESS_DIR)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = load_result(path, RobustnessCurve)
        if record and all(record[0].get(k) == v for k, v in _run_key(run).items()):
            found.append((record[0], record[2], record[1].get("ids", [])))
    return found


def run_profile(run_dir, *, batch_sizes=(1, 8, 32, 128), repeats: int = 20, device: str = "cpu", model=None,
                dataset=None):
    """The inference profile of the run's model on its own inputs, kept in the run (one per run: asking again with
    other options replaces it)."""
    from ..loading.runs import open_run
    from .profile import InferenceProfile, inference_profile

    run = open_run(run_dir)
    sizes = sorted({whole_number(b, "batch size", 1) for b in batch_sizes})
    key = {**_run_key(run), "batch_sizes": sizes, "repeats": int(repeats), "device": device}
    path = run.file(PROFILE_FILE)
    stored = load_result(path, InferenceProfile, key)
    if stored is not None:
        return stored[2]
    if model is None or dataset is None:
        from ..engines.pipeline import load_run_inputs

        model, dataset = load_run_inputs(run)
    result = inference_profile(model, dataset.x[:max(sizes)], batch_sizes=sizes, repeats=repeats, device=device)
    save_result(path, key, result)
    return result


def stored_profile(run_dir):
    """The profile kept in the run for its model and data as they are, or None."""
    from ..loading.runs import open_run
    from .profile import InferenceProfile

    run = open_run(run_dir)
    record = load_result(run.file(PROFILE_FILE), InferenceProfile)
    if record is None or any(record[0].get(k) != v for k, v in _run_key(run).items()):
        return None
    return record[2]
