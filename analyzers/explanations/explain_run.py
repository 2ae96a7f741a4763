"""Attributions and faithfulness scores for chosen samples of a stored run (`python -m analyzers explain`), and one
sample at a time for the dashboard, cached on disk inside the run.

Files written into the run directory (each atomically; new entries merged with what is there):
- `explanations/<method>/<target>.npz`: `ids`, `targets` (class explained), `attributions` (one row per id) and
  `settings` (one JSON object per id, what made its map: `ExplainResult.row_settings`; older files have none);
  `<target>` is `pred`, `label` or `class-K`.
- `explanations/faithfulness.parquet`: one row per (id, method, target) with deletion/insertion AUC, the completeness
  gap (Integrated Gradients and SHAP) with the steps (`ig_n_steps`) or draws (`shap_nsamples`) it ended with, the
  `settings` (JSON) that made the map, sanity-check rank correlation and flag, and ground-truth scores where the
  dataset plants them.
- `explanations/cache/`: randomisation checks and single-sample explanations, keyed by model hash, method, options
  and sample id; a map's entry holds its settings beside it.

SmoothGrad was the mean of |gradient| before it was named `smoothgrad_abs` (issue 16): a stored `smoothgrad` row or
map without settings is that variant, and is relabelled (table) or dropped (maps) when new ones are merged in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, InvalidOption
from .attributions import BACKGROUND_SIZE, METHODS, ExplainResult, explain, reduce_for_display, seeded_sample
from .faithfulness import CONTROLS, SANITY_SAMPLES, degenerate_maps, ground_truth_scores, interval_mask, randomised_correlation
from .perturbation import deletion_insertion, perturbation_columns, road, road_skip_reason
from ..evaluation.tasks import VALUE_OUTPUT
from ..loading.runs import read_cache_entry, write_atomic, write_parquet
from ..loading.sandbox import runs_in_worker

EXPLANATIONS = "explanations"
FAITHFULNESS = f"{EXPLANATIONS}/faithfulness.parquet"
CACHE = f"{EXPLANATIONS}/cache"
PROBE_SIZE = SANITY_SAMPLES  # samples on which the randomisation check's verdict is taken, once per model, method and options
KEY_COLUMNS = ("id", "method", "target")


def target_key(target) -> str:
    """"pred", "label" or "class-K": how a target choice is named in files."""
    if target in ("pred", "label"):
        return target
    try:
        return f"class-{int(target)}"
    except (TypeError, ValueError):
        raise AnalyzerError(f"--target must be pred, label or a class index, got {target!r}") from None


def resolve_rows(dataset, ids) -> np.ndarray:
    """Row indices of the dataset's samples with these ids (compared as text, as typed on a command line)."""
    from ..loading.sample_table import positions_of

    ids = list(dict.fromkeys(str(i) for i in ids))  # each sample once, in the order given
    if not ids:
        raise AnalyzerError("no sample ids given: pass --ids 1,2,3")
    every = np.asarray(dataset.ids)
    found = positions_of(every, ids)  # a dict of every id took 37 s of the dashboard's warm-up at 10M rows
    if len(found) != len(ids):
        known = {str(every[r]) for r in found}
        shown = ", ".join([i for i in ids if i not in known][:5])
        raise AnalyzerError(f"no sample with id {shown} in this run (ids look like "
                            f"{', '.join(map(str, every[:3]))}): check --ids")
    return found


