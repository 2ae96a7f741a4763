"""The run directory: written atomically, opened with checks that say what is wrong with a damaged one.

A run is complete exactly when `run.json` exists: it is written last, inside a hidden temporary directory that is
renamed into place only when everything else is there. Files added to a run later are written to a temporary name
and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, RunExists, first_line
from .sample_table import SampleTable
from .run_checks import (RunDamaged, check_array, check_info, check_json, check_probs,
                         check_samples, check_table, damaged)

RUN_FORMAT_VERSION = 1
RUN_INFO = "run.json"
SAMPLES = "samples.parquet"
# A scaled-out run's samples table in parts (`samples/part-NNNNNN.parquet`, rows in name order), in place of SAMPLES
SAMPLES_DIR = "samples"
SAMPLE_PART = "part-{:06d}.parquet"
# Rows per row group of samples.parquet: a gallery page reads the groups holding its rows (pyarrow's default of 1Mi
# rows made a page of 20 rows of a 10M-row run read the file), the size of a Ray part
SAMPLE_ROW_GROUP = 1 << 16
# Opening a run checks a derived table larger than this from its footer, its values when a page reads it
# (`Run.check_every_file`): a 10M-row run's projection table is 134 MB; the digits run's largest table is 60 KB.
# Damage in such a table's rows is then that page's one RunDamaged line, and the sidebar does not mark the run.
FOOTER_CHECK_BYTES = 16 << 20
# tables larger than this are read a column at a time (`read_parquet_lean`)
LEAN_READ_BYTES = 16 << 20
PROBS = "probs.npy"
LABELS = "labels.npy"  # a multi-label run's multi-hot labels (N, K); samples.parquet holds them as text


def table_parts(directory: str | Path) -> list[Path]:
    """The parts of a table stored in parts (`part-*.parquet` under `directory`), in row order (by name)."""
    return sorted(Path(directory).glob("part-*.parquet"))


def _temp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename the result over `path`; on failure nothing at `path` changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=_json_default)))


def read_parquet_lean(path: str | Path) -> pd.DataFrame:
    """`pd.read_parquet(path)`, a column at a time for a file over LEAN_READ_BYTES, handing Arrow's freed memory back
    after each: a whole read holds the Arrow table and its pandas copy at once (a 10M-row projection table of
    150 MB had raised the Embeddings page's peak by 330 MB, and kept 260 MB of it in Arrow's pool)."""
    if Path(path).stat().st_size <= LEAN_READ_BYTES:
        return pd.read_parquet(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name in pq.read_schema(path).names:
        columns[name] = pd.read_parquet(path, columns=[name])[name]
        pa.default_memory_pool().release_unused()
    return pd.DataFrame(columns, copy=False)


def write_parquet(path: str | Path, table: pd.DataFrame, **options) -> Path:
    """`table` written atomically, without its index; `options` go to pyarrow's writer (`use_dictionary`, ...)."""
    return write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False, **options))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return write_atomic(path, _save)


