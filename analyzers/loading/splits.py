"""Runs over several splits: `--data train=A --data test=B`, or one dataset whose column names each row's split.

A run with splits is one dataset whose metadata column `split` (`SPLIT_COLUMN`) names each row's split, as text:
every analysis sees all the rows, and the per-split ones (metrics side by side, the train-test gap, shift between
splits, leaks across them) group by that column, which `samples.parquet` carries like any metadata column.

- `parse_data_args(["train=a.npz", "test=b.npz"])` reads the command line's `--data` values: given once, the value
  is a plain spec; given several times, every value is `NAME=SPEC`, and the result is {name: spec} in order.
- `combine_splits({name: Dataset})` concatenates datasets read with the same options (`load_dataset` does it for a
  {name: spec}), and records each part's spec and hash (`split_sources`) so that the run can be rebuilt.
- `with_split_column(dataset, column)` takes the split from a column of the dataset's own (`--split-column`); a
  column literally called `split` is read as the split without being asked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import AnalyzerError

if TYPE_CHECKING:  # the type only: importing datasets here would import it with every split helper
    from .datasets import Dataset

LOG = logging.getLogger(__name__)
SPLIT_COLUMN = "split"
# a split's name is shown in headers, used in file names and typed on the command line: kept plain
SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
MAX_SPLITS = 8
# the split whose metric is the run's headline, and which the train-test gap is measured against, when present
TRAIN_NAMES = ("train", "training")
EVAL_NAMES = ("test", "eval", "evaluation", "val", "valid", "validation", "holdout")


def check_split_name(name) -> str:
    if not isinstance(name, str) or not SPLIT_NAME.match(name):
        raise AnalyzerError(f"split name {name!r} is not a plain name: use letters, digits, '-' or '_' (at most "
                            f"32, starting with a letter), e.g. --data train=train.npz --data test=test.npz")
    return name


def parse_data_args(values) -> str | dict:
    """The `--data` values of the command line: one value is a spec as it is; several are `NAME=SPEC` each."""
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1:
        return values[0]
    specs: dict = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not spec:
            raise AnalyzerError(f"--data {value!r} does not name its split: with several --data, write each as "
                                f"NAME=FILE, e.g. --data train=train.npz --data test=test.npz")
        check_split_name(name)
        if name in specs:
            raise AnalyzerError(f"split {name!r} is given twice in --data: give each split once")
        specs[name] = spec
    return check_split_specs(specs)


def check_split_specs(specs) -> dict:
    """A {split name: dataset spec} mapping, checked: 2 to MAX_SPLITS plain names, each with a text spec."""
    if not isinstance(specs, dict) or not 2 <= len(specs) <= MAX_SPLITS:
        raise AnalyzerError(f"a run over splits takes 2 to {MAX_SPLITS} of them, as {{name: file}}; for one "
                            f"dataset pass its spec alone")
    for name, spec in specs.items():
        check_split_name(name)
        if not isinstance(spec, str) or not spec:
            raise AnalyzerError(f"split {name!r} names no dataset: pass sample:NAME or a file path")
    return dict(specs)


def describe_splits(specs: dict) -> str:
    """How a {name: spec} mapping is named to a person (run.json's dataset.spec for a run over split files)."""
    return ", ".join(f"{name}={spec}" for name, spec in specs.items())


def checked_split_sources(value) -> tuple | None:
    """`split_sources` as a worker or a run.json gives them, checked (neither is trusted): a tuple of
    {name, spec, sha256, num_samples} with plain, distinct names; None when they are not that."""
    if not isinstance(value, (list, tuple)) or len(value) == 1 or len(value) > MAX_SPLITS:
        return None
    sources = []
    for entry in value:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "spec", "sha256")) \
                or not SPLIT_NAME.match(entry["name"]) or not isinstance(entry.get("num_samples"), int) \
                or isinstance(entry.get("num_samples"), bool) or entry["num_samples"] < 0:
            return None
        sources.append({k: entry[k] for k in ("name", "spec", "sha256", "num_samples")})
    if len({s["name"] for s in sources}) != len(sources):
        return None
    return tuple(sources)


