"""Loading datasets (`sample:NAME`, `.npz`, `.csv`, `.parquet`, image-folder `.zip`) and checking them against a model."""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import math
import os
import posixpath
import threading
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..arrays import empty_array
from ..errors import AnalyzerError, first_line
from .hashing import digest_file, file_fingerprint, prefetch_sha256_file, sha256_bytes, sha256_file
from .sample_table import ids_unique

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A zip bomb is refused before it is inflated (declared size) and while it is read (actual size).
MAX_UNCOMPRESSED_BYTES = 2 << 30
MAX_COMPRESSION_RATIO = 200
MAX_IMAGE_PIXELS = 64_000_000
NPZ_HINT = "save it with np.savez(path, x=..., y=...)"
# What zipfile raises for a damaged archive, member by member.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Dataset:
    """Inputs, labels and per-sample information, row i of every array belonging to sample i."""

    x: np.ndarray  # float32, (N, *sample_shape)
    y: np.ndarray  # int64 labels
    ids: np.ndarray  # the dataset's ids, else 0..N-1
    spec: str
    sha256: str
    class_names: tuple | None = None
    metadata: pd.DataFrame = field(default_factory=pd.DataFrame)
    feature_names: tuple | None = None
    preprocessing: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # per-sample arrays that do not fit a table, e.g. ground-truth masks
    # metadata columns holding planted answers (a sample's flipped labels): shown, never used to find explanations
    ground_truth_columns: tuple = ()
    # the task its labels were read for (analyzers.evaluation.tasks): class indices, or real targets for regression
    task: str = "classification"
    # a run over several split files (splits.combine_splits): each part's {name, spec, sha256, num_samples}
    split_sources: tuple = ()

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def attribution_shape(self) -> tuple:
        """One sample's attribution shape: the sample's, or one score per token for token ids."""
        inputs = self.preprocessing.get("inputs")
        return (int(inputs["inputs"][0]["shape"][0]),) if inputs else self.sample_shape

    @property
    def modality(self) -> str:
        if self.preprocessing.get("inputs"):  # token ids (and a mask) packed in rows: see inputs.InputLayout
            return "tokens"
        return {1: "tabular", 2: "sequence", 3: "image"}.get(self.x.ndim - 1, "other")


def load_dataset(spec, *, model=None, label_column: str = "label", id_column: str | None = None,
                 features: list | None = None, image_size: tuple | None = None, mean: list | None = None,
                 std: list | None = None, task: str | None = None, split_column: str | None = None,
                 memory_map: bool = False) -> Dataset:
    """Load `sample:NAME` (its test split, or every split of a sample that runs over several) or a file, or a
    {split name: spec} mapping of them (`splits.combine_splits`, each part read with the same options).
    `model` (a LoadedModel) supplies image size, channels and names.
    `task` (one of `tasks.TASK_NAMES`) says how the labels are read; None infers it from the labels and the model's
    output (`tasks.resolve_task`), asking for it when two readings fit. `split_column` names a column that holds
    each row's split (`splits.with_split_column`; a column called `split` is read as one unasked).
    `memory_map` maps the arrays of an uncompressed `.npz` on disk copy-on-write instead of reading them (a
    reload whose file hash is then checked against the run's, as `load_run_inputs` does: the member's CRC is not
    read); other files are read as ever. A new run reads its dataset with `open_dataset`."""
    return _opened(spec, dict(model=model, label_column=label_column, id_column=id_column, features=features,
                              image_size=image_size, mean=mean, std=std, task=task, split_column=split_column),
                   memory_map=memory_map, defer=False).checked()


def open_dataset(spec, *, model=None, label_column: str = "label", id_column: str | None = None,
                 features: list | None = None, image_size: tuple | None = None, mean: list | None = None,
                 std: list | None = None, task: str | None = None, split_column: str | None = None) -> PendingDataset:
    """`load_dataset` for a new run, which can start computing before the file's slowest checks end. The arrays of
    an uncompressed `.npz` are memory-mapped copy-on-write (1.2 GB had taken 0.78 s to read), and the file's
    SHA-256 and those members' CRCs are computed in one read in a background thread (`hashing.digest_file`);
    a `.npy` pair's hashes too. The run pauses that thread while its inference runs (`PendingDataset.paused`)
    and calls `checked()` before it stores anything. Every other check (headers, sizes, labels, ids) has run
    when this returns. Other specs are read as `load_dataset` reads them."""
    return _opened(spec, dict(model=model, label_column=label_column, id_column=id_column, features=features,
                              image_size=image_size, mean=mean, std=std, task=task, split_column=split_column),
                   memory_map=True, defer=True)


class PendingDataset:
    """A dataset read by `open_dataset`: `dataset` can be computed on at once, its `sha256` empty until
    `checked()`. A background thread, started here, hashes each of `files` ({path: its `file_fingerprint` before
    its first byte was read}) and computes the CRCs of `crc_ranges` ({path: [(start, length, CRC, member)]});
    `digest(digests by path)` gives the dataset's sha256. `checked()` waits for it, refuses a damaged file or one
    changed since it was opened in one line, and returns the dataset with its hash; `close()` stops the thread
    of a run that ended without it."""

    def __init__(self, dataset: Dataset, *, files: dict | None = None, crc_ranges: dict | None = None,
                 digest=None):
        self.dataset = dataset
        self._files = dict(files or {})
        self._sha256: str | None = None if self._files else dataset.sha256
        self._gate = threading.Event()  # open: the thread may read; `paused` closes it
        self._gate.set()
        self._stop = threading.Event()
        self._done = concurrent.futures.Future()
        if self._files:
            try:
                threading.Thread(target=self._check, args=(dict(crc_ranges or {}), digest), name="dataset checks",
                                 daemon=True).start()
            except RuntimeError as exc:  # no thread to be had (a process at its limit): one line, not a traceback
                raise AnalyzerError(f"the dataset's checks could not start ({first_line(exc)}): run it again with "
                                    f"fewer runs at once") from exc

    def _check(self, crc_ranges: dict, digest) -> None:
        try:
            digests = {}
            for path in self._files:
                ranges = crc_ranges.get(path, [])
                digests[path], crcs = digest_file(path, gate=self._gate, stop=self._stop,
                                                  crc_ranges=[(start, length) for start, length, _, _ in ranges])
                for (_, _, expected, member), crc in zip(ranges, crcs):
                    if crc != expected:
                        raise AnalyzerError(f"{member!r} in {path.name!r} fails its checksum: the file is damaged; "
                                            f"{NPZ_HINT}")
            self._done.set_result(digest(digests))
        except BaseException as exc:  # noqa: BLE001 - raised again by checked(), in the caller's thread
            self._done.set_exception(exc)

    @contextlib.contextmanager
    def paused(self):
        """The checks wait while this is entered (a run's inference, which uses every core), and go on after."""
        self._gate.clear()
        try:
            yield
        finally:
            self._gate.set()

    def close(self) -> None:
        """Stop the checks if they still run (a run that failed before `checked()`); nothing if they are done."""
        self._stop.set()
        self._gate.set()

    def checked(self) -> Dataset:
        """The dataset with its sha256, once its checks pass and no file changed since it was opened. Called again
        (before a run's inference where the hash was needed first, then before it stores anything), it checks the
        files again: a mapped file written meanwhile may have fed the run its new bytes."""
        failure = None
        if self._sha256 is None:
            self._gate.set()
            try:
                self._sha256 = self._done.result()
            except AnalyzerError as exc:
                failure = exc
            except Exception as exc:  # noqa: BLE001 - digest_file's OSError (the file went away, or changed), or any
                failure = AnalyzerError(f"{self.dataset.spec!r} could not be hashed ({first_line(exc)}): leave the "
                                        f"file as it is while a run reads it, and run it again")
        # after the checks, so that a file written again meanwhile is named as that, not as damaged: a mapped
        # file's pages are read as the run goes, and may hold its new bytes
        for path, before in self._files.items():
            try:
                unchanged = file_fingerprint(path) == before
            except OSError:
                unchanged = False
            if not unchanged:
                raise AnalyzerError(f"{path.name!r} changed while the run read it: nothing was stored; leave the "
                                    f"file as it is while a run reads it, and run it again") from failure
        if failure is not None:
            raise failure
        return replace(self.dataset, sha256=self._sha256) if self._files else self.dataset


