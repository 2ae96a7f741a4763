"""Embeddings: a layer's activations projected to 2-D, coloured by anything; box or lasso to select samples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection, id_positions, region_mask, selected_ids

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Embeddings", run, "Each point is a sample, placed by a projection of a layer's activations. "
                                     "Drag a box (or pick the lasso in the chart toolbar) to select samples.")
samples = run.sample_table
names = run.class_names
task = data.run_task(run)

layers = data.embedding_layers(run)
if not layers:
    components.not_in_run("No layer's activations are", "Run the analysis with --layer, or collect a layer below.")
METHOD_LABELS = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
controls = st.columns([2, 1, 2])
layer = controls[0].selectbox("Layer", layers, key="emb-layer",
                              help="Activations entering the run's embedding layer, or leaving a collected layer.")
method = controls[1].segmented_control("Projection", list(METHOD_LABELS), default="pca",
                                       format_func=METHOD_LABELS.get, key="emb-method") or "pca"
colour_options = ["label", "prediction", "correct", "confidence", "loss", "slice"] if task.has_classes else \
    ["correct", task.error_column, "loss", "label", "prediction", "slice"]  # coloured by the task's error first
colour_options += data.grouping_columns(run, run.info["dataset"].get("metadata_columns") or [])[0]
colour = controls[2].selectbox("Colour by", colour_options, key="emb-colour")

with st.expander("Collect another layer"):
    model_layers = [n for n in run.info["model"].get("layers", []) if n not in layers]
    other = st.selectbox("Layer to collect", model_layers, key="emb-collect-layer")
    if st.button("Collect its activations", key="emb-collect", disabled=not model_layers):
        try:
            with st.spinner(f"Running the model to collect {md(other)}…"):
                data.collect_layer(run, other)
            st.rerun()
        except AnalyzerError as exc:
            st.error(md(exc))

if not layer:
    st.stop()


@st.fragment(run_every=1.0)
def _watch(job) -> None:
    """The running projection's progress, redrawn every second; the page reruns whole when it ends."""
    if job.state != "running":
        st.rerun(scope="app")
    left = job.remaining_s
    eta = f", about {components.duration(left)} left" if left is not None else ""
    st.progress(min(max(job.fraction, 0.0), 1.0),
                text=f"{METHOD_LABELS[job.method]} of {md(job.layer)}: {md(job.stage)} "
                     f"({components.duration(job.elapsed_s)} so far{eta})")
    if st.button("Cancel", key=f"emb-cancel-{job.method}-{job.layer}"):
        job.cancel()
        st.rerun(scope="app")


projection = data.projection(run, layer, method)
if projection is None:
    job = data.projection_job(run, layer, method)
    if job is not None and job.state == "running":
        _watch(job)
        st.stop()
    if job is not None and job.state == "failed":
        st.error(f"The {METHOD_LABELS[method]} projection of {md(layer)} failed: {md(job.error)}")
    elif job is not None and job.state == "cancelled":
        st.info(f"The {METHOD_LABELS[method]} projection of {md(layer)} was cancelled; nothing of it was stored.")
    st.info(f"The {METHOD_LABELS[method]} projection of {md(layer)} is not in this run yet. t-SNE and UMAP are fitted "
            f"on at most 10,000 samples (after PCA to 50 dimensions) and the rest placed into the fitted map; the "
            f"result is stored in the run. It runs in the background, with its progress here; you can cancel it.")
    if st.button(f"Compute {METHOD_LABELS[method]}", type="primary", key="emb-compute"):
        data.start_projection(run, layer, method)
        st.rerun()
    st.stop()


