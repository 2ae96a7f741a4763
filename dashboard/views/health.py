"""Data health: the splits side by side, every data problem found, shift between the splits, duplicates and leaks,
outliers and sparse regions, the inputs as the model receives them, robustness curves and the inference profile
(analyzers.data_health). The first six are read from the run; the curves and the profile are computed on asking
and kept in it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.data_health.stage import DUPLICATES, INPUTS, OUTLIER_SUMMARY, OUTLIERS, SHIFT
from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, health, state
from dashboard.text import md

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Data health", run, "Is the data the model sees the data it should see? Splits, shift, copies, "
                                      "outliers, the inputs as the model receives them, and how fast and how "
                                      "robust the model is on them.")
NUMBER = st.column_config.NumberColumn(format="%.4g")
P_VALUE = st.column_config.NumberColumn(format="%.2g")


def _show_gallery(ids: list, key: str) -> None:
    """The samples `ids` in the gallery (and as the gallery the Explain page pages through)."""
    ids = [i for i in ids if i is not None]
    if components.fresh(f"{key}-ids", tuple(map(str, ids))):
        state.set_gallery(ids)
    components.gallery(run, ids, key=key)


health.splits_panel(run, data.metrics(run), detailed=True)
st.subheader("Problems found")
health.problems_panel(run, key="health-problems", galleries=True)

# ---------------------------------------------------------------------------------------------------------- shift
def _shift_pair(pair: dict, key: str) -> None:
    """One pair's shift: the domain AUC and MMD, the per-feature tests, the samples that separate the two sides
    best, and (a run's own splits) the error slices that grew or shrank."""
    a, b = pair["a"], pair["b"]
    st.markdown(f"**{md(b)} against {md(a)}** ({pair.get('n_b', '?')} and {pair.get('n_a', '?')} samples)")
    cols = st.columns(3)
    auc = pair.get("domain_auc")
    cols[0].metric("Domain classifier AUC", "n/a" if auc is None else f"{auc:.3f}",
                   help="A logistic regression on the model's embeddings, cross-validated, telling the two "
                        "sides apart: 0.5 they look alike, 1.0 they are separate.")
    cols[1].metric("MMD²", "n/a" if pair.get("mmd") is None else f"{pair['mmd']:.4g}",
                   help="Maximum mean discrepancy between the two sides' embeddings (Gaussian kernel).")
    cols[2].metric("MMD permutation p", "n/a" if pair.get("mmd_p") is None else f"{pair['mmd_p']:.3g}")
    features = pd.DataFrame(pair.get("features") or [])
    if len(features):
        st.caption(f"Per-feature tests (KS for numbers, chi-square for categories), Holm-corrected over "
                   f"{len(features)} features; shifted: adjusted p < {pair.get('alpha', 0.05)}.")
        st.dataframe(features.sort_values("p_value"), hide_index=True,
                     column_config={"p_value": P_VALUE, "p_adjusted": P_VALUE, "statistic": NUMBER,
                                    "effect": NUMBER, "mean_difference": NUMBER})
    embedding = pair.get("embedding") or {}
    side = st.radio("Samples that separate the two best", [b, a], horizontal=True, key=f"{key}-side",
                    help="The rows the domain classifier is surest about: the most typical of their own side.")
    top = embedding.get("top_b" if side == b else "top_a") or []
    if st.checkbox("Show them", key=f"{key}-show"):
        if side == a and pair.get("run_a") is False:
            st.caption(f"These are samples of {md(a)}: open that run to see them.")
        else:
            _show_gallery([e.get("id") for e in top], key=f"{key}-gallery")
    slices = pd.DataFrame(pair.get("slices") or [])
    if len(slices):
        st.caption(f"Error slices between {md(a)} and {md(b)}: share of each split and error rate, Fisher's exact "
                   f"test, Holm-corrected. 'absent': the slice has no samples in one split.")
        st.dataframe(slices, hide_index=True,
                     column_config={c: P_VALUE for c in slices.columns if c.endswith(("_p", "_p_adjusted"))})


st.subheader("Shift between splits")
shift = data.optional_json(run, SHIFT)
skipped = (health.data_problems(run) or ([], {}))[1]
if shift is None:
    st.caption(f"Between its splits: {md(skipped.get('shift', 'the data-health check did not run'))}")
else:
    for number, pair in enumerate(shift.get("pairs") or []):
        _shift_pair(pair, key=f"shift-{number}")
model_sha, data_sha = run.info["model"]["sha256"], run.info["dataset"]["sha256"]
other_runs = {}
for name, path in data.usable_runs().items():
    info = data.run_status(path)[0] or {}
    if name != run.path.name and info.get("model", {}).get("sha256") == model_sha and \
            info.get("dataset", {}).get("sha256") != data_sha:
        other_runs[name] = path
if other_runs:
    chosen_run = st.selectbox("Against another run of this model on other data", ["(none)", *other_runs],
                              key="shift-other-run",
                              help="The other run's data (a) against this run's (b), in the model's embedding "
                                   "space and on the data columns both hold.")
    if chosen_run != "(none)":
        try:
            between = data.run_shift(data.load_run(other_runs[chosen_run]), run)
        except AnalyzerError as exc:
            st.error(md(exc))
        else:
            _shift_pair({**between, "run_a": False}, key="shift-run")
else:
    st.caption("No other run of this model on other data to compare this run's data with: analyse a new dataset "
               "with the same model to see whether it has moved.")

# ----------------------------------------------------------------------------------------------------- duplicates
st.subheader("Duplicates and leaks")
pairs = data.optional_table(run, DUPLICATES)
if pairs is None:
    st.caption(f"Not in this run: {md(skipped.get('duplicates', 'the data-health check did not run'))}")
elif not len(pairs):
    st.markdown("No exact or near copy was found.")
else:
    counts = pairs["kind"].value_counts()
    kinds = [k for k in ("leak", "conflicting-label", "exact", "near") if counts.get(k)]
    cols = st.columns(len(kinds))
    for col, kind in zip(cols, kinds):
        col.metric(kind, int(counts[kind]))
    kind = st.radio("Kind", kinds, horizontal=True, key="dup-kind")
    chosen = pairs[pairs["kind"] == kind].reset_index(drop=True)
    st.dataframe(chosen, hide_index=True, column_config={"distance": NUMBER})
    pick = st.selectbox("Pair", range(len(chosen)), key="dup-pair",
                        format_func=lambda i: f"{chosen['id_a'][i]} and {chosen['id_b'][i]} "
                                              f"({chosen['match'][i]}, distance {chosen['distance'][i]:.3g})")
    if pick is not None:
        _show_gallery([chosen["id_a"][pick], chosen["id_b"][pick]], key="dup-pair-gallery")

# ------------------------------------------------------------------------------------------------------- outliers
st.subheader("Outliers and sparse regions")
scores = data.optional_table(run, OUTLIERS)
summary = data.optional_json(run, OUTLIER_SUMMARY)
if scores is None or summary is None:
    st.caption(f"Not in this run: {md(skipped.get('outliers', 'the data-health check did not run'))}")
else:
    against = "the training split" if summary.get("reference_rows", 0) < summary.get("n", 0) else "all samples"
    st.caption(f"Score: {md(summary['method'])} on the {md(summary.get('space', ''))}, measured against {against} "
               f"({summary['reference_rows']:,} rows); the {summary['n_flagged']:,} highest "
               f"({summary['contamination']:.0%}) are flagged.")
    regions = pd.DataFrame(summary.get("regions") or [])
    if len(regions):
        shown = regions.drop(columns=["ids"], errors="ignore")
        shown[["error_rate", "overall_error_rate"]] *= 100
        st.dataframe(shown, hide_index=True,
                     column_config={"density_score": NUMBER, "error_rate": components.percent_column(),
                                    "overall_error_rate": components.percent_column(), "p_value": P_VALUE,
                                    "p_adjusted": P_VALUE})
        st.caption(f"Regions (k-means on the same space): density score above {summary.get('low_density', '?')} "
                   f"is sparse; 'low_density_high_error': sparse and significantly more wrong than the rest.")
        region = st.selectbox("Region to show", regions.index, key="outlier-region",
                              format_func=lambda i: f"region {regions['region'][i]}: {regions['size'][i]} samples, "
                                                    f"{regions['error_rate'][i]:.0%} wrong, density score "
                                                    f"{regions['density_score'][i]:.3g}")
        if region is not None and st.checkbox("Show its samples", key="outlier-region-show"):
            _show_gallery(list(regions["ids"][region]), key="outlier-region-gallery")
    if st.checkbox("Show the most isolated samples", key="outlier-top-show"):
        top = scores.sort_values("score", ascending=False).head(60)
        _show_gallery(top["id"].tolist(), key="outlier-top-gallery")

# --------------------------------------------------------------------------------------------------------- inputs
st.subheader("The inputs as the model receives them")
inputs = data.optional_json(run, INPUTS)
if inputs is None:
    st.caption(f"Not in this run: {md(skipped.get('inputs', 'the data-health check did not run'))}")
else:
    channels = pd.DataFrame(inputs.get("channels") or [])
    if len(channels):
        st.plotly_chart(figures.channel_stats_figure(channels), key="inputs-channels",
                        config={"displayModeBar": False})
        st.dataframe(channels, hide_index=True, column_config={c: NUMBER for c in ("mean", "std", "min", "max")})
    expected = inputs.get("expected") or {}
    if expected.get("mean"):
        st.caption("Expected per channel (from the training split): mean " +
                   ", ".join(f"{v:.3g}" for v in expected["mean"]) + "; std " +
                   ", ".join(f"{v:.3g}" for v in expected["std"]) + ".")
    for flag in inputs.get("flags") or []:
        st.warning(md(flag["message"]), icon=":material/warning:")
    corrupted = pd.DataFrame(inputs.get("corrupted_ids") or [])
    if len(corrupted):
        st.markdown(f"**{corrupted['id'].nunique()} corrupted inputs**")
        st.dataframe(corrupted, hide_index=True)
        if st.checkbox("Show them", key="inputs-corrupted-show"):
            _show_gallery(list(pd.unique(corrupted["id"])), key="inputs-corrupted-gallery")
    grid = inputs.get("grid_ids") or {}
    if grid:
        name = st.selectbox("Random samples of a class", list(grid), key="inputs-grid-class")
        _show_gallery(list(grid[name]), key="inputs-grid-gallery")


# ----------------------------------------------------------------------------------------------------- robustness
def _robustness() -> None:
    from analyzers.data_health.robustness import MODALITIES, PERTURBATIONS
    from analyzers.data_health.stored import MAX_SAMPLES, run_robustness, stored_robustness

    st.subheader("Robustness")
    shape = run.info["model"].get("input_shape") or []
    modality = MODALITIES.get(len(shape) + 1)
    names = [n for n, p in PERTURBATIONS.items() if modality in p.modalities]
    if run.info["dataset"]["modality"] in ("text", "tokens") or not names:
        st.caption("Robustness curves perturb numeric inputs (images, sequences, tables); this run's inputs are "
                   "token ids.")
        return
    cols = st.columns([2, 1, 1])
    perturbation = cols[0].selectbox("Perturbation", [*names, "fgsm"], key="robust-perturbation",
                                     format_func=lambda n: "FGSM (an attack, not a natural perturbation)"
                                     if n == "fgsm" else n.replace("_", " "))
    max_samples = int(cols[1].number_input("Samples", 50, 20000, MAX_SAMPLES, step=50, key="robust-samples"))
    if cols[2].button("Compute", key="robust-compute", type="primary"):
        try:
            model, dataset = data.run_inputs(run)
            with components.progress_bar("Perturbing and predicting…",
                                         lambda done, total: f"{done:,} of {total:,} batches") as on_batch:
                run_robustness(run.path, perturbation=perturbation, max_samples=max_samples, model=model,
                               dataset=dataset, on_batch=on_batch)
        except AnalyzerError as exc:
            st.error(md(exc))
    kept = stored_robustness(run.path)
    if not kept:
        st.caption("No curve yet: pick a perturbation and compute it (kept in the run).")
        return
    index = st.selectbox("Curve", range(len(kept)), key="robust-curve",
                         format_func=lambda i: f"{kept[i][0]['perturbation']} on {len(kept[i][2]):,} samples")
    key, curve, ids = kept[index]
    view = st.radio("Lines", ["classes", "slices and splits"], horizontal=True, key="robust-lines")
    if view == "classes" and len(curve.class_values):
        groups = {components.class_name(run, k): v for k, v in enumerate(curve.class_values)
                  if curve.class_counts[k]}
    else:
        groups = {name: v for name, v, count in zip(curve.slice_names, curve.slice_values, curve.slice_counts)
                  if count}
    st.plotly_chart(figures.robustness_figure(curve.strengths, curve.values, metric=curve.metric, unit=curve.unit,
                                              groups=groups, adversarial=curve.adversarial),
                    key="robust-figure", config={"displayModeBar": False})
    if curve.adversarial:
        st.caption("FGSM moves each sample one step against its own gradient: the worst direction, an attack, "
                   "not a perturbation a camera or a sensor makes.")
    st.dataframe(curve.table(), hide_index=True)
    first = curve.first_flipping(24)
    if len(first):
        st.caption(f"The {len(first)} samples whose prediction changes at the lowest strength (first at "
                   f"{curve.first_flip[first[0]]:g}).")
        _show_gallery([ids[r] for r in first], key="robust-flips")


_robustness()


# -------------------------------------------------------------------------------------------------------- profile
def _profile() -> None:
    from analyzers.data_health.stored import run_profile, stored_profile

    st.subheader("Inference profile")
    device = (run.info.get("parameters") or {}).get("device") or "cpu"
    if st.button(f"Profile the model on {md(device)}", key="profile-compute"):
        try:
            model, dataset = data.run_inputs(run)
            with st.spinner("Timing forwards at each batch size, then under torch.profiler…"):
                run_profile(run.path, device=device, model=model, dataset=dataset)
        except AnalyzerError as exc:
            st.error(md(exc))
    profile = stored_profile(run.path)
    if profile is None:
        st.caption("Not measured yet: latency and throughput per batch size, time and memory per layer (kept in "
                   "the run).")
        return
    cols = st.columns(4)
    cols[0].metric("Parameters", f"{profile.num_params:,}")
    cols[1].metric("Model size", f"{profile.model_bytes / 1e6:.2f} MB")
    best = int(np.argmax(profile.throughput))
    cols[2].metric("Best throughput", f"{profile.throughput[best]:,.0f}/s",
                   help=f"at batch size {profile.batch_sizes[best]}")
    cols[3].metric("Latency at batch 1", f"{1e3 * profile.latency_p50[0]:.2f} ms"
                   if profile.batch_sizes[0] == 1 else "n/a")
    st.plotly_chart(figures.latency_figure(profile.batch_sizes, profile.latency_p50, profile.latency_p95,
                                           profile.throughput), key="profile-latency",
                    config={"displayModeBar": False})
    layers = pd.DataFrame({"layer": profile.layers, "kind": profile.kinds, "leaf": profile.leaf,
                           "parameters": profile.params, "calls": profile.calls, "ms": 1e3 * profile.time,
                           "share": 100 * profile.share, "memory (KB)": profile.memory_bytes / 1e3,
                           "output (KB)": profile.output_bytes / 1e3})
    st.caption(f"Per layer at batch {profile.profile_batch_size} under torch.profiler ({1e3 * profile.profiled_time:.2f}"
               f" ms per forward, its hooks included); time includes a layer's submodules.")
    st.dataframe(layers[layers["leaf"]].sort_values("ms", ascending=False), hide_index=True,
                 column_config={"ms": NUMBER, "share": components.percent_column(), "memory (KB)": NUMBER,
                                "output (KB)": NUMBER})


_profile()