def _opened(spec, options: dict, *, memory_map: bool, defer: bool) -> PendingDataset:
    """The dataset at `spec` read with `options` (`load_dataset`'s), its slow checks left running where `defer`."""
    if isinstance(spec, dict):
        from .splits import check_split_specs, combine_splits

        if options["split_column"] is not None:
            raise AnalyzerError("--split-column reads the splits of one file; with a file per split leave it out")
        # each part read as load_dataset reads it: a run's are not mapped, so that their CRCs are checked as read
        return PendingDataset(combine_splits({name: load_dataset(part, memory_map=memory_map and not defer,
                                                                 **options)
                                              for name, part in check_split_specs(spec).items()}))
    if not isinstance(spec, str) or not spec:
        raise AnalyzerError("no dataset given: pass sample:NAME, a .npz, .csv, .parquet or image-folder .zip "
                            "file, a NAME.x.npy beside NAME.y.npy, or a directory or glob of such files")
    if spec.startswith("sample:"):
        from .splits import with_split_column

        return PendingDataset(with_split_column(_load_sample(spec, task=options["task"]), options["split_column"]))
    from .shards import is_sharded, load_shards

    if is_sharded(spec):  # a directory or glob of files, read one by one and joined in name order
        return PendingDataset(load_shards(spec, load=lambda part: load_dataset(
            part, memory_map=memory_map and not defer, **options)))  # as the splits' parts, above
    path = Path(spec)
    if spec.endswith(NPY_PAIR_SUFFIX):
        return _load_npy_pair(path, spec=spec, model=options["model"], task=options["task"],
                              split_column=options["split_column"], defer=defer)
    if not path.is_file():
        raise AnalyzerError(f"dataset file {spec!r} does not exist: check the path")
    if path.stat().st_size == 0:
        raise AnalyzerError(f"dataset file {path.name!r} is empty: write the file again")
    # Read from the file itself (hashed as a stream), so a large dataset is never held twice in memory. The hash
    # runs in a thread beside the reading (hashlib and the file reads release the GIL): 1.2 GB took 0.8 s to hash
    # and as long again to read, one after the other. sha256_file then waits for that hash.
    if defer and path.suffix.lower() == ".npz":  # mapped, its hash and CRCs left to PendingDataset's thread
        opened = file_fingerprint(path)
        crc_ranges = []
        dataset = _load_source(path, name=path.name, spec=spec, digest="", memory_map=True, crc_ranges=crc_ranges,
                               **options)
        return PendingDataset(dataset, files={path: opened}, crc_ranges={path: crc_ranges},
                              digest=lambda digests: digests[path])
    prefetch_sha256_file(path)
    dataset = _load_source(path, name=path.name, spec=spec, digest="", memory_map=memory_map, **options)
    return PendingDataset(replace(dataset, sha256=sha256_file(path)))


# `NAME.x.npy` beside `NAME.y.npy` (and `NAME.ids.npy`, optional): inputs read memory-mapped, never copied whole
NPY_PAIR_SUFFIX = ".x.npy"


def npy_pair_members(path: Path) -> dict:
    """The files of the `.npy` pair whose inputs are at `path` (`NAME.x.npy`): {"x", "y", and "ids" if present}."""
    stem = path.name[:-len(NPY_PAIR_SUFFIX)]
    members = {"x": path, "y": path.with_name(f"{stem}.y.npy")}
    if path.with_name(f"{stem}.ids.npy").is_file():
        members["ids"] = path.with_name(f"{stem}.ids.npy")
    return members


