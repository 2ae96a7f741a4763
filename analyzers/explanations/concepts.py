"""Concepts: does a human-chosen concept push the model towards a class? TCAV with its significance test.

TCAV (Kim et al., 2018, "Interpretability Beyond Feature Attribution", through Captum's `captum.concept.TCAV`): at a
layer, a linear classifier separates the layer's activations of a concept's samples from those of a random set of
samples; the normal of its boundary, pointing towards the concept, is the concept activation vector (CAV). The TCAV
score of a class is the share of the class's inputs whose directional derivative along the CAV, the gradient of the
class's score with respect to the layer's output dotted with the CAV, is positive (Captum's "sign_count"): near 1 the
concept raises the class's score for nearly every input, near 0 it lowers it.

One CAV is noise as much as signal, so the score is taken against `random_sets` (R) random sets, seeded random
samples of the dataset disjoint from the concept's rows, and compared with a null: random set i scored against
random set i + 1 (cyclically), a cyclic subset of the all-pairs random-vs-random null of Kim et al.'s code (R CAVs
instead of R(R - 1)). A two-sided t-test (`scipy.stats.ttest_ind`) between the R concept scores and the R null
scores gives each layer a p-value, the standard TCAV significance test; with several layers the p-values are
Bonferroni-corrected (times the number of layers, at most 1), and a layer is `significant` when the corrected p is
below `alpha` = 0.05. Two lists that are both constant (no spread for a t-test) give p = 1 when they are equal and
p = 0 when they differ.

Two choices keep the test honest for a concept that means nothing: each of the R experiments draws its own subsample
of the concept when the concept holds more than a set's samples (a fixed subsample carries its own bias into every
one of its scores), and the null's positive set changes from experiment to experiment. On the shapes sample's test
split (1000 rows) at relu3 with 6 random sets of 30, random subsets of rows as large as the green concept came out
significant in 2 of 15 tries with a fixed concept subsample (against either a fixed random counterpart or the cyclic
null), and in 0 of 24 with both choices (over targets and seeds). With them, green backgrounds score for "square"
0.85-0.90 (p 7e-6 to 3e-3), for "triangle" 0.09-0.18 (p < 0.002), and for "circle" 0.34-0.59 (p 0.05 to 0.4, not
significant, although a green background lowers the circle logit on average), over seeds 0-2.

Read a layer before the model's last nonlinearity: after it (a global pooling's output feeding the last linear
layer) the gradient is the same for every input, so each set's score is 0 or 1 and the null is a coin toss per set.

A concept is a set of samples, given as row indices into the dataset's inputs (`concept_rows=`) or as samples of its
own (`concept_inputs=`, an array shaped like the inputs: a folder of example images read by the caller). The caller
turns what a person chose into rows: a metadata value (`concept_rows(metadata, column, value)`), a selection made on
the Embeddings page (its ids mapped to rows), a slice.

API (pure computation, no Streamlit; runs in a sandboxed model's worker):
- `concept_rows(metadata, column, value) -> np.ndarray`: the rows (int64, ascending) whose `metadata[column]`
  equals `value` (`metadata` a dict of arrays or a DataFrame).
- `tcav_scores(model, inputs, *, concept_rows=None, concept_inputs=None, target, layers, labels=None,
  inputs_rows=None, random_sets=10, samples_per_set=50, seed=0, batch_size=64, alpha=0.05, layer_input=False,
  on_batch=None) -> TcavScores`:
  - `target`: the class index whose score is differentiated (a regression's or a single-output model's 0);
  - `layers`: a layer name or a list of them (names of `model.named_modules()`); the layer's output is read
    (`layer_input=True`: its input, Captum's `attribute_to_layer_input`);
  - the inputs scored: `inputs_rows` if given, else the rows whose `labels` equal `target` when `labels` is given,
    else every row (TCAV asks about the target class's inputs: pass its rows or the labels);
  - every set, the concept's and each random one, holds `min(samples_per_set, concept size)` samples (the concept's
    a seeded subsample per experiment when it has more); the concept's set i is scored against random set i, and
    the null is random set i against random set i + 1 (mod R);
  - the CAV classifier is scikit-learn's `SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3)` as in Captum's
    `DefaultClassifier`, but seeded, fitted on a stratified two thirds of the two sets, its accuracy on the other
    third reported (`cav_accuracy`: near 0.5, the layer does not tell the concept from random samples, and its
    score means little);
  - the same `seed` gives the same numbers; the model is analysed in eval mode under its lock and handed back as it
    came (`analysis_mode`); activations and gradients are computed in batches of `batch_size`; Captum's CAV and
    activation files go to a temporary directory of this call, removed afterwards (never the working directory,
    and never reused, so a cached CAV of another concept cannot be read back);
  - `on_batch(done, total)` reports progress over the scored inputs.
- `TcavScores`: per layer (arrays in `layers` order) `score` (mean concept-vs-random TCAV score), `null_score` (mean
  random-vs-random), `p_value`, `p_adjusted` (Bonferroni), `significant`; `concept_scores` / `null_scores`
  (layers x random_sets) the per-set scores; `cav_accuracy` / `null_cav_accuracy` the same sets' CAV accuracies;
  `concept_sample` and `random_rows` the rows used; `.table()` a DataFrame, one row per layer.

Bad options (fewer than 2 random sets, an empty concept, a layer the model does not have, a target it does not
output) raise a one-line `InvalidOption` that names the fix.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnalyzerError, InvalidOption, first_line, whole_number
from ..loading.sandbox import runs_in_worker

ALPHA = 0.05  # significance level, after Bonferroni's correction over the layers asked for
CORRECTION = "bonferroni"
TEST_SPLIT = 0.33  # the share of each set held out to measure the CAV classifier's accuracy (Captum's default)
MIN_SET = 2  # samples per set, at least


@dataclass(frozen=True)
class TcavScores:
    """TCAV scores of one concept for `target` at each of `layers` (arrays in that order), against `random_sets`
    random sets, with the t-test against random-vs-random scores. See the module's docstring."""

    layers: tuple
    target: int
    score: np.ndarray  # (L,) mean TCAV score of the concept against each random set
    null_score: np.ndarray  # (L,) mean TCAV score of a random set against the same random sets
    p_value: np.ndarray  # (L,) two-sided t-test, concept scores vs null scores
    p_adjusted: np.ndarray  # (L,) Bonferroni: p_value x number of layers, at most 1
    significant: np.ndarray  # (L,) bool: p_adjusted < alpha
    concept_scores: np.ndarray  # (L, R)
    null_scores: np.ndarray  # (L, R)
    cav_accuracy: np.ndarray  # (L, R) held-out accuracy of each concept-vs-random CAV classifier
    null_cav_accuracy: np.ndarray  # (L, R)
    concept_sample: np.ndarray  # (R, S) the concept's samples against each random set: rows of the inputs (or of
    # concept_inputs)
    random_rows: np.ndarray  # (R, S) rows of the inputs in each random set
    num_inputs: int  # inputs scored
    concept_size: int  # the concept's samples given
    samples_per_set: int  # S, samples in every set
    random_sets: int  # R
    alpha: float
    correction: str
    seed: int

    def __post_init__(self):
        # what a sandboxed worker sends is checked before anyone reads it
        layers = tuple(str(name) for name in self.layers)
        object.__setattr__(self, "layers", layers)
        count, sets = len(layers), int(self.random_sets)
        for name in ("score", "null_score", "p_value", "p_adjusted"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        object.__setattr__(self, "significant", np.asarray(self.significant, dtype=bool))
        for name in ("concept_scores", "null_scores", "cav_accuracy", "null_cav_accuracy"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        object.__setattr__(self, "concept_sample", np.asarray(self.concept_sample, dtype=np.int64))
        object.__setattr__(self, "random_rows", np.asarray(self.random_rows, dtype=np.int64))
        per_layer = ("score", "null_score", "p_value", "p_adjusted", "significant")
        per_set = ("concept_scores", "null_scores", "cav_accuracy", "null_cav_accuracy")
        if (any(getattr(self, n).shape != (count,) for n in per_layer)
                or any(getattr(self, n).shape != (count, sets) for n in per_set)
                or self.random_rows.shape != self.concept_sample.shape or self.concept_sample.shape[:1] != (sets,)):
            raise AnalyzerError("the TCAV scores came back malformed (arrays of shapes that do not match the layers "
                                "and random sets): run the analysis again")

    def table(self):
        """One row per layer: the layer, mean score, null mean, p-values, significance and the per-set scores."""
        import pandas as pd

        return pd.DataFrame({
            "layer": list(self.layers), "score": self.score, "null_score": self.null_score,
            "p_value": self.p_value, "p_adjusted": self.p_adjusted, "significant": self.significant,
            "cav_accuracy": self.cav_accuracy.mean(axis=1) if self.random_sets else np.nan,
            "concept_scores": [list(map(float, row)) for row in self.concept_scores],
            "null_scores": [list(map(float, row)) for row in self.null_scores],
        })


def concept_rows(metadata, column: str, value) -> np.ndarray:
    """The rows whose metadata `column` equals `value` (int64, ascending): a concept given by a metadata value.
    `metadata` is a dict of per-row arrays or a DataFrame. A value given as text also matches the column's values
    written as text (a number or a flag typed in a box)."""
    columns = list(metadata.keys()) if isinstance(metadata, dict) else list(getattr(metadata, "columns", []))
    if column not in columns:
        shown = ", ".join(map(str, columns[:12])) or "none"
        raise InvalidOption(f"the metadata has no column {column!r}: choose one of {shown}")
    values = np.asarray(metadata[column])
    comparable = not isinstance(value, str) or values.dtype.kind in "USO"
    matches = np.flatnonzero(values == value) if comparable else np.array([], dtype=np.int64)
    if len(matches) == 0 and isinstance(value, str):
        matches = np.flatnonzero(values.astype(str) == value)
    if len(matches) == 0:
        present = ", ".join(map(str, list(dict.fromkeys(values.tolist()))[:8]))
        raise InvalidOption(f"no row has {column} == {value!r}: choose a value that occurs (such as {present})")
    return matches.astype(np.int64)


class _SeededClassifier:
    """Captum's `DefaultClassifier` (scikit-learn SGD, alpha 0.01), seeded: the same seed gives the same CAVs.
    Built by `_seeded_classifier` as a subclass of Captum's `Classifier` (imported only when TCAV runs)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._lm = None

    def train_and_eval(self, dataloader, test_split_ratio: float = TEST_SPLIT, **kwargs):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import SGDClassifier

        xs, ys = [], []
        for x, y in dataloader:
            xs.append(x.detach().cpu().double().numpy())
            ys.append(y.detach().cpu().numpy())
        x, y = np.concatenate(xs), np.concatenate(ys)
        test = []
        for label in np.unique(y):  # stratified: each set keeps two thirds for the fit
            rows = self._rng.permutation(np.flatnonzero(y == label))
            test.extend(rows[:min(int(test_split_ratio * len(rows)), len(rows) - 1)].tolist())
        held = np.zeros(len(y), dtype=bool)
        held[test] = True
        self._lm = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3,
                                 random_state=int(self._rng.integers(2 ** 31 - 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._lm.fit(x[~held], y[~held])
        accuracy = float(np.mean(self._lm.predict(x[held]) == y[held])) if held.any() else float("nan")
        return {"accs": accuracy}  # plain numbers: Captum reads its CAV files back with weights_only

    def weights(self):
        import torch

        w = torch.as_tensor(self._lm.coef_, dtype=torch.float32)
        return torch.stack([-w[0], w[0]]) if w.shape[0] == 1 else w

    def classes(self):
        return [int(c) for c in self._lm.classes_]


def _seeded_classifier(seed: int):
    from captum.concept._utils.classifier import Classifier

    cls = type("SeededClassifier", (_SeededClassifier, Classifier), {})
    return cls(seed)


def _rows(value, n: int, name: str) -> np.ndarray:
    rows = np.asarray(value)
    if rows.dtype == bool and rows.shape == (n,):
        rows = np.flatnonzero(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise InvalidOption(f"{name} must be a list of row numbers (or a boolean mask over the inputs)")
    rows = np.unique(rows.astype(np.int64))
    if rows.size and not 0 <= rows[0] <= rows[-1] < n:
        raise InvalidOption(f"{name} holds rows outside the inputs (0 to {n - 1}): pass rows of these inputs")
    return rows


def _p_value(concept: np.ndarray, null: np.ndarray) -> float:
    if np.ptp(concept) == 0 and np.ptp(null) == 0:  # no spread: the t statistic is 0/0 or infinite
        return 1.0 if concept[0] == null[0] else 0.0
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # nearly identical scores: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_ind(concept, null).pvalue)
    return 1.0 if math.isnan(p) else p


@runs_in_worker
def tcav_scores(model, inputs, *, concept_rows=None, concept_inputs=None, target: int, layers, labels=None,
                inputs_rows=None, random_sets: int = 10, samples_per_set: int = 50, seed: int = 0,
                batch_size: int = 64, alpha: float = ALPHA, layer_input: bool = False,
                on_batch=None) -> TcavScores:
    """TCAV scores of a concept for class `target` at `layers`, with the significance test; see the module's
    docstring for every option."""
    import torch
    from torch.utils.data import DataLoader

    from ..engines.inference import module_device, resolve_layer
    from ..guard import analysis_mode, unwrap
    from .attributions import _scores_module

    random_sets = whole_number(random_sets, "random_sets", 2, "the t-test needs at least 2 random sets (10 or more is "
                                                       "usual)")
    samples_per_set = whole_number(samples_per_set, "samples_per_set", MIN_SET, "use 20 to 100 samples per set")
    batch_size = whole_number(batch_size, "batch_size", 1, "use 64, or less if memory is short")
    seed = whole_number(seed, "seed", 0, "use 0 or another non-negative integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidOption(f"alpha must be a significance level between 0 and 1 (such as 0.05), got {alpha!r}")
    inputs = np.asarray(inputs)
    n = len(inputs)
    if n == 0:
        raise InvalidOption("no inputs given: pass the dataset's inputs")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise InvalidOption(f"target must be a class index (0, 1, ...), got {target!r}")
    target = int(target)

    if (concept_rows is None) == (concept_inputs is None):
        raise InvalidOption("give the concept either as concept_rows (rows of the inputs) or as concept_inputs "
                            "(samples of its own), not both or neither")
    if concept_rows is not None:
        given = _rows(concept_rows, n, "concept_rows")
        concept_pool, concept_data = given, inputs
        random_pool = np.setdiff1d(np.arange(n), given)
    else:
        concept_data = np.asarray(concept_inputs)
        if concept_data.ndim == 0 or (len(concept_data) and concept_data.shape[1:] != inputs.shape[1:]):
            raise InvalidOption(f"concept_inputs must be samples shaped like the inputs ({inputs.shape[1:]}), got "
                                f"{concept_data.shape[1:]}: read the concept's examples the way the dataset's are")
        given = concept_pool = np.arange(len(concept_data))
        random_pool = np.arange(n)
    if len(given) == 0:
        raise InvalidOption("the concept has no samples: choose a metadata value, selection or folder that holds "
                            f"at least {MIN_SET}")
    if len(given) < MIN_SET:
        raise InvalidOption(f"the concept has {len(given)} sample: choose one that holds at least {MIN_SET} (20 or "
                            f"more is better)")
    size = min(samples_per_set, len(given))
    if len(random_pool) < size:
        raise InvalidOption(f"only {len(random_pool)} rows lie outside the concept, fewer than the {size} samples "
                            f"each random set needs: lower samples_per_set or choose a smaller concept")

    if inputs_rows is not None:
        scored = _rows(inputs_rows, n, "inputs_rows")
    elif labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise InvalidOption(f"labels must hold one class index per input ({n} of them), got an array of shape "
                                f"{labels.shape}: pass inputs_rows for a multi-label model")
        scored = np.flatnonzero(labels == target)
    else:
        scored = np.arange(n)
    if len(scored) == 0:
        raise InvalidOption(f"no inputs to score for target {target}: pass inputs_rows, or labels that hold "
                            f"class {target}")

    names = [layers] if isinstance(layers, str) else list(layers or [])
    if not names or not all(isinstance(name, str) for name in names):
        raise InvalidOption("layers must be a layer name or a list of them (such as 'conv3')")
    names = list(dict.fromkeys(names))
    module = unwrap(model)
    scores_model = _scores_module(model)
    within = {id(m): name for name, m in scores_model.named_modules()}
    captum_names = []
    for name in names:
        try:
            layer_module = resolve_layer(module, name)
        except AnalyzerError as exc:
            raise InvalidOption(str(exc)) from None
        captum_names.append(within[id(layer_module)])

    rng = np.random.default_rng(seed)
    # each experiment its own subsample of the concept (all of it when it holds no more than a set): a concept
    # that is just a random part of the dataset then scores like the null, which a fixed subsample does not
    concept_sample = np.stack([np.sort(rng.choice(concept_pool, size=size, replace=False))
                               for _ in range(random_sets)])
    random_rows = np.stack([np.sort(rng.choice(random_pool, size=size, replace=False))
                            for _ in range(random_sets)])

    from captum.concept import TCAV, Concept

    device = module_device(module)
    dtype = None if inputs.dtype.kind in "iu" else np.float32

    def tensor(array):
        return torch.as_tensor(np.asarray(array, dtype=dtype), device=device)

    def concept(cid: int, name: str, data):
        return Concept(cid, name, DataLoader(tensor(data), batch_size=batch_size, shuffle=False))

    positives = [concept(i, f"concept{i}", concept_data[rows]) for i, rows in enumerate(concept_sample)]
    randoms = [concept(random_sets + i, f"random{i}", inputs[rows]) for i, rows in enumerate(random_rows)]
    # the concept against every random set; the null: each random set against the next one, cyclically
    experiments = ([[p, r] for p, r in zip(positives, randoms)]
                   + [[randoms[i], randoms[(i + 1) % random_sets]] for i in range(random_sets)])
    counts = np.zeros((len(names), len(experiments)))
    with analysis_mode(module), tempfile.TemporaryDirectory(prefix="tcav-") as save_path:
        with torch.no_grad():
            out = scores_model(tensor(inputs[scored[:1]]))
        outputs = out.shape[1] if out.ndim == 2 else 1 if out.ndim == 1 else None
        if outputs is None or target >= outputs:
            raise InvalidOption(f"target {target} is not an output of the model ({outputs or 'no'} class scores per "
                                f"sample): choose a class index from 0 to {(outputs or 1) - 1}")
        tcav = TCAV(scores_model, captum_names, model_id="model", classifier=_seeded_classifier(seed),
                    attribute_to_layer_input=bool(layer_input), save_path=save_path)
        try:
            tcav.compute_cavs(experiments)
            for start in range(0, len(scored), batch_size):
                rows = scored[start:start + batch_size]
                batch = tensor(inputs[rows])
                if batch.is_floating_point():
                    batch.requires_grad_(True)  # a gradient reaches the layer even when the weights are frozen
                result = tcav.interpret(batch, experiments, target=target)
                for e, experiment in enumerate(experiments):
                    key = "-".join(str(c.id) for c in experiment)
                    for li, name in enumerate(captum_names):
                        counts[li, e] += float(result[key][name]["sign_count"][0]) * len(rows)
                if on_batch is not None:
                    on_batch(min(start + batch_size, len(scored)), len(scored))
            accuracy = np.array([[float(tcav.cavs["-".join(str(c.id) for c in experiment)][name].stats["accs"])
                                  for experiment in experiments] for name in captum_names])
        except (AssertionError, RuntimeError, IndexError) as exc:
            raise AnalyzerError(f"TCAV failed at layer(s) {', '.join(names)}: {first_line(exc)}: choose a layer "
                                f"that runs once per pass and outputs one tensor") from None

    per_set = counts / len(scored)
    concept_scores, null_scores = per_set[:, :random_sets], per_set[:, random_sets:]
    p_value = np.array([_p_value(c, z) for c, z in zip(concept_scores, null_scores)])
    p_adjusted = np.minimum(1.0, p_value * len(names))
    return TcavScores(
        layers=tuple(names), target=target, score=concept_scores.mean(axis=1), null_score=null_scores.mean(axis=1),
        p_value=p_value, p_adjusted=p_adjusted, significant=p_adjusted < alpha, concept_scores=concept_scores,
        null_scores=null_scores, cav_accuracy=accuracy[:, :random_sets], null_cav_accuracy=accuracy[:, random_sets:],
        concept_sample=concept_sample, random_rows=random_rows, num_inputs=len(scored), concept_size=len(given),
        samples_per_set=size, random_sets=random_sets, alpha=float(alpha), correction=CORRECTION, seed=seed)


# --- concepts of a stored run -------------------------------------------------------------------------------------

TCAV_DIR = "network/tcav"  # in a run: one .npz per concept, class, layers and options scored
CONCEPT_KINDS = ("metadata", "ids", "images")


@runs_in_worker
def concept_folder_inputs(model, archive, *, name: str, image_size, mean=None, std=None) -> dict:
    """The images of a zip of concept folders (`striped/001.png`: one folder per concept), decoded for `model`'s
    image inputs as the run's dataset was (`image_size` (H, W), `mean`, `std`; the model's channels). With a
    sandboxed model this runs in its worker, so an uploaded archive is parsed only there. `archive`: the zip's bytes
    as a uint8 array. Returns {"concepts": folder names, "x": (N, C, H, W) float32, "concept": (N,) index into
    concepts}."""
    from ..loading.datasets import read_image_folders

    shape = tuple(getattr(model, "input_shape", ()) or ())
    if len(shape) != 3:
        raise InvalidOption(f"the model takes inputs of shape {shape}, not images: concept images apply to an image "
                            f"model; give the concept as a metadata value or a selection")
    data = np.asarray(archive, dtype=np.uint8).tobytes()
    folders, x, _ = read_image_folders(data, name=name, channels=shape[0], image_size=image_size or shape[1:],
                                       mean=mean, std=std)
    concepts = sorted(set(folders))
    return {"concepts": concepts, "x": x, "concept": np.asarray([concepts.index(f) for f in folders], np.int64)}


def _tcav_path(run, key: dict) -> Path:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return run.file(f"{TCAV_DIR}/{digest}.npz")


def _concept_key(concept: dict) -> dict:
    """What identifies a concept in the stored results (a long id list by its digest); refuses a malformed one."""
    import hashlib

    kind = concept.get("kind") if isinstance(concept, dict) else None
    if kind == "metadata" and {"column", "value"} <= set(concept):
        return {"kind": kind, "column": str(concept["column"]), "value": str(concept["value"])}
    if kind == "ids" and isinstance(concept.get("ids"), (list, tuple)):
        ids = sorted(str(i) for i in concept["ids"])
        return {"kind": kind, "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "count": len(ids)}
    if kind == "images" and {"sha256", "folder"} <= set(concept):
        return {"kind": kind, "sha256": str(concept["sha256"]), "folder": str(concept["folder"])}
    raise InvalidOption(f"a concept is a dict with kind one of {', '.join(CONCEPT_KINDS)} (metadata: column and "
                        f"value; ids: ids; images: sha256 and folder), got {concept!r}")


def run_tcav(run_dir, *, concept: dict, target: int, layers, concept_inputs=None, random_sets: int = 8,
             samples_per_set: int = 40, seed: int = 0, batch_size: int = 64, model=None, dataset=None,
             on_batch=None) -> TcavScores:
    """`tcav_scores` of a concept over a stored run's dataset, for class `target` at `layers` (the class's samples
    scored, when the task has classes). `concept` says what the concept is and is kept with its scores:
    {"kind": "metadata", "column", "value"}, {"kind": "ids", "ids": sample ids} (a selection), or
    {"kind": "images", "sha256", "folder"} with its decoded images as `concept_inputs` (`concept_folder_inputs`).
    An optional "label" names it for a person. Kept in the run (network/tcav/<digest>.npz) and read back while the
    model's and the data's hashes, the concept, the class, the layers and the options are those it was computed
    with (`stored_tcav` lists them); `model`/`dataset` (already loaded) skip reloading them."""
    import json

    from ..engines.pipeline import load_run_inputs
    from ..evaluation.tasks import task_named
    from ..loading.runs import open_run, write_atomic

    run = open_run(run_dir)
    names = [layers] if isinstance(layers, str) else [str(n) for n in layers or ()]
    key = {"model": run.info["model"]["sha256"], "data": run.info["dataset"]["sha256"],
           "concept": _concept_key(concept), "target": int(target), "layers": names,
           "random_sets": int(random_sets), "samples_per_set": int(samples_per_set), "seed": int(seed)}
    path = _tcav_path(run, key)
    stored = _read_tcav(path, key)
    if stored is not None:
        return stored[1]
    if (concept["kind"] == "images") != (concept_inputs is not None):
        raise InvalidOption("concept images come with their decoded inputs (concept_inputs), and only they do")
    if model is None or dataset is None:
        model, dataset = load_run_inputs(run)
    rows = None
    if concept["kind"] == "metadata":
        rows = concept_rows(dataset.metadata, concept["column"], concept["value"])
    elif concept["kind"] == "ids":
        position = {str(i): r for r, i in enumerate(np.asarray(dataset.ids).tolist())}
        missing = [str(i) for i in concept["ids"] if str(i) not in position]
        if missing:
            raise InvalidOption(f"{len(missing)} of the selected ids are not in this run (such as {missing[0]!r}): "
                                f"select the concept's samples again on this run")
        rows = np.unique([position[str(i)] for i in concept["ids"]]).astype(np.int64)
    has_classes = task_named(run.task, len(run.class_names)).has_classes
    result = tcav_scores(model, dataset.x, concept_rows=rows, concept_inputs=concept_inputs, target=int(target),
                         layers=names, labels=np.asarray(dataset.y) if has_classes else None,
                         random_sets=random_sets, samples_per_set=samples_per_set, seed=seed,
                         batch_size=batch_size, on_batch=on_batch)
    label = str(concept.get("label") or _concept_label(key["concept"]))

    def _save(tmp: Path) -> None:
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        fields["layers"] = np.asarray(result.layers, dtype=str)
        with open(tmp, "wb") as fh:
            np.savez(fh, key=json.dumps(key, sort_keys=True), label=label, **fields)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _save)
    return result


def _concept_label(concept_key: dict) -> str:
    if concept_key["kind"] == "metadata":
        return f"{concept_key['column']} = {concept_key['value']}"
    if concept_key["kind"] == "ids":
        return f"a selection of {concept_key['count']} samples"
    return f"concept images: {concept_key['folder']}"


def _read_tcav(path: Path, key: dict | None = None):
    """(label, key, TcavScores) stored at `path`, if it is there, readable and (given `key`) computed for it."""
    import json

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_key = json.loads(str(stored["key"]))
            if key is not None and stored_key != key:
                return None
            values = {f.name: stored[f.name] for f in dataclasses.fields(TcavScores)}
            label = str(stored["label"])
    except (OSError, ValueError, KeyError) as exc:
        raise AnalyzerError(f"{path.name} in the run's {TCAV_DIR} cannot be read ({first_line(exc)}): delete it and "
                            f"score the concept again") from None
    for name in ("target", "num_inputs", "concept_size", "samples_per_set", "random_sets", "seed"):
        values[name] = int(values[name])
    values["alpha"], values["correction"] = float(values["alpha"]), str(values["correction"])
    values["layers"] = tuple(str(n) for n in values["layers"])
    return (label, stored_key, TcavScores(**values)) if key is None else (label, TcavScores(**values))


def stored_tcav(run_dir) -> list:
    """The concepts scored on this run and kept in it, for its model and data as they are: (label, key,
    TcavScores) each, the most recent first."""
    from ..loading.runs import open_run

    run = open_run(run_dir)
    folder = run.file(TCAV_DIR)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = _read_tcav(path)
        if record and record[1].get("model") == run.info["model"]["sha256"] \
                and record[1].get("data") == run.info["dataset"]["sha256"]:
            found.append(record)
    return found
