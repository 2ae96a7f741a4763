"""The data-health stage of a run: duplicates and leaks, shift between splits, outliers, and the inputs as the model
receives them, with every problem found listed for the Overview.

Writes into the run directory (each part on its own: one that does not apply, or fails, is recorded as skipped with
its reason in `data_health.json`, and the others are still written):
- `duplicates.parquet`: `duplicates.find_duplicates` over the inputs (exact: the inputs' bytes; near: nearest
  neighbours in the run's embedding space, the layer the run stored, else the flattened inputs), one row per pair
  and kind (id_a, id_b, kind exact / near / leak / conflicting-label, match, distance, split_a, split_b, label_a,
  label_b);
- `shift.json` (a run over splits): {"pairs": [...]}, one entry per split against the training split
  (`splits.train_and_eval`): `shift.shift_pair` of the embeddings' `embedding_shift` (domain AUC, MMD and its
  permutation p) and the per-feature tests (`feature_shift`) of the features the run has: a table's features and
  its metadata, and for images and sequences each channel's per-sample mean and standard deviation (a new
  background colour moves them); plus `slices`, `shift.slice_shift` of the run's error slices between the two;
- `outliers.parquet` (one row per sample: id, score, flagged) and `outliers.json` (the summary and the
  low-density regions with their error rates, `outliers.find_outliers` on the same points as the near search,
  measured against the training split's rows when the run has splits: how far each sample lies from what the
  model was trained on);
- `inputs.json`: `input_stats.input_stats` of the inputs (per-channel statistics, a seeded grid of samples per
  class, flags for inputs that look unnormalised, against the training split's channel statistics when the run
  has splits, corrupted samples);
- `data_health.json`: {"problems": [...], "skipped": {part: reason}}, every problem found, worded for a person,
  with the ids it concerns (at most MAX_IDS) and the page that shows them.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, InvalidOption, first_line
from ..loading.runs import write_json, write_parquet

LOG = logging.getLogger(__name__)
DUPLICATES = "duplicates.parquet"
SHIFT = "shift.json"
OUTLIERS = "outliers.parquet"
OUTLIER_SUMMARY = "outliers.json"
INPUTS = "inputs.json"
DATA_HEALTH = "data_health.json"
PARTS = ("duplicates", "shift", "outliers", "inputs")
OUTLIER_K = 10  # neighbours the outlier score averages over
MAX_IDS = 200  # ids listed with one problem: the gallery pages through them
SHIFT_AUC = 0.75  # a domain AUC above this is a shift worth naming (0.5: the splits cannot be told apart)
# stage_options["data_health"] keys and what they go to
OPTIONS = {"near_space": "where near duplicates are searched: embeddings (default when stored) or inputs",
           "k": "neighbours searched per sample", "permutations": "MMD permutations",
           "max_samples": "rows per split for the embedding shift", "contamination": "share of samples flagged "
           "as outliers", "outlier_method": "knn or isolation_forest"}


def _options(params: dict) -> dict:
    options = dict((params.get("stage_options") or {}).get("data_health") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidOption(f"unknown data_health options {', '.join(unknown)}: choose from {', '.join(OPTIONS)}")
    if options.get("near_space", "embeddings") not in ("embeddings", "inputs"):
        raise InvalidOption("near_space must be 'embeddings' or 'inputs'")
    return options


def flat_rows(x: np.ndarray) -> np.ndarray:
    """The inputs as one row each (a view where the array allows it)."""
    return np.asarray(x).reshape(len(x), -1)


def search_points(ctx, space: str) -> tuple[np.ndarray, str]:
    """(points, what they are) for the near search and the outliers: the run's stored embeddings, or the inputs."""
    emb = ctx.predictions.embeddings
    if space == "embeddings" and emb is not None:
        return np.asarray(emb, dtype=np.float32), f"embeddings of {ctx.predictions.embedding_layer}"
    return flat_rows(ctx.dataset.x), "inputs"