def resolve_targets(run, dataset, rows: np.ndarray, target, num_classes: int) -> np.ndarray:
    from ..evaluation.tasks import task_named

    column = task_named(run.task, num_classes).value_column
    if column is not None:  # a regression: its predicted value (a Gaussian's mean) is what every map explains
        return np.full(len(rows), column, dtype=np.int64)
    key = target_key(target)
    if key == "pred":
        # the rows' predictions found by id (a dict of every id took seconds and GBs at 10M rows)
        samples = run.sample_table
        found = samples.positions([dataset.ids[r] for r in rows])
        if len(found) != len(rows):
            raise AnalyzerError("the run's samples table lacks some of the dataset's ids: the run is not of this "
                                "dataset; run python -m analyzers run again")
        return samples["pred"].to_numpy().astype(np.int64)[found]
    if key == "label":
        return dataset.y[rows].astype(np.int64)
    k = int(target)
    if not 0 <= k < num_classes:
        raise AnalyzerError(f"--target {k} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return np.full(len(rows), k, dtype=np.int64)


def ground_truth_mask(dataset, rows: np.ndarray, targets=None) -> np.ndarray | None:
    """The planted ground truth of these samples, if the dataset has one: an image mask (extras["mask"]), a
    sequence interval (metadata motif_start/motif_end) or a token (metadata trigger_position, the text sample's). A multi-label dataset's mask has one image per label
    (N, K, H, W): each row's mask is then that of its target label (`targets`, one per row)."""
    if "mask" in dataset.extras:
        masks = np.asarray(dataset.extras["mask"])
        if masks.ndim == 4 and dataset.y.ndim == 2:  # one mask per label
            if targets is None:
                return masks[rows].any(axis=1)  # where any label is drawn
            return masks[rows, np.asarray(targets, dtype=np.int64)].astype(bool)
        return masks[rows].astype(bool)
    meta = dataset.metadata
    if dataset.modality == "sequence" and {"motif_start", "motif_end"} <= set(meta.columns):
        return interval_mask(meta["motif_start"].to_numpy()[rows], meta["motif_end"].to_numpy()[rows],
                             dataset.x.shape[-1])
    if dataset.modality == "tokens" and "trigger_position" in meta.columns:  # a planted token (-1: none here)
        position = meta["trigger_position"].to_numpy()[rows].astype(np.int64)
        return (np.arange(dataset.attribution_shape[0])[None, :] == position[:, None]) & (position[:, None] >= 0)
    return None


def background_sample(dataset, seed: int = 0, size: int = BACKGROUND_SIZE) -> np.ndarray:
    """A fixed random sample of the dataset: shap's background and the 'mean' baseline."""
    return seeded_sample(dataset.x, seed, size)


def method_options(method: str, layer=None, options: dict | None = None) -> dict:
    opts = dict(options or {})
    if layer and method == "gradcam":
        opts.setdefault("layer", layer)
    unknown = set(opts) - set(METHODS[method].options) - {"seed"}
    if unknown:
        raise AnalyzerError(f"{method} takes no option {', '.join(sorted(unknown))}: its options are "
                            f"{', '.join(METHODS[method].options) or 'none'}")
    return opts


def probe_inputs(dataset, seed: int = 0, size: int = PROBE_SIZE) -> np.ndarray:
    """The fixed probe set of the randomisation check: PROBE_SIZE samples drawn with `seed`. The verdict is taken
    on it once per model, method and options, and every sample explained after shares it."""
    return background_sample(dataset, seed, size=size)


@runs_in_worker
def attribute_samples(model, x: np.ndarray, targets: np.ndarray, method: str, *, options: dict,
                      background: np.ndarray, batch_size: int, seed: int = 0) -> ExplainResult:
    """The maps alone, what a person waits for, through `explain` as the API computes them: Integrated Gradients
    and SHAP raise their steps / draws until complete. The result holds the completeness gap (NaN for the other
    methods), the steps or draws each sample ended with (-1 where they do not apply) and the settings."""
    options = dict(options)
    seed = options.pop("seed", seed)
    return explain(model, x, targets, method, batch_size=batch_size, background=background, seed=seed, details=True,
                   **options)


def _settings_json(result: ExplainResult) -> list:
    return [json.dumps(result.row_settings(i), sort_keys=True) for i in range(len(result.completeness_gap))]


@runs_in_worker(scratch_kwargs=("cache_dir",))
def faithfulness_table(model, x: np.ndarray, targets: np.ndarray, method: str, attr: np.ndarray, *, options: dict,
                       background: np.ndarray, mask: np.ndarray | None, batch_size: int, sanity: bool,
                       probe: np.ndarray | None, cache_dir, seed: int = 0) -> pd.DataFrame:
    """The scores of maps already computed, one row per sample: deletion and insertion AUC (raw, normalised and
    against a random order, `perturbation.PERTURBATION_COLUMNS`), ROAD where it applies, the randomisation check,
    and the planted ground truth's share where there is one. A regression's curves follow its predicted value, their
    normalised scores in units of f(x) - f(b) (`perturbation.DeletionInsertion`).

    The sanity verdict is taken on `probe` (cached in `cache_dir`), and each sample gets its own rank correlation
    with the fully randomised model's map: one more map per sample instead of one per layer."""
    base_choice = options.get("baseline", "zeros")
    # A constant (or all-zero) map ranks nothing: deleting "its most important pixels first" is an arbitrary order,
    # so it gets no faithfulness score, and it fails the sanity check.
    degenerate = degenerate_maps(attr)
    baseline = base_choice if isinstance(base_choice, str) else "zeros"
    # A regression's scores are in units of f(x) - f(b) and read a signed map as evidence for that span (a magnitude
    # map as it is), so b must be the map's own reference: SHAP's sums to f(x) - E[f(background)], whose input is
    # the background's mean ('mean'; on the prices sample SHAP's deletion_vs_random was -0.25 against zeros, +0.68
    # against the mean). A probability keeps the zeros it always had.
    value = getattr(model, "output_kind", None) == VALUE_OUTPUT
    if value and method == "shap" and "baseline" not in options:
        baseline = "mean"
    signed = METHODS[method].signed if method in METHODS else True
    curves = deletion_insertion(model, x, attr, targets, baseline=baseline, background=background,
                                batch_size=batch_size, seed=seed, signed=signed)
    table = pd.DataFrame({
        "deletion_auc": np.where(degenerate, np.nan, curves.deletion_auc).astype(np.float32),
        "insertion_auc": np.where(degenerate, np.nan, curves.insertion_auc).astype(np.float32),
        "degenerate": degenerate,
    })
    # ROAD imputes from neighbours: images and sequences only (its columns are NaN for tables and tokens)
    debiased = road(model, x, attr, targets, batch_size=batch_size, seed=seed, baseline=baseline,
                    background=background, signed=signed) if road_skip_reason(model, x) is None else None
    for column, values in perturbation_columns(curves, debiased).items():
        table[column] = np.where(degenerate, np.nan, values).astype(np.float32)
    if sanity:
        check_options = {**options, "background": background}
        # the verdict: on the probe set, once per model, method and options (cached), with sMPRT and eMPRT beside it
        probed = randomised_correlation(model, probe if probe is not None else x, method, None,
                                        batch_size=batch_size, seed=seed, cache_dir=cache_dir, **check_options)
        # this sample's own correlation, for reference: one more map, no noisy copies
        own = randomised_correlation(model, x, method, targets, attributions=attr, batch_size=batch_size, seed=seed,
                                     smooth_samples=0, randomisations=1, **check_options)
        verdict, smooth, complexity = probed.verdict, probed.smooth_verdict, probed.complexity_verdict
        table["sanity_rank_corr"] = own.corr.astype(np.float32)
        table["sanity_mean_corr"] = np.float32(verdict.statistic)
        table["sanity_ci_low"] = np.float32(verdict.ci_low)
        table["sanity_ci_high"] = np.float32(verdict.ci_high)
        table["sanity_samples"] = np.int64(verdict.samples)
        table["sanity_randomisations"] = np.int64(verdict.randomisations)
        table["sanity_smooth_corr"] = np.float32(smooth.statistic if smooth is not None else np.nan)
        table["sanity_complexity_rise"] = np.float32(complexity.statistic)
        table["sanity_flag"] = degenerate | (verdict.outcome == "fail")
        table["sanity_inconclusive"] = ~degenerate & (verdict.outcome == "inconclusive")
    else:
        for column in ("sanity_rank_corr", "sanity_mean_corr", "sanity_ci_low", "sanity_ci_high",
                       "sanity_smooth_corr", "sanity_complexity_rise"):
            table[column] = np.float32(np.nan)
        table["sanity_samples"] = np.int64(0)
        table["sanity_randomisations"] = np.int64(0)
        # not checked (its rank correlation is NaN), except that a degenerate map fails without a check; plain
        # bools, because this table crosses from a worker, where only numeric and boolean arrays do
        table["sanity_flag"] = degenerate
        table["sanity_inconclusive"] = np.zeros(len(table), dtype=bool)
    if mask is not None:
        truth = ground_truth_scores(attr, mask)
        table["mass_inside"] = np.where(degenerate, np.nan, truth.mass_inside).astype(np.float32)
        table["pointing_hit"] = truth.pointing_hit & ~degenerate  # a constant map points nowhere
    return table


def score_samples(model, x: np.ndarray, targets: np.ndarray, method: str, *, options: dict, background: np.ndarray,
                  mask: np.ndarray | None, batch_size: int, sanity: bool, probe: np.ndarray | None, cache_dir,
                  seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Attributions of `method` for `x` and their faithfulness scores, one row per sample."""
    result = attribute_samples(model, x, targets, method, options=options, background=background,
                               batch_size=batch_size, seed=seed)
    attr = result.attributions
    table = faithfulness_table(model, x, targets, method, attr, options=options, background=background, mask=mask,
                               batch_size=batch_size, sanity=sanity, probe=probe, cache_dir=cache_dir, seed=seed)
    table.insert(2, "completeness_gap", np.asarray(result.completeness_gap, dtype=np.float32))
    table.insert(3, "ig_n_steps", np.asarray(result.n_steps, dtype=np.int64))
    table.insert(4, "shap_nsamples", np.asarray(result.nsamples, dtype=np.int64))
    table.insert(5, "settings", _settings_json(result))
    return attr, table


# a method whose stored rows from before settings were stored are another variant, now named otherwise
_RENAMED = {"smoothgrad": "smoothgrad_abs"}


def _merge_npz(path: Path, ids: list, targets: np.ndarray, attr: np.ndarray, settings: list, *,
               drop_unsettled: bool = False) -> None:
    """Merge maps into a stored file; `drop_unsettled` drops stored maps without settings (another variant)."""
    ids = np.asarray([str(i) for i in ids])
    settings = np.asarray(settings, dtype=str)
    if path.exists():
        with np.load(path, allow_pickle=False) as old:
            keep = ~np.isin(old["ids"], ids)
            old_settings = old["settings"] if "settings" in old.files else np.full(len(old["ids"]), "")
            if drop_unsettled:
                keep &= old_settings != ""
            if old["attributions"].shape[1:] == attr.shape[1:]:
                ids = np.concatenate([old["ids"][keep], ids])
                targets = np.concatenate([old["targets"][keep], targets])
                attr = np.concatenate([old["attributions"][keep], attr])
                settings = np.concatenate([old_settings[keep], settings])

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, targets=targets, attributions=attr.astype(np.float32), settings=settings)

    write_atomic(path, _save)


def _merge_table(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    if path.exists():
        old = pd.read_parquet(path)
        unsettled = old["settings"].isna() if "settings" in old.columns else pd.Series(True, index=old.index)
        for name, variant in _RENAMED.items():
            old.loc[unsettled & (old["method"] == name), "method"] = variant
        keys = set(map(tuple, new[list(KEY_COLUMNS)].astype(str).to_numpy()))
        stale = old[list(KEY_COLUMNS)].astype(str).apply(tuple, axis=1).isin(keys)
        new = pd.concat([old[~stale], new], ignore_index=True)
    write_parquet(path, new)
    return new


@dataclass(frozen=True)
class ExplainRunResult:
    scores: pd.DataFrame  # the faithfulness rows written, one per sample and method that applied
    skipped: dict  # method -> the one line that says why it does not apply here (nothing of it was written)


def explain_run(run_dir, ids, methods, *, target="pred", layer=None, batch_size: int = 64, sanity: bool = True,
                seed: int = 0, model=None, dataset=None, options: dict | None = None,
                allow_import: bool = False, engine: str = "process", ray_address: str | None = None,
                ray_actors: int | None = None) -> ExplainRunResult:
    """Explain samples `ids` of a stored run with each of `methods`, write the files into the run, and return the
    faithfulness rows written. `model`/`dataset` (already loaded) skip reloading them. `allow_import` (the command
    line only) rebuilds a state dict's import-path architecture. `engine="ray"` computes the maps and scores in a
    Ray Data actor pool (`engines.ray_engine.explain_on_ray`: on the cluster at `ray_address`, or a local Ray),
    and writes them here as an in-process run does.

    A method that does not apply (Grad-CAM without a convolution, a layer that runs twice) is reported in `skipped`
    and the others still run; only when none applies is that an error."""
    from ..engines.pipeline import load_run_inputs
    from ..loading.runs import open_run

    if engine not in ("process", "ray"):
        raise AnalyzerError(f"engine must be 'process' or 'ray', got {engine!r}")
    if engine != "ray" and (ray_address is not None or ray_actors is not None):
        raise AnalyzerError("--ray-address and --ray-actors go with --engine ray")
    run = open_run(run_dir)
    given = model  # a model the caller handed over (a module no file holds) goes to the Ray actors as it is
    if model is None or dataset is None:
        model, dataset = load_run_inputs(run, allow_import=allow_import)
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AnalyzerError(f"unknown method {', '.join(bad)}: choose from {', '.join(METHODS)}")
    rows = resolve_rows(dataset, ids)
    key = target_key(target)
    targets = resolve_targets(run, dataset, rows, target, model.num_classes)
    x = dataset.x[rows]
    sample_ids = [str(dataset.ids[r]) for r in rows]
    background = background_sample(dataset, seed)
    probe = probe_inputs(dataset, seed)
    mask = ground_truth_mask(dataset, rows, targets)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tables, skipped = [], {}
    chosen = {}
    for method in methods:
        try:
            chosen[method] = method_options(method, layer, (options or {}).get(method))
        except InvalidOption:
            raise
        except AnalyzerError as exc:  # an option this method does not take: as a method that does not apply
            skipped[method] = str(exc)
    distributed = None
    if engine == "ray" and chosen:
        from ..engines.ray_engine import explain_on_ray

        distributed = explain_on_ray(run, model, x, targets, mask, chosen, background=background, probe=probe,
                                     batch_size=batch_size, sanity=sanity, seed=seed, address=ray_address,
                                     actors=ray_actors, allow_import=allow_import, given=given)
    for method, opts in chosen.items():
        try:
            if distributed is not None:
                if isinstance(distributed[method], str):
                    raise AnalyzerError(distributed[method])
                attr, table = distributed[method]
            else:
                attr, table = score_samples(model, x, targets, method, options=opts, background=background,
                                            mask=mask, batch_size=batch_size, sanity=sanity, probe=probe,
                                            cache_dir=run.file(CACHE), seed=seed)
        except InvalidOption:
            raise  # a mistyped option (LIME's n_samples, ...) is the caller's to fix, not a method that does not apply
        except AnalyzerError as exc:
            skipped[method] = str(exc)
            continue
        _merge_npz(run.file(f"{EXPLANATIONS}/{method}/{key}.npz"), sample_ids, targets, attr,
                   list(table["settings"]), drop_unsettled=method in _RENAMED)
        table.insert(0, "id", sample_ids)
        table.insert(1, "method", method)
        table.insert(2, "target", key)
        table.insert(3, "target_class", targets)
        table["options"] = json.dumps(opts, sort_keys=True, default=str)
        table["created"] = created
        tables.append(table)
    if not tables:
        raise AnalyzerError("; ".join(f"{method}: {reason}" for method, reason in skipped.items()))
    written = pd.concat(tables, ignore_index=True)
    _merge_table(run.file(FAITHFULNESS), written)
    return ExplainRunResult(scores=written, skipped=skipped)


def explain_command(args) -> int:
    """`python -m analyzers explain RUN_DIR --ids ... --method ... [--target] [--layer] [--batch-size]`."""
    if args.batch_size < 1:
        raise AnalyzerError(f"--batch-size must be at least 1, got {args.batch_size}")
    result = explain_run(args.run_dir, args.ids, args.method, target=args.target, layer=args.layer,
                         batch_size=args.batch_size, allow_import=True, engine=args.engine,
                         ray_address=args.ray_address, ray_actors=args.ray_actors)
    written = result.scores
    for method, reason in result.skipped.items():
        print(f"skipped {method}: {reason}", file=sys.stderr)
    summary = written.groupby("method").agg(samples=("id", "size"), deletion_auc=("deletion_auc", "mean"),
                                            insertion_auc=("insertion_auc", "mean"),
                                            completeness_gap=("completeness_gap", "max"),
                                            sanity_corr=("sanity_mean_corr", "first"),
                                            sanity_flag=("sanity_flag", lambda f: bool(f.fillna(False).any())),
                                            degenerate=("degenerate", "sum"))
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    flagged = [m for m, f in summary["sanity_flag"].items() if f]
    if flagged:
        print(f"warning: {', '.join(flagged)} barely change(s) when the model is randomised: those maps do not "
              f"reflect what the model learned", file=sys.stderr)
    print(f"written to {Path(args.run_dir) / EXPLANATIONS}")
    return 0


# --- one sample, for the dashboard -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleExplanation:
    id: str
    method: str
    target_class: int
    attribution: np.ndarray  # one sample's shape
    display: np.ndarray  # heat map (H, W), per-position (L,) or per-feature (F,) scores
    # completeness_gap (Integrated Gradients, SHAP; None otherwise), ig_n_steps / shap_nsamples (-1 where they do
    # not apply), then from `sample_scores`: deletion_auc, insertion_auc, sanity_rank_corr, sanity_flag, ...
    scores: dict
    # what made the map (`ExplainResult.row_settings`): baseline and n_steps used, noise std and nt_samples, SHAP's
    # nsamples used and background size, Grad-CAM's layer, occlusion's window; {} for a method without options
    settings: dict = dataclasses.field(default_factory=dict)


def _read_cached(path: Path, *, shape, settings: bool = False) -> tuple[np.ndarray | None, dict, dict] | None:
    """A cached (attribution or None, scores, settings), or None when there is none or it is damaged (then it is
    recomputed). `settings`: the entry must hold them (a map's)."""
    entry = read_cache_entry(path)
    if entry is None or not {"scores"} | ({"settings"} if settings else set()) <= set(entry) <= {
            "attribution", "scores", "settings"}:
        return None
    try:
        scores = json.loads(str(entry["scores"]))
        stored = json.loads(str(entry["settings"])) if "settings" in entry else {}
    except ValueError:
        return None
    attr = entry.get("attribution")
    if not isinstance(scores, dict) or not isinstance(stored, dict) or (
            attr is not None and (attr.shape != tuple(shape) or attr.dtype.kind != "f")):
        return None
    return attr, scores, stored


def _write_cached(path: Path, scores: dict, attribution: np.ndarray | None = None, settings: dict | None = None
                  ) -> None:
    def _save(tmp: Path) -> None:
        arrays = {"scores": np.asarray(json.dumps(scores))}
        if attribution is not None:
            arrays["attribution"] = attribution
        if settings is not None:
            arrays["settings"] = np.asarray(json.dumps(settings, sort_keys=True))
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, _save)


def _plain(value):
    """A table cell as JSON has it: None for NaN, bool for booleans, float otherwise."""
    if pd.isna(value):
        return None
    return bool(value) if isinstance(value, (bool, np.bool_)) else float(value)


def _opened(run, model, dataset) -> tuple:
    """(run, model, dataset): `run` opened if it is a path, and its model and dataset loaded unless given (the
    dashboard passes the ones it holds)."""
    from ..engines.pipeline import load_run_inputs
    from ..loading.runs import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    if model is None or dataset is None:
        model, dataset = load_run_inputs(run)
    return run, model, dataset


def _sample_setup(run, sample_id, method, model, dataset, options):
    if method not in METHODS:
        raise AnalyzerError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    run, model, dataset = _opened(run, model, dataset)
    return run, model, dataset, resolve_rows(dataset, [sample_id]), method_options(method, None, options)


def _cache_file(run, kind: str, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True, default=str)
    return run.file(f"{CACHE}/{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz")


def sample_map(run, sample_id, method: str, *, target="pred", model=None, dataset=None, batch_size: int = 64,
               seed: int = 0, **options) -> SampleExplanation:
    """One sample's map, without its scores (`scores` holds only the completeness gap of Integrated Gradients and
    SHAP, with the steps or draws it ended with, which come with the map) and with the `settings` that made it:
    what the dashboard draws first. Cached under the run's explanations/cache by (model hash, method, options,
    sample id, target class)."""
    run, model, dataset, rows, opts = _sample_setup(run, sample_id, method, model, dataset, options)
    targets = resolve_targets(run, dataset, rows, target, model.num_classes)
    # "map": 3 since SmoothGrad's, SHAP's and LIME's draws are each sample's own (`sample_seeds`); 2 since SHAP is
    # checked, settings are stored and smoothgrad is Smilkov's (issue 16): older entries are recomputed
    key = {"map": 3, "model": model.sha256, "method": method, "options": opts, "id": str(sample_id),
           "target": int(targets[0]), "seed": seed}
    path = _cache_file(run, "map", key)
    cached = _read_cached(path, shape=dataset.attribution_shape, settings=True)
    if cached is not None and cached[0] is not None:
        attr, scores, settings = cached
    else:
        result = attribute_samples(model, dataset.x[rows], targets, method, options=opts,
                                   background=background_sample(dataset, seed), batch_size=batch_size, seed=seed)
        attr = result.attributions[0]
        scores = {"completeness_gap": _plain(result.completeness_gap[0]), "ig_n_steps": int(result.n_steps[0]),
                  "shap_nsamples": int(result.nsamples[0])}
        settings = result.row_settings(0)
        _write_cached(path, scores, attr, settings)
    return SampleExplanation(id=str(sample_id), method=method, target_class=int(targets[0]), attribution=attr,
                             display=reduce_for_display(attr[None], dataset.modality)[0], scores=scores,
                             settings=settings)


def sample_scores(run, explanation: SampleExplanation, *, model=None, dataset=None, batch_size: int = 64,
                  sanity: bool = True, seed: int = 0, **options) -> dict:
    """The faithfulness scores of a map from `sample_map` (the same `options`): deletion and insertion AUC, the
    sanity check (its verdict from the run's fixed probe set, computed once per model, method and options; this
    sample's own correlation), and the planted ground truth's share. Cached like the map."""
    method, sample_id = explanation.method, explanation.id
    # the map's own target class: resolving "pred" again would read every sample's prediction on every click
    run, model, dataset, rows, opts = _sample_setup(run, sample_id, method, model, dataset, options)
    targets = np.asarray([explanation.target_class], dtype=np.int64)
    # "scores": 7 since the random methods' draws are each sample's own; 6 since the verdict is over three
    # randomised models; 5 since smoothgrad is Smilkov's and the maps' own cache moved to "map": 2 (issue 16); 4
    # when the verdict got its interval, sMPRT and eMPRT: entries from before are recomputed
    key = {"scores": 7, "model": model.sha256, "method": method, "options": opts, "id": str(sample_id),
           "target": int(targets[0]), "sanity": sanity, "seed": seed}
    path = _cache_file(run, "scores", key)
    cached = _read_cached(path, shape=dataset.attribution_shape)
    if cached is not None:
        return {**explanation.scores, **cached[1]}
    table = faithfulness_table(model, dataset.x[rows], targets, method, explanation.attribution[None], options=opts,
                               background=background_sample(dataset, seed), mask=ground_truth_mask(dataset, rows, targets),
                               batch_size=batch_size, sanity=sanity,
                               probe=probe_inputs(dataset, seed) if sanity else None, cache_dir=run.file(CACHE),
                               seed=seed)
    scores = {k: _plain(v) for k, v in table.iloc[0].items()}
    _write_cached(path, scores)
    return {**explanation.scores, **scores}


@runs_in_worker(scratch_kwargs=("cache_dir",))
def control_table(model, probe: np.ndarray, *, batch_size: int, cache_dir, seed: int = 0) -> pd.DataFrame:
    """The randomisation check of the controls (`CONTROLS`, in their order) on the probe set: one row each, with
    the mean |ρ|, its interval, and whether it failed or was inconclusive."""
    rows = []
    for name in CONTROLS:
        verdict = randomised_correlation(model, probe, name, None, batch_size=batch_size, seed=seed,
                                         cache_dir=cache_dir).verdict
        rows.append({"mean_corr": verdict.statistic, "ci_low": verdict.ci_low, "ci_high": verdict.ci_high,
                     "samples": verdict.samples, "flag": verdict.outcome == "fail",
                     "inconclusive": verdict.outcome == "inconclusive"})
    return pd.DataFrame(rows)


def sanity_controls(run, *, model=None, dataset=None, batch_size: int = 64, seed: int = 0) -> dict:
    """{control name: its verdict's numbers} on the run's probe set: what a map with a known verdict gets, shown
    beside every method's (a random map passes, an edge detector of the input fails). Cached in the run."""
    run, model, dataset = _opened(run, model, dataset)
    table = control_table(model, probe_inputs(dataset, seed), batch_size=batch_size, cache_dir=run.file(CACHE),
                          seed=seed)
    return {name: {k: _plain(v) for k, v in row.items()} for name, (_, row) in zip(CONTROLS, table.iterrows())}


def explain_sample(run, sample_id, method: str, *, target="pred", model=None, dataset=None, batch_size: int = 64,
                   sanity: bool = True, seed: int = 0, **options) -> SampleExplanation:
    """One sample's map and its faithfulness scores (`sample_map`, then `sample_scores`), both cached in the run.
    `run` is an opened Run or its path; pass the dashboard's loaded model and dataset."""
    run, model, dataset = _opened(run, model, dataset)
    explanation = sample_map(run, sample_id, method, target=target, model=model, dataset=dataset,
                             batch_size=batch_size, seed=seed, **options)
    scores = sample_scores(run, explanation, model=model, dataset=dataset, batch_size=batch_size, sanity=sanity,
                           seed=seed, **options)
    return dataclasses.replace(explanation, scores=scores)