def _colour_column(table: pd.DataFrame) -> tuple[pd.Series, bool, list | None]:
    ids, own = table["id"].to_numpy(), samples["id"].to_numpy()
    # a projection of every sample lists them in the samples' order: no lookup (1M ids as text took 0.6 s)
    rows = None if len(ids) == len(own) and np.array_equal(ids, own) else id_positions(data.id_index(run), ids)

    def stored(name: str) -> pd.Series:
        # one kept column in the projection's order, not a frame of several: at 10M rows each is 40-80 MB
        values = samples[name]
        return (values if rows is None else values.iloc[rows]).reset_index(drop=True)

    if colour in ("label", "prediction") and task.has_classes:
        codes = stored("label" if colour == "label" else "pred").to_numpy()
        # categories, not a text per sample: pandas turned 10M texts into Arrow strings and back in 3.4 s
        if len(set(names)) == len(names):
            return pd.Series(pd.Categorical.from_codes(codes, categories=list(names))), True, list(names)
        return pd.Series(np.asarray(names, object)[codes]), True, list(names)
    if colour == "correct":
        codes = (~stored("correct").to_numpy(dtype=bool)).astype(np.int8)
        return pd.Series(pd.Categorical.from_codes(codes, categories=["right", "wrong"])), True, ["right", "wrong"]
    if colour == "slice":
        membership = data.slice_membership(run)
        values = membership if rows is None else membership.iloc[rows]
        values = values.reset_index(drop=True)
        return values, True, sorted(values.unique(), key=lambda v: (v == "no slice", v))
    # a multi-label run's predicted label set is its pred column
    values = stored("pred" if colour == "prediction" and "prediction" not in samples else colour)
    # a few values are categories; more than 12 among the first rows settle it without hashing all 10M
    categorical = not pd.api.types.is_numeric_dtype(values) or (
        values.iloc[:10_000].nunique() <= 12 and values.nunique() <= 12)
    return values, categorical, None


values, categorical, order = _colour_column(projection)
# the shared projection's own arrays, not a copy of them (the table is read-only: data._projection_table)
table = pd.DataFrame({"id": projection["id"].to_numpy(), "x": projection["x"].to_numpy(),
                      "y": projection["y"].to_numpy(), colour: values.array}, copy=False)
standing = state.selection()
standing_ids = standing.value if standing is not None and standing.kind == "ids" else None
title = f"{METHOD_LABELS[method]} of {layer}"
if len(table) > figures.MAX_SCATTER_POINTS and standing_ids and len(standing_ids) <= figures.MAX_SCATTER_POINTS:
    # the density view's zoom: the selected region drawn point by point (plotly's own zoom never reaches here)
    if st.toggle(f"Zoom to the {len(standing_ids):,} selected samples, every point drawn", key="emb-zoom"):
        table = table[table["id"].astype(str).isin({str(i) for i in standing_ids})].reset_index(drop=True)
        title += " — the selection"
fig = figures.embedding_figure(table, colour=colour, categorical=categorical, category_order=order,
                               title=title, selected=standing_ids)
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key=f"emb-chart-{layer}-{method}",
                        config={"displayModeBar": True, "modeBarButtonsToRemove": ["toImage"]})

mask = region_mask(event, lambda: table[["x", "y"]].to_numpy())
ids = table["id"][mask].tolist() if mask is not None else selected_ids(event)
if components.fresh(f"emb-sel-{layer}-{method}", tuple(map(str, ids)) or None):
    state.set_selection(Selection("ids", [str(i) for i in ids]), ids)
sel = state.selection()
if sel is not None and sel.kind == "ids":
    rows = id_positions(data.id_index(run), sel.value)
    if len(rows):
        chosen = samples["id"].to_numpy()[rows]  # a region of a 10M-row run holds millions: one array
        state.set_gallery(chosen)
        st.subheader(f"{len(rows):,} selected samples")
        st.caption("Marked on the chart above, whichever chart or page they were selected on; the others are "
                   "faded.")
        if not task.has_classes:  # the task's error inside the selection, against the whole run
            errors = samples[task.error_column].to_numpy(np.float64)
            cols = st.columns(3)
            cols[0].metric(f"Mean {task.error_name}", f"{errors[rows].mean():.4g}",
                           delta=f"{errors[rows].mean() - errors.mean():+.4g} vs all", delta_color="inverse")
            cols[1].metric("Share wrong", components.percent(1 - samples["correct"].to_numpy()[rows].mean()),
                           help=f"Wrong: {task.what_is_wrong}.")
            cols[2].metric("Mean loss", f"{samples['loss'].to_numpy()[rows].mean():.4g}")
            components.gallery(run, chosen, key="emb-gallery")
            st.stop()
        sub = data.subset_metrics(run, np.asarray(rows, dtype=np.int64))
        cols = st.columns(4)
        cols[0].metric("Accuracy", f"{sub['accuracy']:.3f}")
        cols[1].metric("Mean confidence", f"{sub['mean_confidence']:.3f}")
        cols[2].metric("ECE of the selection", f"{sub['ece_inside']:.3f}")
        labels = samples["label"].to_numpy()[rows]
        top = np.bincount(labels, minlength=len(names)).argmax()
        cols[3].metric("Most common label", str(names[top]))
        components.gallery(run, chosen, key="emb-gallery")
else:
    st.caption("No selection yet: use the box or lasso tool above the chart.")