def _load_npy_pair(path: Path, *, spec: str, model, task, split_column, defer: bool = False) -> PendingDataset:
    """A `.npy` pair: x memory-mapped (a float32 C-order file is used in place; rows are copied batch by batch
    by inference), y and ids read whole. The hash covers every member, in a fixed order; with `defer` it is left
    running beside the run (`open_dataset`)."""
    if not path.is_file():
        raise AnalyzerError(f"dataset file {spec!r} does not exist: check the path")
    members = npy_pair_members(path)
    for key, member in members.items():
        if not member.is_file():
            raise AnalyzerError(f"{path.name!r} has no {member.name!r} beside it: save the labels with "
                                f"np.save({member.name!r}, y) next to the inputs")
    opened = {member: file_fingerprint(member) for member in members.values()}

    def digest(digests: dict) -> str:
        return hashlib.sha256("".join(f"{key}:{digests[member]};" for key, member in members.items())
                              .encode()).hexdigest()

    arrays = {}
    for key, member in members.items():
        try:
            arrays[key] = np.load(member, mmap_mode="r" if key == "x" else None, allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError for a pickle and many types for a damaged header
            raise AnalyzerError(f"{member.name!r} is not a .npy array ({first_line(exc)}): save it with np.save, "
                                f"without object arrays") from exc
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or y.ndim not in (1, 2) or len(y) != len(x):
        raise AnalyzerError(f"{path.name!r} holds x of shape {x.shape} and y of shape {y.shape}: x must be (N, ...) "
                            f"and y one label per sample (or one 0/1 row of K labels)")
    x = _numeric_inputs(x, path.name)
    y, task = _task_labels(y, path.name, class_names=None, task=task, model=model)
    ids = arrays.get("ids", np.arange(len(x)))
    if ids.shape != (len(x),):
        raise AnalyzerError(f"{members['ids'].name!r} has shape {ids.shape}; expected one id per sample ({len(x)})")
    from .splits import with_split_column

    dataset = with_split_column(_finish(x, y, ids, spec=spec, digest="", class_names=None, metadata=pd.DataFrame(),
                                        name=path.name, task=task), split_column)
    if defer:
        return PendingDataset(dataset, files=opened, digest=digest)
    return PendingDataset(replace(dataset, sha256=digest({member: sha256_file(member) for member in members.values()})))


def load_dataset_bytes(data: bytes, *, name: str, spec: str | None = None, model=None, label_column: str = "label",
                       id_column: str | None = None, features: list | None = None, image_size: tuple | None = None,
                       mean: list | None = None, std: list | None = None, task: str | None = None,
                       split_column: str | None = None) -> Dataset:
    """Load a dataset from the bytes of a file called `name` (an upload); see `load_dataset`."""
    if not data:
        raise AnalyzerError(f"dataset file {name!r} is empty: upload the file again")
    return _load_source(io.BytesIO(data), name=name, spec=spec or name, digest=sha256_bytes(data),
                        model=model, label_column=label_column, id_column=id_column, features=features,
                        image_size=image_size, mean=mean, std=std, task=task, split_column=split_column)


def load_dataset_file(fh, *, name: str, spec: str, model=None, label_column: str = "label",
                      id_column: str | None = None, features: list | None = None, image_size: tuple | None = None,
                      mean: list | None = None, std: list | None = None, task: str | None = None,
                      split_column: str | None = None) -> Dataset:
    """Load a dataset from an open binary file called `name` (what a sandboxed worker is handed); see
    `load_dataset`. The file is hashed as a stream, then read from the start."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    if fh.tell() == 0:
        raise AnalyzerError(f"dataset file {name!r} is empty: write the file again")
    fh.seek(0)
    return _load_source(fh, name=name, spec=spec, digest=digest.hexdigest(), model=model, label_column=label_column,
                        id_column=id_column, features=features, image_size=image_size, mean=mean, std=std, task=task,
                        split_column=split_column)


def describe_dataset(dataset: Dataset) -> dict:
    """What a run records about its dataset (and what a worker tells its parent): JSON values only."""
    return {"spec": dataset.spec, "sha256": dataset.sha256, "modality": dataset.modality,
            "num_samples": int(len(dataset)),
            "class_names": list(dataset.class_names) if dataset.class_names else None,
            "feature_names": list(dataset.feature_names) if dataset.feature_names else None,
            "metadata_columns": [str(c) for c in dataset.metadata.columns],
            "ground_truth_columns": list(dataset.ground_truth_columns),
            "preprocessing": dict(dataset.preprocessing), "task": dataset.task,
            "split_sources": [dict(s) for s in dataset.split_sources]}


# What a worker may hand its parent: a loader turns at most MAX_UNCOMPRESSED_BYTES of file content into float32
# inputs, and 8-bit pixels become 4-byte floats, so no dataset that passed the loaders is larger than this.
MAX_DATASET_BYTES = 4 * MAX_UNCOMPRESSED_BYTES


def dataset_fields(dataset: Dataset) -> dict:
    """`dataset` as values that cross the worker boundary (`analyzers.loading.wire`): arrays, a table and text."""
    def text_or_array(values: np.ndarray):
        return [str(v) for v in values.tolist()] if values.dtype.kind in "OUS" else values

    return {"x": dataset.x, "y": dataset.y, "ids": text_or_array(np.asarray(dataset.ids)), "spec": dataset.spec,
            "sha256": dataset.sha256, "class_names": list(dataset.class_names) if dataset.class_names else None,
            "metadata": dataset.metadata, "feature_names": list(dataset.feature_names) if dataset.feature_names
            else None, "preprocessing": dict(dataset.preprocessing),
            "extras": {str(k): np.asarray(v) for k, v in dataset.extras.items()},
            "ground_truth_columns": list(dataset.ground_truth_columns), "task": dataset.task,
            "split_sources": [dict(s) for s in dataset.split_sources]}


def dataset_from_fields(fields) -> Dataset:
    """The `Dataset` a worker described with `dataset_fields`, every field checked: a worker is not trusted."""
    def bad(what: str) -> AnalyzerError:
        return AnalyzerError(f"the worker sent a dataset whose {what}; it was not used")

    if not isinstance(fields, dict):
        raise bad("form is not a table of fields")
    x, y = fields.get("x"), fields.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
        raise bad("inputs are not a float32 array of samples")
    n = len(x)
    from ..evaluation.tasks import TASK_NAMES, resolve_task

    task = fields.get("task", "classification")
    if task not in TASK_NAMES:
        raise bad("task is not one this dashboard reads")
    label_task = resolve_task(task, y, None) if isinstance(y, np.ndarray) else None
    try:  # the labels as the task reads them (regression: finite float64; multi-label: (N, K) 0/1; classes: int64
        # indices, whose range against the model the worker checked)
        ok = label_task is not None and len(y) == n and y.dtype == label_task.label_dtype and (
            (y.ndim == 1 and (y >= 0).all()) if label_task.has_classes else
            np.array_equal(label_task.check_labels(y), y))
    except AnalyzerError:
        ok = False
    if not ok:
        raise bad(f"labels are not one {label_task.label_form if label_task else 'label'} per sample")
    ids = fields.get("ids")
    ids = np.asarray(ids) if isinstance(ids, (list, np.ndarray)) else None
    if ids is None or ids.shape != (n,) or ids.dtype.kind not in "iuU":
        raise bad("ids are not one integer or text per sample")
    metadata = fields.get("metadata")
    if not isinstance(metadata, pd.DataFrame) or (len(metadata.columns) and len(metadata) != n):
        raise bad("metadata is not one row per sample")
    extras = fields.get("extras") or {}
    if not isinstance(extras, dict) or not all(isinstance(v, np.ndarray) and len(v) == n for v in extras.values()):
        raise bad("extra arrays are not one entry per sample")
    names = {}
    for key in ("class_names", "feature_names", "ground_truth_columns"):
        value = fields.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad(f"{key.replace('_', ' ')} are not text")
        names[key] = tuple(value) if value is not None else None
    if not all(isinstance(fields.get(key), str) for key in ("spec", "sha256")) or \
            not isinstance(fields.get("preprocessing"), dict):
        raise bad("description is incomplete")
    from .splits import checked_split_sources

    sources = checked_split_sources(fields.get("split_sources") or [])
    if sources is None:
        raise bad("split files are not described as {name, spec, sha256, num_samples}")
    return Dataset(x=x, y=y, ids=ids, spec=fields["spec"], sha256=fields["sha256"], class_names=names["class_names"],
                   metadata=metadata,
                   feature_names=names["feature_names"], preprocessing=fields["preprocessing"], extras=extras,
                   ground_truth_columns=names["ground_truth_columns"] or (), task=task, split_sources=sources)


def _load_source(source, *, name: str, spec: str, digest: str, model, label_column: str, id_column, features,
                 image_size, mean, std, task=None, split_column=None, memory_map: bool = False,
                 crc_ranges: list | None = None) -> Dataset:
    """Load from `source`, a path or a binary file object, by the suffix of `name`, its splits read from
    `split_column` (`splits.with_split_column`). `crc_ranges`: see `read_npz_bounded`."""
    from .splits import with_split_column

    return with_split_column(_read_source(source, name=name, spec=spec, digest=digest, model=model,
                                          label_column=label_column, id_column=id_column, features=features,
                                          image_size=image_size, mean=mean, std=std, task=task,
                                          split_column=split_column, memory_map=memory_map,
                                          crc_ranges=crc_ranges), split_column)


def _read_source(source, *, name: str, spec: str, digest: str, model, label_column: str, id_column, features,
                 image_size, mean, std, task=None, split_column=None, memory_map: bool = False,
                 crc_ranges: list | None = None) -> Dataset:
    from ..evaluation.tasks import TASK_NAMES

    if task is not None and task not in TASK_NAMES:
        raise AnalyzerError(f"unknown task {task!r}: choose one of {', '.join(TASK_NAMES)}")
    suffix = Path(name).suffix.lower()
    if suffix == ".npz":
        return _load_npz(source, name, spec, digest, model=model, task=task, memory_map=memory_map,
                         crc_ranges=crc_ranges)
    if suffix in (".csv", ".parquet"):
        table = _read_table(source, name, suffix)
        return _from_table(table, name, spec, digest, model=model, label_column=label_column, id_column=id_column,
                           features=features, task=task, split_column=split_column)
    if suffix == ".zip":
        if task is not None and task not in ("classification", "binary"):
            raise AnalyzerError(f"{name!r} is a zip of image folders, whose names are classes: a {task} dataset "
                                f"is an .npz (x and y: real targets, or a multi-hot (N, K) array)"
                                f"{' or a table with a target column' if task == 'regression' else ''}")
        return _load_image_zip(source, name, spec, digest, model=model, image_size=image_size, mean=mean, std=std)
    raise AnalyzerError(f"{name!r} is not a supported dataset file: use .npz (arrays x and y), .csv or .parquet "
                        f"(a label column), or a .zip of image folders (one folder per class)")


def _load_sample(spec: str, *, task: str | None = None) -> Dataset:
    """A sample's test split, or, for a sample that runs over several (`Sample.run_splits`), all of them with a
    `split` column (`splits.combine_splits`)."""
    from sample_models import SAMPLE_NAMES, get_sample

    name = spec.split(":", 1)[1]
    if name not in SAMPLE_NAMES:
        raise AnalyzerError(f"unknown sample dataset {name!r}: choose one of {', '.join(SAMPLE_NAMES)}")
    sample = get_sample(name)
    run_splits = tuple(getattr(sample, "run_splits", ()) or ())
    if not run_splits:
        return _sample_split(sample, spec, "test", task=task)
    from .splits import combine_splits

    combined = combine_splits({split: _sample_split(sample, f"{spec}:{split}", split, task=task)
                               for split in run_splits})
    # the sample is one spec (it reloads every split), not a file per split
    return replace(combined, spec=spec, split_sources=())


def _sample_split(sample, spec: str, split: str, *, task: str | None) -> Dataset:
    data = sample.load_data(split)
    x = np.ascontiguousarray(data.x, dtype=np.float32)
    from ..evaluation.tasks import resolve_task

    name = sample.name
    declared = getattr(sample, "task", "classification")  # a sample states its own task
    sample_task = resolve_task(declared, data.y, None)
    # binary is classification's two-class case: either name fits a two-class sample
    if task is not None and task != declared and not (sample_task.has_classes and task in ("binary", "classification")):
        raise AnalyzerError(f"the sample {name!r} is a {declared} sample, not {task}: leave --task out")
    y = np.asarray(data.y, dtype=sample_task.label_dtype)
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    ids = np.asarray(data.ids) if data.ids is not None else np.arange(len(y))
    layout = getattr(sample.module, "INPUT_LAYOUT", None)  # a token sample: packed ids and mask, and its words
    preprocessing = {} if layout is None else {"inputs": layout.to_json(), "vocabulary": list(sample.module.VOCAB)}
    spectrogram = getattr(sample.module, "spectrogram_description", None)  # an audio sample: how to draw and play it
    if spectrogram is not None:
        preprocessing["spectrogram"] = spectrogram()
    return Dataset(x=x, y=y, ids=ids, spec=spec, sha256=digest, class_names=sample.class_names,
                   metadata=pd.DataFrame({k: np.asarray(v) for k, v in data.metadata.items()}),
                   feature_names=data.feature_names, extras=dict(data.extras), preprocessing=preprocessing,
                   ground_truth_columns=tuple(data.ground_truth), task=declared)


def _load_npz(source, name: str, spec: str, digest: str, *, model=None, task=None,
              memory_map: bool = False, crc_ranges: list | None = None) -> Dataset:
    from .inputs import layout_of

    arrays = read_npz_bounded(source, name, memory_map=memory_map, crc_ranges=crc_ranges)
    layout = layout_of(model) if model is not None else None
    preprocessing = {}
    if layout is not None and layout.packed:  # token ids and the model's other inputs, each under its own name
        if layout.inputs[0].name not in arrays and "x" in arrays:
            arrays[layout.inputs[0].name] = arrays.pop("x")
        if "y" not in arrays:
            raise AnalyzerError(f"{name!r} has no array y: save integer labels as y")
        x = layout.pack(arrays, repr(name))
        for item in layout.inputs:
            arrays.pop(item.name)
        preprocessing["inputs"] = layout.to_json()
    else:
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise AnalyzerError(f"{name!r} has no array {' or '.join(missing)} (found: {', '.join(arrays) or 'none'}):"
                                f" save inputs as x and integer labels as y")
        x = arrays.pop("x")
        if x.ndim < 2:
            raise AnalyzerError(f"x in {name!r} has shape {x.shape}; expected (N, features) or (N, C, ...) ")
    y = arrays.pop("y")
    n = len(x)
    if y.ndim not in (1, 2) or len(y) != n:
        raise AnalyzerError(f"y in {name!r} has shape {y.shape} but x has {n} samples: y must be one label per "
                            f"sample, or one 0/1 row of K labels per sample for a multi-label dataset")
    x = _numeric_inputs(x, name)
    y, task = _task_labels(y, name, class_names=None, task=task, model=model)
    class_names = tuple(str(c) for c in arrays.pop("class_names")) if "class_names" in arrays else None
    ids = arrays.pop("ids") if "ids" in arrays else np.arange(n)
    if ids.shape != (n,):
        raise AnalyzerError(f"ids in {name!r} has shape {ids.shape}; expected one id per sample ({n})")
    metadata, extras = {}, {}
    for key, value in arrays.items():
        if value.ndim == 1 and len(value) == n:
            metadata[key] = value
        elif value.ndim > 1 and len(value) == n:
            extras[key] = value
    return _finish(x, y, ids, spec=spec, digest=digest, class_names=class_names, metadata=pd.DataFrame(metadata),
                   extras=extras, name=name, preprocessing=preprocessing, task=task)


def read_npz_bounded(source, name: str, *, budget: int = MAX_UNCOMPRESSED_BYTES, memory_map: bool = False,
                     crc_ranges: list | None = None) -> dict:
    """Every array of an `.npz`, read without trusting any size in it and without unpickling.

    `np.load` allocates what a member's `.npy` header declares and inflates as much as the stream holds: an 8 MB
    deflate bomb then takes 8 GiB and a header declaring 4 TiB ends in a MemoryError. Here every header is parsed
    first; the arrays' declared bytes, all together, must fit `budget` and each member's size in the zip directory
    before anything is allocated; then exactly the declared bytes are inflated into each array (a longer stream is
    never read, a shorter one is refused). With `memory_map`, an uncompressed member of a file on disk is mapped
    copy-on-write (its pages read when used; writes stay in this process), its CRC not read; or, given a list
    `crc_ranges`, left to whoever reads that list: (start, length, CRC, member name) of the bytes the CRC covers.
    """
    try:
        archive = zipfile.ZipFile(source)
        infos = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise AnalyzerError(f"{name!r} is not a readable .npz file (not a zip archive): {NPZ_HINT}") from exc
    with archive:
        headers, declared_total = {}, 0
        for info in infos:  # first pass: headers only
            member = info.filename
            key = member[:-4]
            climbs = member.startswith("/") or "\\" in member or ".." in member.split("/")
            if info.is_dir() or not member.endswith(".npy") or climbs:
                raise AnalyzerError(f"{name!r} holds {member!r}, which is not an array written by np.savez: "
                                    f"{NPZ_HINT}")
            if key in headers:
                raise AnalyzerError(f"{name!r} holds the array {key!r} twice: {NPZ_HINT}")
            with _member(archive, info, name) as fh:
                shape, fortran, dtype = _npy_header(fh, member, name)
                offset = fh.tell()
            nbytes = math.prod(shape) * dtype.itemsize
            declared_total += nbytes
            if declared_total > budget:
                raise AnalyzerError(f"{name!r} declares {declared_total:,} bytes of arrays (up to {key!r}, shape "
                                    f"{shape}), over the {budget:,}-byte limit: refused before reading; use a "
                                    f"smaller dataset or split it")
            if info.file_size < offset + nbytes:
                raise AnalyzerError(f"{member!r} in {name!r} declares {nbytes:,} bytes but holds "
                                    f"{max(info.file_size - offset, 0):,}: the file is truncated; write it again")
            headers[key] = (info, shape, fortran, dtype, offset, nbytes)
        arrays = {}
        for key, (info, shape, fortran, dtype, offset, nbytes) in headers.items():  # second pass: the data
            stored = _read_stored_member(archive, info, shape, fortran, dtype, offset, nbytes, name,
                                         memory_map=memory_map, crc_ranges=crc_ranges)
            if stored is not None:
                arrays[key] = stored
                continue
            with _member(archive, info, name) as fh:
                fh.read(offset)
                arrays[key] = _read_npy_data(fh, shape, fortran, dtype, nbytes, info.filename, name)
    return arrays


def _read_stored_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, shape, fortran, dtype, offset: int,
                        nbytes: int, name: str, *, memory_map: bool = False,
                        crc_ranges: list | None = None) -> np.ndarray | None:
    """An uncompressed member (`np.savez`, not `savez_compressed`) of an archive on disk, read straight into its
    array from the file, its CRC checked as zipfile would; None for a compressed or in-memory member, which
    zipfile reads. zipfile's reader copies a member several times over: 1.2 GB of images took 8.8 s through it
    and 0.4 s this way."""
    handle = archive.fp
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.compress_size != info.file_size \
            or not hasattr(handle, "fileno"):
        return None
    try:
        handle.fileno()
    except (OSError, io.UnsupportedOperation):
        return None
    handle.seek(info.header_offset)
    local = handle.read(zipfile.sizeFileHeader)
    if len(local) != zipfile.sizeFileHeader or local[:4] != zipfile.stringFileHeader:
        raise AnalyzerError(f"{info.filename!r} in {name!r} has a damaged local header: the file is damaged; "
                            f"{NPZ_HINT}")
    fields = zipfile.struct.unpack(zipfile.structFileHeader, local)
    start = info.header_offset + zipfile.sizeFileHeader + fields[zipfile._FH_FILENAME_LENGTH] + \
        fields[zipfile._FH_EXTRA_FIELD_LENGTH]
    # the bytes must be in the file before any memory is taken for them: a few hundred bytes declaring 2 GB would
    # otherwise have the whole mapping populated (or a memory map reach past the end of the file)
    held = max(0, os.fstat(handle.fileno()).st_size - start - offset)
    if held < nbytes:
        raise AnalyzerError(f"{info.filename!r} in {name!r} ends after {held:,} of its {nbytes:,} bytes: the file is "
                            f"truncated; write it again")
    if memory_map and nbytes and isinstance(archive.filename, str) and not dtype.hasobject:
        mapped = np.memmap(archive.filename, dtype=dtype, mode="c", offset=start + offset, shape=shape,
                           order="F" if fortran else "C")
        if crc_ranges is not None and info.file_size == offset + nbytes:  # the CRC covers header and array
            crc_ranges.append((start, info.file_size, info.CRC, info.filename))
        return mapped
    handle.seek(start)
    header = handle.read(offset)
    flat = _filled(handle, shape, dtype, nbytes, info.filename, name, allocate=empty_array)
    view = memoryview(flat.view(np.uint8)) if nbytes else memoryview(b"")
    # bytes after the array (none from np.savez) are never read, as zipfile never reads them: the CRC covers the
    # whole member, so it is checked where the array fills it, as zipfile checks it at the member's end
    if info.file_size == offset + nbytes and zlib.crc32(view, zlib.crc32(header)) != info.CRC:
        raise AnalyzerError(f"{info.filename!r} in {name!r} fails its checksum: the file is damaged; {NPZ_HINT}")
    return flat.reshape(shape, order="F" if fortran else "C")


@contextlib.contextmanager
def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str):
    try:
        with archive.open(info) as fh:
            yield fh
    except AnalyzerError:
        raise
    except _ZIP_ERRORS as exc:
        raise AnalyzerError(f"{info.filename!r} in {name!r} cannot be read ({first_line(exc)}): the file is damaged; "
                            f"{NPZ_HINT}") from exc


def _npy_header(fh, member: str, name: str):
    """(shape, fortran_order, dtype) of one `.npy` member; refuses pickles and object arrays."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as exc:  # a header cut mid-dict
        raise AnalyzerError(f"{member!r} in {name!r} is not a .npy array ({first_line(exc)}); a pickled member is "
                            f"never read: save plain numeric and string arrays with np.savez") from exc
    if dtype.hasobject:
        raise AnalyzerError(f"{member!r} in {name!r} holds Python objects, which are never unpickled: save plain "
                            f"numeric and string arrays with np.savez")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise AnalyzerError(f"{member!r} in {name!r} declares the shape {shape!r}: the file is damaged")
    return tuple(shape), bool(fortran), dtype


def _filled(fh, shape: tuple, dtype, nbytes: int, member: str, name: str, *, allocate=np.empty) -> np.ndarray:
    """A flat array of `shape`'s size read from `fh`, exactly `nbytes`; a stream that ends first is refused.
    `allocate` is np.empty (pages taken as the bytes arrive: a deflated stream may end short of what it declares)
    or `arrays.empty_array` where the bytes are known to be there."""
    flat = allocate(math.prod(shape), dtype=dtype)
    view = memoryview(flat.view(np.uint8)) if nbytes else memoryview(b"")
    filled = 0
    while filled < nbytes:
        count = fh.readinto(view[filled:])
        if not count:
            raise AnalyzerError(f"{member!r} in {name!r} ends after {filled:,} of its {nbytes:,} bytes: the file is "
                                f"truncated; write it again")
        filled += count
    return flat


def _read_npy_data(fh, shape: tuple, fortran: bool, dtype, nbytes: int, member: str, name: str) -> np.ndarray:
    return _filled(fh, shape, dtype, nbytes, member, name).reshape(shape, order="F" if fortran else "C")


def _read_table(source, name: str, suffix: str) -> pd.DataFrame:
    try:
        if suffix == ".csv":
            return pd.read_csv(source)
        return pd.read_parquet(source)
    except Exception as exc:  # pandas and pyarrow raise many types for a damaged file; all mean the same here
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise AnalyzerError(f"{name!r} is not a readable {kind} file ({first_line(exc)}): check the file") from exc


def _from_table(table: pd.DataFrame, name: str, spec: str, digest: str, *, model, label_column: str,
                id_column: str | None, features: list | None, task=None, split_column=None) -> Dataset:
    if table.empty:
        raise AnalyzerError(f"{name!r} has no rows: a dataset needs at least one sample")
    label_columns = _label_columns(table, label_column, name, task=task)
    if id_column is not None and id_column not in table.columns:
        raise AnalyzerError(f"{name!r} has no id column {id_column!r}: pass an existing column to --id-column")
    if id_column is not None and len(label_columns) > 1 and id_column in label_columns:
        raise AnalyzerError(f"column {id_column!r} in {name!r} is both a label column and the id column: "
                            f"drop it from --label-column or from --id-column")
    reserved = {*label_columns, id_column, split_column}  # a split column is never an input, even when numeric
    from .inputs import layout_of

    layout = layout_of(model) if model is not None else None
    if layout is not None and layout.packed:
        return _packed_from_table(table, layout, name, spec, digest, model=model, label_column=label_column,
                                  id_column=id_column, task=task)
    named = tuple(getattr(model, "feature_names", None) or ()) if model is not None else ()
    if named:  # the model file names its features: columns are matched by name, in the model's order
        if features and list(features) != list(named):
            raise AnalyzerError(f"--features {','.join(map(str, features[:6]))} differs from the features the model "
                                f"file names ({', '.join(named[:6])}{', ...' if len(named) > 6 else ''}): leave "
                                f"--features out, and columns are matched by the model's names")
        absent = [f for f in named if f not in table.columns]
        if absent:
            raise AnalyzerError(f"{name!r} has no column {', '.join(map(repr, absent[:5]))}"
                                f"{' and more' if len(absent) > 5 else ''}, which the model file names as "
                                f"features: name the columns as the model does (its features: "
                                f"{', '.join(named[:8])}{', ...' if len(named) > 8 else ''})")
        feature_columns, order = list(named), "matched by name to the model file's feature names"
    elif features:
        absent = [f for f in features if f not in table.columns]
        if absent:
            raise AnalyzerError(f"feature columns {', '.join(absent)} are not in {name!r}: check --features")
        feature_columns, order = list(features), "as given by --features"
    else:
        order = "the file's column order (the model file names no features)"
        feature_columns = [c for c in table.columns
                           if c not in reserved and pd.api.types.is_numeric_dtype(table[c])
                           and not pd.api.types.is_bool_dtype(table[c])]
    if len(label_columns) > 1:  # a label is never also an input
        shared = [c for c in feature_columns if c in label_columns]
        if shared:
            raise AnalyzerError(f"column {shared[0]!r} in {name!r} is both a label column and a feature: drop it "
                                f"from --label-column or from the features")
    if not feature_columns:
        raise AnalyzerError(f"{name!r} has no numeric feature columns besides the label: check the file")
    if model is not None and len(model.input_shape) == 1 and len(feature_columns) != model.input_shape[0]:
        raise AnalyzerError(f"{name!r} has {len(feature_columns)} numeric feature columns but the model takes "
                            f"{model.input_shape[0]}: pass --features with the model's columns in order")
    x = _numeric_inputs(table[feature_columns].to_numpy(), name)
    y, task, label_names = _table_labels(table, label_columns, name, task=task, model=model)
    ids = table[id_column].to_numpy() if id_column else np.arange(len(table))
    meta_columns = [c for c in table.columns if c not in reserved and c not in feature_columns]
    return _finish(x, y, ids, spec=spec, digest=digest, class_names=label_names,
                   metadata=table[meta_columns].reset_index(drop=True), feature_names=tuple(map(str, feature_columns)),
                   name=name, preprocessing={"feature_order": order}, task=task)


def _label_columns(table: pd.DataFrame, label_column: str, name: str, *, task) -> list:
    """The label columns `--label-column` names: one column, or several separated by commas (a multi-label
    dataset, one 0/1 column per label). A column whose own name holds a comma is taken whole."""
    listed = ", ".join(map(str, table.columns[:12])) + (", ..." if len(table.columns) > 12 else "")
    if label_column in table.columns or "," not in str(label_column):
        if label_column not in table.columns:
            raise AnalyzerError(f"{name!r} has no label column {label_column!r} (columns: "
                                f"{', '.join(map(str, table.columns[:12]))}): pass --label-column")
        return [label_column]
    columns = [c.strip() for c in str(label_column).split(",")]
    if not all(columns):
        raise AnalyzerError(f"--label-column {label_column!r} has an empty name: separate the label columns by "
                            f"single commas, e.g. a,b,c")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise AnalyzerError(f"--label-column names {repeated[0]!r} twice: name each label column once")
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise AnalyzerError(f"{name!r} has no label column {absent[0]!r} (columns: {listed}): pass "
                            f"--label-column with existing columns, separated by commas")
    if task is not None and task != "multilabel":
        raise AnalyzerError(f"{len(columns)} label columns ({', '.join(columns)}) make a multi-label dataset, "
                            f"not {task}: pass --task multilabel (or leave --task out), or one --label-column")
    return columns


_TRUTH = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _multi_hot(table: pd.DataFrame, columns: list, name: str) -> np.ndarray:
    """(N, K) int64 0/1: the label columns in order, each holding only 0/1 or true/false."""
    out = np.empty((len(table), len(columns)), dtype=np.int64)
    for k, column in enumerate(columns):
        values = table[column]
        missing = values.isna().to_numpy()
        if missing.any():
            raise AnalyzerError(f"label column {column!r} in {name!r} has a missing value in row "
                                f"{int(np.argmax(missing))}: give every row 0 or 1 (or true/false) in each label "
                                f"column")
        if pd.api.types.is_bool_dtype(values):
            out[:, k] = values.to_numpy(dtype=bool)
            continue
        if pd.api.types.is_numeric_dtype(values):
            raw = values.to_numpy(dtype=np.float64)
            good = (raw == 0) | (raw == 1)
            read = raw
        else:
            text = values.map(lambda v: str(v).strip().lower())
            good = text.isin(list(_TRUTH)).to_numpy()
            read = text.map(_TRUTH).to_numpy()
        if not good.all():
            row = int(np.argmin(good))
            bad = values.iloc[row]
            bad = bad.item() if isinstance(bad, np.generic) else bad
            shown = int(bad) if isinstance(bad, float) and bad.is_integer() else bad
            raise AnalyzerError(f"label column {column!r} in {name!r} holds {shown!r} (row {row}), not 0/1: each "
                                f"label column of a multi-label table holds only 0 and 1 (or true and false)")
        out[:, k] = np.asarray(read, dtype=np.float64).astype(np.int64)
    return out


def _table_labels(table: pd.DataFrame, columns: list, name: str, *, task, model) -> tuple:
    """(labels, task name, label names) of a table: one label column read as `_task_labels` reads it (its names
    are the model's), or several 0/1 columns as a multi-hot (N, K) multi-label array named by its columns."""
    if len(columns) == 1:
        class_names = model.class_names if model is not None else None
        y, task = _task_labels(table[columns[0]].to_numpy(), name, class_names=class_names, task=task, model=model)
        return y, task, None
    y = _multi_hot(table, columns, name)
    if model is not None:
        from ..evaluation.tasks import output_width

        width = output_width(model)
        if width != len(columns):
            raise AnalyzerError(f"{name!r} has {len(columns)} label columns ({', '.join(columns)}) but the model "
                                f"has {width} output{'s' if width != 1 else ''}: a multi-label model gives one logit "
                                f"per label column, so name as many label columns as it has outputs, in its output "
                                f"order")
    y, task = _task_labels(y, name, class_names=None, task="multilabel", model=model)
    return y, task, tuple(str(c) for c in columns)


def packed_columns(item) -> list:
    """The table columns of one model input: `name` for a scalar per sample, else `name_0`, `name_1`, ..."""
    return [item.name] if item.size == 1 and not item.shape else [f"{item.name}_{i}" for i in range(item.size)]


def _packed_from_table(table: pd.DataFrame, layout, name: str, spec: str, digest: str, *, model, label_column: str,
                       id_column, task=None) -> Dataset:
    """Token ids and the model's other inputs from columns `input_ids_0 ... input_ids_{L-1}`, `attention_mask_0` ..."""
    arrays, used = {}, set()
    for item in layout.inputs:
        columns = packed_columns(item)
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise AnalyzerError(f"{name!r} has no column {absent[0]!r}: the model takes {item.name!r} "
                                f"({item.dtype}, {item.size} values per sample), read from columns "
                                f"{columns[0]} .. {columns[-1]}; or save the arrays in an .npz")
        arrays[item.name] = table[columns].to_numpy().reshape(len(table), *item.shape)
        used.update(columns)
    label_columns = _label_columns(table, label_column, name, task=task)
    shared = [c for c in label_columns if c in used] if len(label_columns) > 1 else []
    if shared:
        raise AnalyzerError(f"column {shared[0]!r} in {name!r} is both a label column and a model input: drop it "
                            f"from --label-column")
    x = _numeric_inputs(layout.pack(arrays, repr(name)), name)
    y, task, label_names = _table_labels(table, label_columns, name, task=task, model=model)
    ids = table[id_column].to_numpy() if id_column else np.arange(len(table))
    meta_columns = [c for c in table.columns if c not in used and c not in (*label_columns, id_column)]
    return _finish(x, y, ids, spec=spec, digest=digest, class_names=label_names,
                   metadata=table[meta_columns].reset_index(drop=True), name=name,
                   preprocessing={"inputs": layout.to_json()}, task=task)


def _load_image_zip(source, name: str, spec: str, digest: str, *, model, image_size, mean, std) -> Dataset:
    archive, members = _image_members(source, name, what="class")
    names = sorted({folder for folder, _ in members})
    if model is not None:  # folder names must name the model's classes (or their indices): never sorted order
        folder_class = names_to_classes(names, model.class_names, repr(name), what="class folders")
        class_names = tuple(model.class_names)
    else:
        folder_class = {folder: i for i, folder in enumerate(names)}
        class_names = tuple(names)
    channels, size = _image_geometry(model, image_size, name)
    x, preprocessing = _decoded_members(archive, members, name, channels=channels, size=size, mean=mean, std=std)
    folders = [folder for folder, _ in members]
    labels = np.asarray([folder_class[f] for f in folders], dtype=np.int64)
    return _finish(x, labels, np.asarray([info.filename for _, info in members]), spec=spec, digest=digest,
                   class_names=class_names, metadata=pd.DataFrame({"folder": folders}), preprocessing=preprocessing,
                   name=name)


def read_image_folders(data: bytes, *, name: str, channels: int, image_size, mean=None, std=None,
                       what: str = "concept") -> tuple[list, np.ndarray, list]:
    """The images of a zip of folders (`FOLDER/IMAGE.png`, or `.npy` bands), each decoded to `channels` at
    `image_size` (H, W) and normalised by `mean` and `std` per channel, with the bounds every dataset upload has:
    (each image's folder, x (N, C, H, W) float32, each image's path in the zip). `what` names what a folder is in
    the messages ("concept": a folder of concept images)."""
    if not data:
        raise AnalyzerError(f"{name!r} is empty: upload the zip again")
    archive, members = _image_members(io.BytesIO(data), name, what=what)
    x, _ = _decoded_members(archive, members, name, channels=int(channels), size=tuple(image_size), mean=mean,
                            std=std)
    return [folder for folder, _ in members], x, [info.filename for _, info in members]


def _image_members(source, name: str, *, what: str):
    """(the open zip, its images as (folder, ZipInfo) sorted by path), after its bomb and path checks."""
    try:
        archive = zipfile.ZipFile(source)
        infos = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise AnalyzerError(f"{name!r} is not a readable zip file: zip a folder with one subfolder per {what}") from exc
    declared = sum(i.file_size for i in infos)
    compressed = max(1, sum(i.compress_size for i in infos))
    if declared > MAX_UNCOMPRESSED_BYTES or declared / compressed > MAX_COMPRESSION_RATIO:
        raise AnalyzerError(f"{name!r} would inflate to {declared} bytes (ratio {declared / compressed:.0f}): "
                            f"refused as a possible zip bomb; zip the images without extreme compression")
    members = []
    for info in infos:
        path = info.filename
        if path.startswith(("/", "\\")) or ".." in path.replace("\\", "/").split("/") or ":" in path.split("/")[0]:
            raise AnalyzerError(f"{name!r} contains the unsafe path {path!r}: zip with relative paths only")
        if info.is_dir() or posixpath.basename(path).startswith(".") or "__MACOSX" in path:
            continue
        if not path.lower().endswith(IMAGE_SUFFIXES + (".npy",)):
            continue
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2:
            raise AnalyzerError(f"{path!r} in {name!r} is not inside a {what} folder: use one subfolder per {what}")
        members.append((parts[-2], info))
    if not members:
        raise AnalyzerError(f"{name!r} holds no PNG or JPEG images (or .npy arrays) in {what} folders")
    return archive, sorted(members, key=lambda m: m[1].filename)


def _decoded_members(archive, members: list, name: str, *, channels: int, size, mean, std):
    """(x (N, C, H, W) float32, preprocessing) of the image members, each decoded, resized and normalised, within
    the uncompressed-bytes budget."""
    mean_arr = _per_channel(mean, channels, 0.0, "mean")
    std_arr = _per_channel(std, channels, 1.0, "std")
    if np.any(std_arr <= 0):
        raise AnalyzerError("every --std value must be positive")
    images = []
    budget = MAX_UNCOMPRESSED_BYTES
    for _, info in members:
        try:
            with archive.open(info) as fh:
                raw = fh.read(budget + 1)
        except _ZIP_ERRORS as exc:
            raise AnalyzerError(f"{info.filename!r} in {name!r} cannot be read ({first_line(exc)}): the zip is damaged; "
                                f"create it again") from exc
        budget -= len(raw)
        if budget < 0:
            raise AnalyzerError(f"{name!r} inflates past {MAX_UNCOMPRESSED_BYTES} bytes: refused as a zip bomb")
        if info.filename.lower().endswith(".npy"):
            pixels = _band_array(raw, info.filename, name, channels=channels, size=size)
        else:
            pixels = _decoded_image(raw, info.filename, name, channels=channels, size=size)
        images.append((pixels - mean_arr[:, None, None]) / std_arr[:, None, None])
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise AnalyzerError(f"images in {name!r} have different sizes {sorted(shapes)[:3]}: pass --image-size H,W")
    x = np.stack(images).astype(np.float32)
    preprocessing = {"image_size": list(x.shape[2:]), "channels": channels, "mean": mean_arr.tolist(),
                     "std": std_arr.tolist(), "scale": "pixels / 255"}
    return x, preprocessing


# PIL modes for the channel counts an image file can hold; more bands come as .npy arrays.
IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _decoded_image(raw: bytes, member: str, name: str, *, channels: int, size) -> np.ndarray:
    """A PNG or JPEG as (C, H, W) floats in [0, 1], converted to the model's channel count."""
    from PIL import Image

    if channels not in IMAGE_MODES:
        raise AnalyzerError(f"the model takes {channels} channels, more than an image file holds ({member!r} in "
                            f"{name!r}): store each sample as a .npy array of shape ({channels}, H, W) in its class "
                            f"folder")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise AnalyzerError(f"image {member!r} in {name!r} is {img.width}x{img.height}, too large")
            img = img.convert(IMAGE_MODES[channels])
            if size is not None:
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except AnalyzerError:
        raise
    except Exception as exc:  # PIL raises many types for an undecodable image
        raise AnalyzerError(f"image {member!r} in {name!r} could not be decoded ({first_line(exc)}): "
                            f"remove or re-save it") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _band_array(raw: bytes, member: str, name: str, *, channels: int, size) -> np.ndarray:
    """A .npy member (any number of bands, e.g. multispectral) as (C, H, W) float32, values as they are stored.

    `raw` is already bounded by the zip budget; the header is read without unpickling, and its declared size must
    match the bytes before anything is allocated."""
    buffer = io.BytesIO(raw)
    shape, fortran, dtype = _npy_header(buffer, member, name)
    if dtype.kind not in "biuf":
        raise AnalyzerError(f"{member!r} in {name!r} holds {dtype}, not numbers: save a numeric array")
    bands = (1, *shape) if len(shape) == 2 else shape
    if len(bands) != 3 or bands[0] != channels:
        raise AnalyzerError(f"{member!r} in {name!r} has shape {shape}; the model takes ({channels}, H, W)")
    if size is not None and tuple(bands[1:]) != tuple(size):
        raise AnalyzerError(f"{member!r} in {name!r} is {bands[1]}x{bands[2]} but the model takes {size[0]}x{size[1]}: "
                            f"arrays are not resized; save them at that size")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > len(raw) - buffer.tell():  # checked before the allocation: the bytes must be there
        raise AnalyzerError(f"{member!r} in {name!r} is truncated: save it again with np.save")
    array = _read_npy_data(buffer, shape, fortran, dtype, nbytes, member, name)
    return np.ascontiguousarray(array.reshape(bands), dtype=np.float32)


def _image_geometry(model, image_size, name: str) -> tuple[int, tuple | None]:
    if model is not None and len(model.input_shape) == 3:
        channels, height, width = model.input_shape
        if image_size is not None and tuple(image_size) != (height, width):
            raise AnalyzerError(f"--image-size {tuple(image_size)} differs from the model's input {height}x{width}")
        return int(channels), (int(height), int(width))
    if model is not None:
        raise AnalyzerError(f"the model takes inputs of shape {model.input_shape}, not images: {name!r} is an image zip")
    return 3, tuple(image_size) if image_size is not None else None


def _per_channel(values, channels: int, default: float, label: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(arr) == 1:
        return np.repeat(arr, channels)
    if len(arr) != channels:
        raise AnalyzerError(f"--{label} has {len(arr)} values but the images have {channels} channels")
    return arr


def _numeric_inputs(x: np.ndarray, name: str, chunk: int = 4096) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise AnalyzerError(f"inputs in {name!r} are {x.dtype}, not numbers: convert them to floats")
    if x.dtype.itemsize > 4 or x.dtype.kind in "iu":
        # float32 turns 1e300 into inf, which would then be reported as "NaN or inf": say what really happened
        limit = float(np.finfo(np.float32).max)
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            finite = np.isfinite(part) if part.dtype.kind == "f" else np.ones(part.shape, bool)
            beyond = finite & (np.abs(part) > limit)
            if beyond.any():
                row = start + int(np.argwhere(beyond)[0][0])
                raise AnalyzerError(f"inputs in {name!r} hold values beyond float32's range (about ±3.4e38), the "
                                    f"first in row {row}: rescale them")
    return np.ascontiguousarray(x, dtype=np.float32)


def names_to_classes(names, class_names, where: str, *, what: str = "labels") -> dict:
    """Each text label (or class folder name) -> its class index in the model's output order.

    A name that is one of the model's class names means that class; an integer name ("3") means that index; any
    other name is refused with how to name it, never mapped by sorted order (folders three/five/eight given to a
    ten-class model are not classes 0, 1 and 2)."""
    names = sorted({str(n) for n in names})
    lookup = {str(c): i for i, c in enumerate(class_names or ())}
    out, unknown = {}, []
    for label in names:
        if label in lookup:
            out[label] = lookup[label]
        elif label.lstrip("-").isdigit() and class_names is not None and 0 <= int(label) < len(class_names):
            out[label] = int(label)
        else:
            unknown.append(label)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        if class_names is None:
            raise AnalyzerError(f"{what} {shown} in {where} are text and no model says what they mean: load the model "
                                f"first, or use class indices 0..K-1")
        defaults = tuple(class_names) == tuple(str(i) for i in range(len(class_names)))
        if defaults:
            raise AnalyzerError(f"{what} {shown} in {where} do not name the model's classes, which it knows only by "
                                f"index (0..{len(class_names) - 1}): name them by class index, or give the model's "
                                f"class names in output order with --class-names NAME,NAME,... (or save them in "
                                f"the model file: see the README's 'Names carried by the model')")
        raise AnalyzerError(f"{what} {shown} in {where} are not among the model's classes "
                            f"({', '.join(map(str, class_names[:12]))}{', ...' if len(class_names) > 12 else ''}): "
                            f"rename them, or use class indices 0..{len(class_names) - 1}")
    return out


def _task_labels(y: np.ndarray, name: str, *, class_names, task, model) -> tuple[np.ndarray, str]:
    """(labels, task name): real targets for a regression, class indices otherwise (`_integer_labels`). The task
    is the declared one, or read from the labels and the model's output (`tasks.resolve_task`)."""
    from ..evaluation.tasks import resolve_task

    resolved = resolve_task(task, y, model)
    if resolved.has_classes:  # class names or indices, looked up against the model's names
        if y.ndim != 1:
            resolved.check_labels(y)  # refused with the task's reason (one class per sample)
        return _integer_labels(y, name, class_names=class_names), resolved.name
    return resolved.check_labels(y), resolved.name


def _integer_labels(y: np.ndarray, name: str, *, class_names) -> np.ndarray:
    if y.dtype.kind in "OUS":
        lookup = names_to_classes(y, class_names, repr(name))
        return np.asarray([lookup[str(v)] for v in y], dtype=np.int64)
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        missing = ~np.isfinite(y)
        if missing.any():
            raise AnalyzerError(f"{int(missing.sum())} labels in {name!r} are missing or not finite, the first in row "
                                f"{int(np.argmax(missing))}: give every row a label (a row with fewer fields than "
                                f"the header leaves its label empty)")
        if not np.all(y == np.round(y)):
            raise AnalyzerError(f"labels in {name!r} are not integers: use class indices 0..K-1")
    elif y.dtype.kind not in "iu":
        raise AnalyzerError(f"labels in {name!r} have type {y.dtype}: use integer class indices 0..K-1")
    return y.astype(np.int64)


def _finish(x, y, ids, *, spec, digest, class_names, metadata, name, feature_names=None, extras=None,
            preprocessing=None, task: str = "classification") -> Dataset:
    if len(y) == 0:
        raise AnalyzerError(f"{name!r} has no samples: a dataset needs at least one")
    ids = np.asarray(ids)
    if ids.dtype.kind == "O":
        ids = ids.astype(str)
    if not ids_unique(ids):
        dupes = pd.Series(ids)[pd.Series(ids).duplicated()].astype(str).unique()[:5]
        raise AnalyzerError(f"ids in {name!r} are not unique ({', '.join(dupes)} repeat): give every sample its own id")
    return Dataset(x=x, y=y, ids=ids, spec=spec, sha256=digest, class_names=class_names,
                   metadata=metadata.reset_index(drop=True), feature_names=feature_names,
                   preprocessing=preprocessing or {}, extras=extras or {}, task=task)


def _non_finite_rows(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Which samples hold NaN or inf; in chunks, so a large dataset needs no full-size temporary mask."""
    flat = x.reshape(len(x), -1)
    bad = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), chunk):
        block = flat[start:start + chunk]
        with np.errstate(invalid="ignore", over="ignore"):
            total = block.sum()
        if not np.isfinite(total):  # one reduction per chunk; rows are inspected only when it is not finite
            bad[start:start + chunk] = ~np.isfinite(block).all(axis=1)
    return bad


def check_dataset(dataset: Dataset, model) -> None:
    """Every check before analysis: sample shape, labels within the model's classes, finite inputs, N > 0."""
    if len(dataset) == 0:
        raise AnalyzerError("the dataset has no samples")
    if dataset.sample_shape != tuple(model.input_shape):
        raise AnalyzerError(f"samples have shape {dataset.sample_shape} but the model takes {tuple(model.input_shape)}:"
                            f" reshape the data or choose the matching model")
    from ..evaluation.tasks import output_width, resolve_task, task_named

    # the labels as the model's task reads them: class indices within its classes, finite targets, K 0/1 labels.
    # Classes are checked against the model's own number (a dataset read without a model was taken as binary).
    name = "classification" if resolve_task(dataset.task, dataset.y, None).has_classes else dataset.task
    task_named(name, output_width(model)).check_labels(dataset.y)
    if dataset.class_names is not None and len(dataset.class_names) > model.num_classes:
        raise AnalyzerError(f"the dataset names {len(dataset.class_names)} classes but the model has "
                            f"{model.num_classes} outputs")
    bad = _non_finite_rows(dataset.x)
    if bad.any():
        raise AnalyzerError(f"{int(bad.sum())} samples hold NaN or inf (first id {dataset.ids[bad][0]}): "
                            f"clean or drop them")