def _text_ids(ids: np.ndarray) -> np.ndarray:
    return np.asarray([str(i) for i in ids.tolist()], dtype=object)


def combine_splits(parts: dict) -> "Dataset":
    """One dataset of the `parts` ({split name: Dataset}) in order, its `split` column naming each row's part.

    The parts must agree on what a sample is: shape, task, class names, feature names and preprocessing (the same
    files read with the same options do). Metadata columns are the union (a column one part lacks is missing, NaN,
    in its rows); a per-sample extra that some part lacks is dropped, with a warning. Ids are kept while they are
    unique over all parts, and otherwise each becomes `"<split>/<id>"` (text)."""
    if len(parts) < 2:
        raise AnalyzerError("combining splits needs two datasets or more")
    names = [check_split_name(n) for n in parts]
    datasets = list(parts.values())
    first = datasets[0]
    for name, part in zip(names[1:], datasets[1:]):
        what = dataset_disagreement(first, part)
        if what:
            raise AnalyzerError(f"split {name!r} differs from split {names[0]!r} in its {what}: every split must be "
                                f"the same kind of data, read with the same options")
    for name, part in parts.items():
        if SPLIT_COLUMN in part.metadata.columns:
            raise AnalyzerError(f"split {name!r} already has a {SPLIT_COLUMN!r} column: give that file as one "
                                f"--data (its column names the splits), or drop the column")
    ids = [np.asarray(p.ids) for p in datasets]
    joined = np.concatenate([_text_ids(i) for i in ids]) if len({i.dtype.kind for i in ids}) > 1 \
        else np.concatenate(ids)
    if len(pd.unique(pd.Series(joined.astype(str) if joined.dtype.kind == "O" else joined))) != len(joined):
        joined = np.concatenate([np.asarray([f"{n}/{i}" for i in part_ids.tolist()], dtype=object)
                                 for n, part_ids in zip(names, ids)])
    metadata = joined_metadata(datasets)
    metadata[SPLIT_COLUMN] = np.concatenate([np.full(len(p), n, dtype=object) for n, p in zip(names, datasets)])
    sources = tuple({"name": n, "spec": str(p.spec), "sha256": p.sha256, "num_samples": int(len(p))}
                    for n, p in zip(names, datasets))
    digest = hashlib.sha256(json.dumps([[s["name"], s["sha256"]] for s in sources]).encode()).hexdigest()
    return concatenate_datasets(datasets, ids=joined, metadata=metadata, sha256=digest, split_sources=sources,
                                spec=describe_splits({n: p.spec for n, p in zip(names, datasets)}))


def joined_metadata(datasets: list) -> pd.DataFrame:
    """The union of the parts' metadata columns, row after row (NaN where a part lacks a column)."""
    # a part without metadata has a table of no rows: give it its rows (no columns) so the union keeps them
    return pd.concat([p.metadata.reset_index(drop=True) if len(p.metadata) == len(p)
                      else pd.DataFrame(index=pd.RangeIndex(len(p))) for p in datasets], ignore_index=True, sort=False)