def shift_features(dataset) -> pd.DataFrame:
    """The per-sample features the shift tests compare: a table's features and metadata (ground truth left out),
    and for images and sequences each channel's per-sample mean and standard deviation."""
    from ..loading.splits import SPLIT_COLUMN

    columns = {}
    x = np.asarray(dataset.x)
    if dataset.modality == "tabular" and dataset.feature_names:
        for j, name in enumerate(dataset.feature_names):
            columns[str(name)] = x[:, j]
    elif x.ndim >= 3 and dataset.modality in ("image", "sequence", "other"):
        axes = tuple(range(2, x.ndim))
        for c in range(x.shape[1]):
            columns[f"channel {c} mean"] = x[:, c].mean(axis=tuple(a - 1 for a in axes))
            columns[f"channel {c} std"] = x[:, c].std(axis=tuple(a - 1 for a in axes))
    for column in dataset.metadata.columns:
        if column == SPLIT_COLUMN or column in dataset.ground_truth_columns or str(column) in columns:
            continue
        values = dataset.metadata[column]
        if values.map(lambda v: isinstance(v, (list, tuple, np.ndarray, dict))).any():
            continue  # a list per sample is not a feature the tests read
        columns[str(column)] = values.to_numpy()
    return pd.DataFrame(columns)


def training_rows(ctx) -> np.ndarray | None:
    """The rows of the training split (`splits.train_and_eval`) as a boolean mask, or None for a run over one
    split: what the outliers are measured against and the inputs' expected statistics come from."""
    from ..loading.splits import SPLIT_COLUMN, split_names, train_and_eval

    names = split_names(ctx.samples)
    if len(names) < 2:
        return None
    return ctx.samples[SPLIT_COLUMN].astype(str).to_numpy() == train_and_eval(names)[0]


def _ids(values, limit: int = MAX_IDS) -> list:
    from .shift import json_value

    return [json_value(v) for v in list(values)[:limit]]


def duplicates_part(ctx, points, space: str, options: dict, problems: list, neighbours=None) -> dict:
    from ..loading.splits import SPLIT_COLUMN
    from .duplicates import find_duplicates

    split = ctx.dataset.metadata[SPLIT_COLUMN].astype(str).to_numpy() \
        if SPLIT_COLUMN in ctx.dataset.metadata.columns else None
    labels = ctx.dataset.y if ctx.dataset.y.ndim == 1 else np.asarray([str(r.tolist()) for r in ctx.dataset.y])
    found = find_duplicates(flat_rows(ctx.dataset.x), ids=np.asarray(ctx.dataset.ids), split=split, labels=labels,
                            embeddings=None if space == "inputs" else points, k=int(options.get("k", 5)),
                            seed=int(ctx.params.get("seed", 0)), neighbours=neighbours)
    table = found.table().drop(columns=["row_a", "row_b"])
    for column in ("label_a", "label_b"):  # a class index, or a label set as text: one type per column
        table[column] = table[column].map(lambda v: None if v is None else str(v) if not isinstance(
            v, (int, np.integer)) else int(v))
    write_parquet(ctx.path(DUPLICATES), table)
    words = {"exact": ("exact duplicates", "samples whose inputs are byte for byte the same"),
             "near": ("near duplicates", f"samples closer in {space} than distinct samples ever are"),
             "leak": ("leaks across splits", "samples with a copy (exact or near) in another split: an evaluation "
                      "split that holds training samples overstates the model"),
             "conflicting-label": ("copies with conflicting labels", "copies of one sample labelled differently: "
                                   "at least one label is wrong")}
    for kind in ("leak", "conflicting-label", "exact", "near"):
        count = found.counts[kind]
        if not count:
            continue
        pairs = found.of_kind(kind)
        title, detail = words[kind]
        problems.append({"kind": f"duplicates:{kind}", "title": f"{count} {title}", "detail": detail,
                         "count": int(count), "page": "health", "section": "duplicates",
                         "ids": _ids(pd.unique(np.r_[pairs["id_a"].to_numpy(), pairs["id_b"].to_numpy()]))})
    return {"counts": {k: int(v) for k, v in found.counts.items()}, "near_threshold": found.near_threshold,
            "threshold_source": found.threshold_source, "search": found.search, "space": space,
            "leaking_rows": dict(found.leaking_rows)}


