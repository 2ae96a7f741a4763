"""Datasets in several files (shards): a directory of them, or a glob, read one by one and joined in name order.

A shard is any file `load_dataset` reads (`.npz`, `.csv`, `.parquet`, an image zip, or a `NAME.x.npy` pair), and
every shard of a dataset is the same kind of data, read with the same options. The joined dataset is what one file
holding the shards' rows in order would give: its ids are the shards' own while they are unique over all shards,
and row numbers 0..N-1 when every shard numbers its rows from 0 (a shard without ids); any other repeat is refused.
Its hash covers each shard's name and hash, so a run over shards is reused, and checked, like any other.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from ..errors import AnalyzerError

if TYPE_CHECKING:
    from .datasets import Dataset

SHARD_SUFFIXES = (".npz", ".csv", ".parquet", ".zip")
GLOB_CHARACTERS = "*?["
MAX_SHARDS = 100_000


def is_sharded(spec: str) -> bool:
    """Whether `spec` names several files: a directory, or a pattern with glob characters."""
    return any(c in spec for c in GLOB_CHARACTERS) or Path(spec).is_dir()


def shard_paths(spec: str) -> list[Path]:
    """The shard files of `spec` in name order: a directory's dataset files (a `.npy` pair counts once, by its
    `NAME.x.npy`), or the files a glob matches. Raises when there are none."""
    from .datasets import NPY_PAIR_SUFFIX

    if Path(spec).is_dir():
        candidates = sorted(p for p in Path(spec).iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        candidates = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
    shards = [p for p in candidates if p.name.endswith(NPY_PAIR_SUFFIX)
              or (p.suffix.lower() in SHARD_SUFFIXES and not p.name.endswith(".npy"))]
    if not shards:
        raise AnalyzerError(f"{spec!r} matches no dataset files: a directory or glob of shards holds .npz, .csv, "
                            f".parquet or image .zip files, or NAME.x.npy beside NAME.y.npy")
    if len(shards) > MAX_SHARDS:
        raise AnalyzerError(f"{spec!r} matches {len(shards)} files, more than {MAX_SHARDS}: join them into fewer, "
                            f"larger shards")
    return shards


def load_shards(spec: str, *, load: Callable[[str], "Dataset"]) -> "Dataset":
    """The dataset of every shard of `spec`, each read by `load(path)`, joined in name order (one shard: as it
    is, under the directory's or glob's spec and hash)."""
    paths = shard_paths(spec)
    parts = [load(str(p)) for p in paths]
    return join_shards(parts, names=[p.name for p in paths], spec=spec)


def join_shards(parts: list, *, names: list, spec: str) -> "Dataset":
    """One dataset of `parts` in order (see the module's docstring for ids); `names` name them in errors."""
    from dataclasses import replace

    from .splits import concatenate_datasets, dataset_disagreement, joined_metadata

    for name, part in zip(names[1:], parts[1:]):
        what = dataset_disagreement(parts[0], part)
        if what:
            raise AnalyzerError(f"shard {name!r} differs from shard {names[0]!r} in its {what}: every shard must be "
                                f"the same kind of data")
    digest = hashlib.sha256(json.dumps([[n, p.sha256] for n, p in zip(names, parts)]).encode()).hexdigest()
    if len(parts) == 1:
        return replace(parts[0], spec=spec, sha256=digest)
    ids = _joined_ids(parts, names)
    return concatenate_datasets(parts, ids=ids, metadata=joined_metadata(parts), spec=spec, sha256=digest)


def _joined_ids(parts: list, names: list) -> np.ndarray:
    ids = [np.asarray(p.ids) for p in parts]
    kinds = {i.dtype.kind for i in ids}
    joined = np.concatenate([i.astype(str) if len(kinds) > 1 else i for i in ids])
    if not pd.Series(joined).duplicated().any():
        return joined
    if all(i.dtype.kind in "iu" and np.array_equal(i, np.arange(len(i))) for i in ids):
        return np.arange(len(joined))  # shards without ids: rows numbered over the whole dataset
    repeated = pd.Series(joined)[pd.Series(joined).duplicated()].astype(str).unique()[:5]
    raise AnalyzerError(f"ids repeat across the shards ({', '.join(repeated)}): give every sample of every shard "
                        f"its own id, or leave ids out of all shards")