def concatenate_datasets(datasets: list, *, ids, metadata: pd.DataFrame, spec: str, sha256: str,
                         split_sources: tuple = ()) -> "Dataset":
    """The rows of `datasets` (which agree on what a sample is: `dataset_disagreement`) one after another, under
    the joined `ids`, `metadata`, `spec` and `sha256` the caller made. A per-sample extra that some part lacks is
    dropped, with a warning; ground-truth columns and class names are the parts' union and first."""
    from .datasets import Dataset

    first = datasets[0]
    extras = {}
    for key in first.extras:
        if all(key in p.extras and np.asarray(p.extras[key]).shape[1:] == np.asarray(first.extras[key]).shape[1:]
               for p in datasets):
            extras[key] = np.concatenate([np.asarray(p.extras[key]) for p in datasets])
        else:
            LOG.warning("the per-sample array %r is not in every part in the same shape: it is left out", key)
    truth = tuple(dict.fromkeys(c for p in datasets for c in p.ground_truth_columns))
    class_names = next((p.class_names for p in datasets if p.class_names), None)
    return Dataset(x=np.concatenate([p.x for p in datasets]), y=np.concatenate([p.y for p in datasets]), ids=ids,
                   spec=spec, sha256=sha256, class_names=class_names, metadata=metadata,
                   feature_names=first.feature_names, preprocessing=dict(first.preprocessing), extras=extras,
                   ground_truth_columns=truth, task=first.task, split_sources=split_sources)


def dataset_disagreement(a, b) -> str | None:
    if a.sample_shape != b.sample_shape:
        return f"sample shape ({b.sample_shape}, not {a.sample_shape})"
    if a.task != b.task:
        return f"task ({b.task}, not {a.task})"
    if a.y.ndim != b.y.ndim or a.y.shape[1:] != b.y.shape[1:]:
        return "labels' shape"
    if a.class_names and b.class_names and tuple(a.class_names) != tuple(b.class_names):
        return f"class names ({', '.join(map(str, b.class_names[:6]))})"
    if tuple(a.feature_names or ()) != tuple(b.feature_names or ()):
        return "feature names"
    if json.dumps(a.preprocessing, sort_keys=True, default=str) != json.dumps(b.preprocessing, sort_keys=True,
                                                                                default=str):
        return "preprocessing (image size, mean and std, token layout)"
    return None


def with_split_column(dataset, column: str | None):
    """`dataset` with its split read from the metadata `column` (`--split-column`), kept as text under `split`.

    None reads a column called `split` when there is one, and otherwise leaves the dataset as it is."""
    meta = dataset.metadata
    if column is None:
        if SPLIT_COLUMN not in meta.columns:
            return dataset
        column = SPLIT_COLUMN
    elif column not in meta.columns:
        listed = ", ".join(map(str, list(meta.columns)[:8])) or "none"
        raise AnalyzerError(f"the dataset has no column {column!r} to read splits from (its other columns: "
                            f"{listed}): pass an existing text column to --split-column")
    values = meta[column]
    if values.isna().any():
        raise AnalyzerError(f"column {column!r} leaves {int(values.isna().sum())} rows without a split: name "
                            f"every row's split")
    text = values.map(str)
    names = list(pd.unique(text))
    if len(names) > MAX_SPLITS:
        raise AnalyzerError(f"column {column!r} names {len(names)} splits, more than {MAX_SPLITS}: is it the "
                            f"split column? Pass the right one to --split-column")
    for name in names:
        check_split_name(name)
    meta = meta.drop(columns=[column]).assign(**{SPLIT_COLUMN: text.to_numpy(dtype=object)})
    return replace(dataset, metadata=meta.reset_index(drop=True))


def split_names(samples: pd.DataFrame) -> list:
    """The splits of a run's samples table, in the order their rows come; [] for a run over one dataset."""
    if SPLIT_COLUMN not in samples.columns:
        return []
    return [str(n) for n in pd.unique(samples[SPLIT_COLUMN])]


def train_and_eval(names) -> tuple:
    """(train split, evaluation split) among `names`: the gap is the evaluation split's metric against the
    training split's. A split called train/training, else the first whose name is not an evaluation name, else
    the first; a split called test/val/..., else the last other one. (None, None) with fewer than two splits."""
    names = list(names)
    if len(names) < 2:
        return None, None
    train = next((n for n in names if n.lower() in TRAIN_NAMES),
                 next((n for n in names if n.lower() not in EVAL_NAMES), names[0]))
    rest = [n for n in names if n != train]
    evaluation = next((n for n in rest if n.lower() in EVAL_NAMES), rest[-1])
    return train, evaluation