def shift_part(ctx, options: dict, problems: list) -> dict:
    from ..evaluation.stage import SLICES
    from ..loading.splits import SPLIT_COLUMN, split_names, train_and_eval
    from .shift import embedding_shift, feature_shift, name_top_rows, shift_pair, slice_shift

    names = split_names(ctx.samples)
    if len(names) < 2:
        raise AnalyzerError("the run has one split: give the data as --data train=... --data test=..., or a "
                            "split column, to test shift between splits")
    train, _ = train_and_eval(names)
    split = ctx.samples[SPLIT_COLUMN].astype(str).to_numpy()
    points = ctx.predictions.embeddings
    points = flat_rows(ctx.dataset.x) if points is None else np.asarray(points)
    features = shift_features(ctx.dataset)
    slices = None
    if ctx.path(SLICES).exists():
        slices = pd.read_parquet(ctx.path(SLICES))
    pairs = []
    for other in (n for n in names if n != train):
        a, b = split == train, split == other
        embedding = embedding_shift(points[a], points[b], seed=int(ctx.params.get("seed", 0)),
                                    permutations=int(options.get("permutations", 200)),
                                    max_samples=int(options.get("max_samples", 2000)))
        tests = feature_shift(features[a].reset_index(drop=True), features[b].reset_index(drop=True)) \
            if len(features.columns) else None
        ids = np.asarray(ctx.dataset.ids)
        record = name_top_rows(shift_pair(train, other, features=tests, embedding=embedding), ids[a], ids[b])
        record["slices"] = [] if slices is None or not len(slices) else [
            {k: _json(v) for k, v in row.items()} for row in slice_shift(
                slices, ctx.samples, split_a=train, split_b=other).to_dict("records")]
        pairs.append(record)
        auc = record["domain_auc"]
        if auc is not None and auc >= SHIFT_AUC:
            moved = [f["feature"] for f in record["features"] if f.get("shifted")][:5]
            problems.append({
                "kind": "shift", "title": f"{other} is shifted from {train} (domain AUC {auc:.2f})",
                "detail": f"a classifier tells {other} samples from {train} samples with AUC {auc:.2f} on the "
                          f"model's embeddings (0.5: indistinguishable); MMD p = {record['mmd_p']}"
                          + (f"; features that moved most: {', '.join(moved)}" if moved else ""),
                "count": int(b.sum()), "page": "health", "section": "shift",
                "ids": _ids(e["id"] for e in record["embedding"]["top_b"])})
    write_json(ctx.path(SHIFT), {"train": train, "pairs": pairs})
    return {"pairs": [{"a": p["a"], "b": p["b"], "domain_auc": p["domain_auc"], "mmd_p": p["mmd_p"]}
                      for p in pairs]}


def _json(value):
    from .shift import json_value

    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_value(v) for v in list(value)]
    return json_value(value)


def outliers_part(ctx, points, space: str, options: dict, problems: list, neighbours=None) -> dict:
    from .outliers import find_outliers

    errors = ~ctx.samples["correct"].to_numpy(dtype=bool)
    found = find_outliers(points, errors=errors, ids=np.asarray(ctx.dataset.ids), reference=training_rows(ctx),
                          method=options.get("outlier_method", "knn"),
                          contamination=float(options.get("contamination", 0.01)),
                          k=min(OUTLIER_K, len(points) - 1), seed=int(ctx.params.get("seed", 0)),
                          neighbours=neighbours if training_rows(ctx) is None else None)
    table = pd.DataFrame({"id": ctx.samples["id"].to_numpy(), "score": found.scores.astype(np.float64),
                          "flagged": found.flagged.astype(bool)})
    write_parquet(ctx.path(OUTLIERS), table)
    summary = {**found.to_json(), "space": space}
    regions = []
    ids = np.asarray(ctx.dataset.ids)
    if found.regions is not None:
        for row in found.regions.to_dict("records"):
            rows = np.asarray(row.pop("rows"), dtype=np.int64)
            regions.append({**{k: _json(v) for k, v in row.items()}, "ids": _ids(ids[rows], len(rows))})
    write_json(ctx.path(OUTLIER_SUMMARY), {**summary, "regions": regions})
    weak = [r for r in regions if r.get("low_density_high_error")]
    for region in weak:
        problems.append({"kind": "outliers:region",
                         "title": f"a sparse region of {region['size']} samples with error rate "
                                  f"{region['error_rate']:.0%}",
                         "detail": "few training-like samples lie near these, and the model fails on them more "
                                   "than elsewhere: underrepresented cases", "count": int(region["size"]),
                         "page": "health", "section": "outliers", "ids": region["ids"][:MAX_IDS]})
    return {"n_flagged": int(found.flagged.sum()), "regions_low_density_high_error": len(weak), "space": space}