def read_cache_entry(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file inside a run (.npz), or None when there is none or it is damaged: a cache entry is
    recomputed and rewritten, never trusted, so a truncated or edited file cannot break a page."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {key: np.asarray(entry[key]) for key in entry.files}
    except Exception:  # missing, or damaged (numpy and zipfile raise many types): all mean "recompute it"
        return None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# Hidden siblings of a run `NAME` while it is written, replaced or deleted: `.NAME.tmp-XXXXXXXX` (the new run being
# staged), `.NAME.old-XXXXXXXX` (the run being replaced), `.NAME.deleted-XXXXXXXX` (a run being deleted) and
# `.NAME.lock` (held by the one writer of NAME). A crash leaves some of them; `recover_interrupted` puts things right.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old|deleted)-[0-9a-f]{8}$")


# Errors of the disk rather than of the analysis: a person fixes them by freeing space or choosing another place.
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


@contextlib.contextmanager
def disk_errors_as_one_line(where: Path, fix: str):
    """Turn an OSError of the disk (full, read-only, no permission) raised in the block into one AnalyzerError line
    that names `where` and `fix`; any other error passes through unchanged."""
    try:
        yield
    except OSError as exc:
        reason = _DISK_ERRNOS.get(exc.errno)
        if reason is None:
            raise
        raise AnalyzerError(f"cannot write into {where}: {reason} ({exc.strerror}); {fix}") from exc


def _swap_step(step: str) -> None:
    """Called between the steps of a replacement; the crash-safety tests kill the process here."""


@contextlib.contextmanager
def writer_lock(out: Path, *, wait: bool):
    """Hold `.NAME.lock` beside `out`: one writer per run name, across processes. Without `wait` a second writer is
    refused with a message at once; with it (`--overwrite`) it waits its turn and then replaces the run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise AnalyzerError(f"cannot write into {out.parent} ({exc.strerror}): check its permissions and free space, "
                            f"or choose another --out") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise AnalyzerError(f"another analysis is writing {out} right now: wait for it to finish, choose another "
                                f"--out, or pass --overwrite to replace its run once it is done") from exc
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def staged_run(out: str | Path, *, replace: bool):
    """A temporary directory beside `out` to write a run into; renamed to `out` only if the block completes.

    The block runs under `out`'s writer lock. With `replace`, an existing run at `out` is swapped out only after the
    new one is complete, in two renames; a crash between any two steps is undone or finished by
    `recover_interrupted` (at the next write of `out`, whenever runs are listed, and at the start of a later run
    beside it: `_sweep_abandoned_neighbours`). A directory at `out` that is
    not a run is never replaced.
    """
    out = Path(out)
    with writer_lock(out, wait=replace):
        _recover_name(out.parent, out.name)
        refuse_non_run(out)
        _sweep_abandoned_neighbours(out.parent)
        stage = _temp_sibling(out, "tmp")
        try:
            # while the stage is written, whatever is at `out` is untouched
            with disk_errors_as_one_line(out.parent, "free some space, fix its permissions, or choose another "
                                                     "--out; nothing was stored and no earlier run was changed"):
                stage.mkdir()
                yield stage
            if not (stage / RUN_INFO).exists():
                raise AnalyzerError("internal error: a run was staged without run.json")
            _swap_step("staged")
            if out.exists():
                if not replace:
                    raise RunExists(f"{out} was written by another analysis meanwhile: pass --overwrite to "
                                    f"replace it, or choose another --out", out)
                refuse_non_run(out)
                old = _temp_sibling(out, "old")
                os.replace(out, old)
                _swap_step("old moved aside")
                os.replace(stage, out)
                _swap_step("new moved in")
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, out)
            _swap_step("done")
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)


def refuse_non_run(out: Path) -> None:
    """Refuse `out` as a place for a run if it is a file, or a directory holding something that is not a run."""
    if out.is_file() or out.is_symlink():
        raise AnalyzerError(f"{out} is a file, not a run directory: choose another --out")
    if out.is_dir() and not (out / RUN_INFO).exists() and any(out.iterdir()):
        raise AnalyzerError(f"{out} exists and is not a run, so it is never replaced (not even with --overwrite): "
                            f"choose another --out, such as {out.parent / (out.name + '-run')}")


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _changed_since(path: Path, when: float) -> bool:
    """Whether `path` last changed at or after `when`; one that vanished meanwhile has not."""
    try:
        return path.lstat().st_mtime >= when
    except FileNotFoundError:
        return False


def recover_interrupted(root: str | Path, entries: list | None = None, *,
                        changed_before: float | None = None) -> list[str]:
    """Finish or undo every replacement or deletion under `root` that a crash interrupted; returns what was done.

    A name whose writer is still running (its lock is held) is left alone. For each name: with no run at `NAME`, a
    complete staged run (it has run.json, written last) is moved in (the crash came between the two renames of a
    replacement, or just before the rename of a new run), else the run that was being replaced is moved back. Then
    whatever is left over is removed: incomplete stages, replaced runs, runs being deleted. `entries`: the paths
    under `root`, when the caller has listed them already. With `changed_before` (a time, as `st_mtime`), a name
    with a leftover changed at or after it is left alone too."""
    root = Path(root)
    try:
        entries = list(root.iterdir()) if entries is None else entries
    except OSError:
        return []
    matches = [(p, m["name"]) for p, m in ((p, _SIBLING.match(p.name)) for p in entries) if m]
    names = {name for _, name in matches}
    if changed_before is not None:
        names -= {name for path, name in matches if _changed_since(path, changed_before)}
    done = []
    for name in sorted(names):
        try:
            with writer_lock(root / name, wait=False):
                done += _recover_name(root, name)
        except AnalyzerError:
            continue  # being written right now, or not writable: nothing to recover from here
    return done


def _sweep_abandoned_neighbours(root: Path) -> None:
    """At the start of a run, finish or remove what killed writers of other names left in `root` (their hidden
    stages would otherwise stay until the dashboard lists `root`, which a CLI-only user never does).

    Warier than a listing's sweep: a name is touched only when its writer lock is free and every leftover of it last
    changed before the newest complete run here was finished, so a writer that has only just started, one whose lock
    this host cannot see on a network file system included, is left to a later run. It never fails the run: a
    leftover that cannot be removed now is tried again next time."""
    try:
        finished = [(p / RUN_INFO).stat().st_mtime for p in root.iterdir()
                    if not p.name.startswith(".") and (p / RUN_INFO).is_file()]
        if finished:
            recover_interrupted(root, changed_before=max(finished))
    except OSError:
        pass


def _recover_name(root: Path, name: str) -> list[str]:
    """`recover_interrupted` for one name, whose writer lock the caller holds."""
    siblings = {"tmp": [], "old": [], "deleted": []}
    for path in root.glob(f".{glob.escape(name)}.*-*"):
        match = _SIBLING.match(path.name)
        if match and match["name"] == name and path.is_dir() and not path.is_symlink():
            siblings[match["tag"]].append(path)
    out = root / name
    done = []
    if not out.exists():
        complete = [p for p in siblings["tmp"] if (p / RUN_INFO).exists()]
        if complete:
            os.replace(max(complete, key=_mtime), out)
            done.append(f"{name}: finished an interrupted write (the new run is in place)")
        elif siblings["old"]:
            os.replace(max(siblings["old"], key=_mtime), out)
            done.append(f"{name}: undid an interrupted replacement (the previous run is back)")
    for path in siblings["tmp"] + siblings["old"] + siblings["deleted"]:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
    return done


def check_run_files(stage_dir: str | Path, *, num_samples: int, num_classes: int,
                    task: str = "classification") -> dict:
    """Check a run's files before it is stored (a sandboxed worker wrote them, so they are not trusted), by the
    rules every reader applies (`run_checks`): the core files whole, and every analysis file present. Returns
    {"accuracy": ...}."""
    stage_dir = Path(stage_dir)
    info = {"num_samples": num_samples, "class_names": [str(k) for k in range(num_classes)], "task": task}
    run = Run(path=stage_dir, info=info)
    try:
        run.check_every_file()
    except RunDamaged as exc:
        raise AnalyzerError(f"the analysis wrote a damaged {exc.relpath or 'run'} ({exc.why or exc}); nothing was "
                            f"stored") from exc
    if task == "regression":  # a real-valued prediction has no accuracy: the summary leads with its MAE
        return {"accuracy": None}
    # a multi-label run's `correct` is every label right: its accuracy is the subset accuracy
    return {"accuracy": float(run.sample_table["correct"].mean()) if num_samples else float("nan")}


@dataclass(frozen=True)
class Run:
    """An opened, complete run directory. Every file is read through the rules of `run_checks`, so a damaged one is
    one RunDamaged line; the core tables are read on first use and kept."""

    path: Path
    info: dict
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def class_names(self) -> list:
        return list(self.info["class_names"])

    @property
    def task(self) -> str:
        """What the model does (`analyzers.evaluation.tasks`): runs from before tasks were recorded classify."""
        return str(self.info.get("task") or "classification")

    @property
    def num_samples(self) -> int:
        return int(self.info["num_samples"])

    @property
    def sharded(self) -> bool:
        """Whether the samples table is stored in parts (`SAMPLES_DIR`) rather than as one file."""
        return not (self.path / SAMPLES).exists() and (self.path / SAMPLES_DIR).is_dir()

    @property
    def sample_table(self) -> SampleTable:
        """The samples table, checked, read column by column (`sample_table.SampleTable`): what the dashboard
        reads, so that a 10M-row run never sits whole in memory."""
        if "sample_table" not in self._cache:
            relpath = SAMPLES_DIR if self.sharded else SAMPLES
            table = self._read(relpath, lambda p: SampleTable(table_parts(p) if self.sharded else [p],
                                                              where=self.path, relpath=relpath))
            check_samples(table, num_samples=self.num_samples, num_classes=len(self.class_names), where=self.path,
                          task=self.task)
            self._cache["sample_table"] = table
        return self._cache["sample_table"]

    @property
    def samples(self) -> pd.DataFrame:
        """The whole samples table, for the analyses of a run (the dashboard reads `sample_table`'s columns)."""
        if "samples" not in self._cache:
            self._cache["samples"] = self.sample_table.to_frame()
        return self._cache["samples"]

    @property
    def probs(self) -> np.ndarray:
        if "probs" not in self._cache:
            probs = self._read(PROBS, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
            check_probs(probs, self.sample_table, num_classes=len(self.class_names), where=self.path, task=self.task)
            self._cache["probs"] = probs
        return self._cache["probs"]

    @property
    def labels(self) -> np.ndarray:
        """The labels as the task reads them: a multi-label run's (N, K) 0/1 matrix (labels.npy), else the label
        column (class indices or real targets)."""
        if "labels" not in self._cache:
            if self.task == "multilabel":
                from ..evaluation.tasks import MultiLabel
                from .run_checks import check_label_matrix

                labels = self._read(LABELS, lambda p: np.load(p, allow_pickle=False))
                check_label_matrix(labels, self.sample_table, num_labels=len(self.class_names), probs=self.probs,
                                   threshold=MultiLabel(len(self.class_names)).threshold, where=self.path)
            else:
                labels = self.sample_table["label"].to_numpy()
            self._cache["labels"] = labels
        return self._cache["labels"]

    def has(self, relpath: str) -> bool:
        return (self.path / relpath).exists()

    def read_json(self, relpath: str):
        obj = self._read(relpath, lambda p: json.loads(p.read_text()))
        check_json(relpath, obj, where=self.path, task=self.task, num_classes=len(self.class_names))
        return obj

    def read_parquet(self, relpath: str) -> pd.DataFrame:
        table = self._read(relpath, read_parquet_lean)
        check_table(relpath, table, num_samples=self.num_samples, num_classes=len(self.class_names),
                    where=self.path)
        return table

    def read_npy(self, relpath: str, mmap: bool = True) -> np.ndarray:
        array = self._read(relpath, lambda p: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False))
        check_array(relpath, array, num_samples=self.num_samples, where=self.path)
        return array

    def file(self, relpath: str) -> Path:
        """Where `relpath` of the run is, for reading or writing; a path that a link inside the run (a planted
        `projections -> /elsewhere`) leads out of the run folder is refused, so that no write follows it there (the
        dashboard's warm-up stores a missing PCA as soon as a run opens)."""
        path = self.path / relpath
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise damaged(relpath, self.path, "a link in the run leads it out of the run folder")
        return path

    def check_every_file(self, *, footer_above: int | None = None) -> None:
        """Read every file a page or an analysis may read, by its rules; raise RunDamaged for the first broken one.
        Arrays are checked from their headers (memory-mapped), so this costs one read of the tables.

        With `footer_above` (bytes), a derived table larger than that is checked from its Parquet footer: its
        columns, their types and its row count. Its values are checked when a page reads it (`read_parquet`), as
        one RunDamaged line there. Opening a 10M-row run had read its 134 MB projection table for this (1 s)."""
        self.probs  # reads and checks samples.parquet's core columns too
        self.labels  # a multi-label run's labels.npy
        readers = {".parquet": self.read_parquet, ".json": self.read_json, ".npy": self.read_npy}
        for path in sorted(self.path.rglob("*")):
            relpath = path.relative_to(self.path).as_posix()
            if relpath in (SAMPLES, PROBS, LABELS, RUN_INFO) or relpath.startswith(f"{SAMPLES_DIR}/") or \
                    path.suffix not in readers or any(
                    part.startswith(".") for part in path.relative_to(self.path).parts) or not path.is_file():
                continue
            if path.suffix == ".parquet" and footer_above is not None and path.stat().st_size > footer_above:
                self._check_parquet_footer(relpath)
            else:
                readers[path.suffix](relpath)

    def _check_parquet_footer(self, relpath: str) -> None:
        import pyarrow.parquet as pq

        metadata = self._read(relpath, pq.read_metadata)
        schema_only = self._read(relpath, lambda _: metadata.schema.to_arrow_schema().empty_table().to_pandas())
        check_table(relpath, schema_only, num_samples=self.num_samples, num_classes=len(self.class_names),
                    where=self.path, rows=metadata.num_rows)

    def _read(self, relpath: str, reader):
        path = self.path / relpath
        if not path.exists():
            raise RunDamaged(f"the run at {self.path} has no {relpath}: this analysis was not run or the run is "
                             f"damaged; run python -m analyzers run again", relpath, "it is missing")
        try:
            return reader(path)
        except Exception as exc:  # a damaged file fails in many ways; each means the same to the person
            raise damaged(relpath, self.path, first_line(exc, 120)) from exc


# What is added to a run after it is made (the Explain page and `explain`; t-SNE and UMAP computed on demand): it
# depends only on the model and the data, so a run that replaces one of the same model and data keeps it.
DERIVED_DIRS = ("explanations", "projections", "health")


def carry_derived_files(previous: str | Path, stage: str | Path, *, model_sha: str, dataset_sha: str) -> list:
    """Copy the derived files of the run at `previous` into the staged run `stage` when both runs have the same
    model and dataset hashes; files the new run wrote itself win. Returns the paths copied, relative to the run."""
    previous, stage = Path(previous), Path(stage)
    try:
        info = json.loads((previous / RUN_INFO).read_text())
        same = info["model"]["sha256"] == model_sha and info["dataset"]["sha256"] == dataset_sha
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no run there, or a damaged one: nothing of it is trusted
    if not same:
        return []
    carried = []
    for top in DERIVED_DIRS:
        root = previous / top
        if not root.is_dir() or root.is_symlink():
            continue
        for source in sorted(root.rglob("*")):
            if source.is_symlink() or not source.is_file():
                continue  # a link could point anywhere: never followed into the new run
            relative = source.relative_to(previous)
            target = stage / relative
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            carried.append(str(relative))
    return carried


def open_run(path: str | Path) -> Run:
    """Open a complete run, checking every file it holds (`run_checks`), or say in one line why it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise AnalyzerError(f"{path} is not a run directory: check the path or create one with python -m analyzers run")
    if not (path / RUN_INFO).exists():
        raise AnalyzerError(f"{path} holds no run.json, so it is not a complete run (an interrupted run leaves none): "
                            f"run python -m analyzers run again")
    info = Run(path=path, info={})._read(RUN_INFO, lambda p: json.loads(p.read_text()))
    if not isinstance(info, dict) or info.get("format_version") != RUN_FORMAT_VERSION:
        raise RunDamaged(f"{path}/run.json is not a run of format version {RUN_FORMAT_VERSION}: run the analysis "
                         f"again")
    check_info(info, path)
    missing = [name for name in (SAMPLES, PROBS) if not (path / name).exists()
               and not (name == SAMPLES and (path / SAMPLES_DIR).is_dir())]
    if missing:
        raise RunDamaged(f"the run at {path} is damaged: {', '.join(missing)} missing; run it again with --overwrite")
    run = Run(path=path, info=info)
    run.check_every_file(footer_above=FOOTER_CHECK_BYTES)
    return run


def list_runs(root: str | Path) -> list[Path]:
    """Complete runs directly under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = list(root.iterdir())
    if recover_interrupted(root, entries):  # a recovery moved a run into place: list again
        entries = list(root.iterdir())
    runs = [p for p in entries if p.is_dir() and not p.name.startswith(".") and (p / RUN_INFO).exists()]
    return sorted(runs, key=lambda p: (p / RUN_INFO).stat().st_mtime, reverse=True)


def delete_run(path: str | Path) -> None:
    """Remove a run: first made incomplete (run.json renamed away), then deleted."""
    path = Path(path)
    if not (path / RUN_INFO).exists():
        raise AnalyzerError(f"{path} is not a complete run; nothing deleted")
    trash = _temp_sibling(path, "deleted")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