def inputs_part(ctx, problems: list) -> dict:
    from .input_stats import input_stats

    pre = ctx.dataset.preprocessing or {}
    labels = ctx.dataset.y if ctx.dataset.y.ndim == 1 and ctx.dataset.task != "regression" else None
    stats = input_stats(ctx.dataset.x, labels=labels, class_names=ctx.class_names if labels is not None else None,
                        seed=int(ctx.params.get("seed", 0)), reference=training_rows(ctx))
    record = stats.to_json()
    ids = np.asarray(ctx.dataset.ids)
    record["grid_ids"] = {str(k): _ids(ids[np.asarray(v, dtype=np.int64)]) for k, v in stats.grid.items()}
    corrupted = stats.corrupted
    record["corrupted_ids"] = [{"id": _ids([ids[int(r)]])[0], "reason": str(reason)}
                               for r, reason in zip(corrupted["row"], corrupted["reason"])]
    record["normalisation"] = {k: pre.get(k) for k in ("mean", "std") if pre.get(k) is not None}
    write_json(ctx.path(INPUTS), record)
    by_code: dict = {}
    for flag in stats.flags:  # one problem per kind of flag, however many channels it concerns
        by_code.setdefault(flag["code"], []).append(flag)
    for code, flags in by_code.items():
        more = f" (and {len(flags) - 1} more channels)" if len(flags) > 1 else ""
        rows = [r for f in flags for r in f.get("rows", [])]
        problems.append({"kind": f"inputs:{code}", "title": flags[0]["message"] + more,
                         "detail": "; ".join(f["message"] for f in flags[1:]), "count": len(rows) or None,
                         "page": "health", "section": "inputs", "ids": _ids(ids[np.asarray(rows, dtype=np.int64)])})
    if len(corrupted):
        reasons = corrupted["reason"].value_counts().to_dict()
        problems.append({"kind": "inputs:corrupted", "title": f"{len(set(corrupted['row']))} corrupted inputs",
                         "detail": "; ".join(f"{v} {k}" for k, v in reasons.items()),
                         "count": int(len(set(corrupted["row"]))), "page": "health", "section": "inputs",
                         "ids": _ids(pd.unique(ids[corrupted["row"].to_numpy(dtype=np.int64)]))})
    return {"flags": [f["code"] for f in stats.flags], "corrupted": int(len(set(corrupted["row"])))}


def data_health_stage(ctx) -> dict:
    """Pipeline stage: duplicates.parquet, shift.json, outliers.parquet/.json, inputs.json and data_health.json."""
    options = _options(ctx.params)
    points, space = search_points(ctx, options.get("near_space", "embeddings"))
    problems, skipped, summary = [], {}, {}
    @functools.cache
    def neighbours():  # one search for the near duplicates and the outliers, on the same points, at the larger k
        from .duplicates import nearest_neighbours

        if len(points) < 2 or np.asarray(points).dtype.kind not in "biuf":
            return None
        return nearest_neighbours(points, max(int(options.get("k", 5)), OUTLIER_K), seed=int(ctx.params.get("seed", 0)))

    parts = (("duplicates", lambda: duplicates_part(ctx, points, space, options, problems, neighbours())),
             ("shift", lambda: shift_part(ctx, options, problems)),
             ("outliers", lambda: outliers_part(ctx, points, space, options, problems, neighbours())),
             ("inputs", lambda: inputs_part(ctx, problems)))
    for name, part in parts:
        if ctx.report:
            ctx.report("data_health", PARTS.index(name) / len(PARTS))
        try:
            summary[name] = part()
        except InvalidOption:
            raise
        except Exception as exc:  # noqa: BLE001 - one part that fails or does not apply never stops the others
            reason = str(exc) if isinstance(exc, AnalyzerError) else \
                f"it failed ({type(exc).__name__}: {first_line(exc)})"
            if not isinstance(exc, AnalyzerError):
                LOG.warning("data health: %s was skipped: %s", name, reason)
            skipped[name] = reason.splitlines()[0]
    write_json(ctx.path(DATA_HEALTH), {"problems": problems, "skipped": skipped})
    return {**summary, "problems": len(problems), **({"skipped": skipped} if skipped else {})}
