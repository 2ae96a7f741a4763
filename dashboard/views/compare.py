"""Compare two runs of one task on the same dataset: the task's metrics, where they disagree and which is less wrong,
per class or label, and per slice."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Compare runs", run)
task = data.run_task(run)
dataset_sha = run.info["dataset"]["sha256"]
others = {name: path for name, path in data.usable_runs().items()  # damaged runs are listed on Load, not here
          if name != run.path.name and data.run_status(path)[0]["dataset"]["sha256"] == dataset_sha
          and data.run_status(path)[0].get("task", "classification") == run.task}
if not others:
    st.info(f"No other stored {md(run.task)} run was made on this run's dataset. Analyse a second model on the same "
            f"dataset on the Load page to compare the two.")
    components.page_link("load", "Go to Load")
    st.stop()
other_name = st.selectbox(f"Compare {md(run.path.name)} (a) with (b)", list(others), key="compare-other")
try:
    other = data.load_run(others[other_name])
    comparison = data.comparison(run, other)
except AnalyzerError as exc:
    st.error(md(exc))
    st.stop()
s = comparison.summary
LOWER_IS_BETTER = ("mae", "rmse", "mse", "hamming_loss", "median_absolute_error", "mape")
headline = list(s["headline_a"])
cols = st.columns(len(headline) + 2)
for i, key in enumerate(headline):
    a, b = s["headline_a"][key], s["headline_b"][key]
    label = key.replace("_", " ")
    cols[i].metric(f"{label.capitalize()}: (b) vs (a) {a:.3f}" if a is not None else label.capitalize(),
                   "—" if b is None else f"{b:.3f}",
                   delta=None if a is None or b is None else f"{b - a:+.3f}",
                   delta_color="inverse" if key in LOWER_IS_BETTER else "normal")
if "ece_a" in s:
    cols[-2].metric("ECE (b)", f"{s['ece_b']:.3f}", delta=f"{s['ece_b'] - s['ece_a']:+.3f} vs (a)",
                    delta_color="inverse")
else:
    cols[-2].metric(f"Mean {md(s['error_name'])} (b)", f"{s['mean_error_b']:.4g}",
                    delta=f"{s['mean_error_delta']:+.4g} vs (a)", delta_color="inverse")
cols[-1].metric(f"{s['paired_test']} p-value", f"{s['paired_p']:.3g}",
                help="Exact test that the samples one run gets less wrong than the other are split evenly between "
                     "the runs (for right-or-wrong errors, McNemar's test).")
less_wrong = (f"(a) less wrong on **{s['better_a']:,}**, (b) less wrong on **{s['better_b']:,}**, the same "
              f"{md(s['error_name'])} on **{s['same_error']:,}**")
if "both_right" in s:
    st.markdown(f"Both right on **{s['both_right']:,}**; {less_wrong}; both wrong on **{s['both_wrong']:,}** "
                f"({s['both_wrong_differently']:,} of them with different answers).")
else:
    st.markdown(f"Of {s['num_samples']:,} samples: {less_wrong}.")

left, right = st.columns([2, 3], gap="large")
with left:
    per_class = comparison.per_class
    if per_class.empty:
        st.subheader("Error distribution")
        st.plotly_chart(figures.bar_figure(["(a) less wrong", "(b) less wrong", "the same"],
                                           [s["better_a"], s["better_b"], s["same_error"]], x_title="samples where",
                                           y_title="samples"),
                        key="compare-better", config={"displayModeBar": False})
    else:
        unit = "class" if task.has_classes else "label"
        st.subheader(f"Per {unit}")
        st.plotly_chart(figures.recall_delta_figure(per_class, unit),
                        key="compare-per-class", config={"displayModeBar": False})
        with st.expander("Precision, recall and F1 of both runs"):
            st.dataframe(per_class.drop(columns=["class"]), hide_index=True, column_config={
                c: st.column_config.NumberColumn(format="%.3f") for c in per_class.columns
                if c not in ("class", "name", "support")})
with right:
    st.subheader("Per slice")
    per_slice = comparison.per_slice
    if per_slice.empty:
        st.info("Neither run has slices to compare.")
    else:
        as_share = task.has_classes  # a classifier's mean error is its error rate
        st.caption(f"Mean {md(s['error_name'])} of both runs on the same samples of every slice either run found; "
                   "largest change first. Each slice is matched to the other run's slice that shares most of its "
                   "samples (the overlap is the share of samples in either that are in both): two runs' clusters are "
                   "not the same because they carry the same number.")
        shown = per_slice[["description", "size", "error_a", "error_b", "error_delta", "run",
                           "closest_in_other_run", "overlap"]].copy()
        shares = ["error_a", "error_b", "error_delta", "overlap"] if as_share else ["overlap"]
        shown[shares] = shown[shares] * 100
        number = st.column_config.NumberColumn(format="%.4g")
        error_format = components.percent_column() if as_share else number
        st.dataframe(shown.rename(columns={"run": "found in", "error_a": "error (a)", "error_b": "error (b)",
                                           "error_delta": "change",
                                           "closest_in_other_run": "closest slice of the other run"}),
                     hide_index=True,
                     column_config={"description": st.column_config.TextColumn(width="medium"),
                                    "overlap": components.percent_column(),
                                    **{c: error_format for c in ("error (a)", "error (b)", "change")}})

st.subheader("Where they disagree")
dis = comparison.disagreements
if dis.empty:
    st.success("The two runs predict the same for every sample.")
else:
    st.caption(f"The samples the runs predict differently, the largest change of {md(s['error_name'])} first.")
    shown = dis.head(500)
    names = np.asarray(run.class_names, dtype=object)
    readable = (lambda v: names[v]) if task.has_classes else (lambda v: v)  # class indices name their class
    table = pd.DataFrame({"id": shown["id"].astype(str), "label": readable(shown["label"].to_numpy()),
                          "(a) predicts": readable(shown["pred_a"].to_numpy()),
                          "(b) predicts": readable(shown["pred_b"].to_numpy()), "better": shown["better"],
                          f"{s['error_name']} (a)": shown["error_a"], f"{s['error_name']} (b)": shown["error_b"]})
    if "confidence_a" in shown:
        table["confidence (a)"], table["confidence (b)"] = shown["confidence_a"], shown["confidence_b"]
    st.dataframe(table, hide_index=True, height=min(360, 36 * len(table) + 40))
    components.download(dis, f"{run.path.name}-vs-{other_name}-disagreements.csv")
    ids = dis["id"].head(500).tolist()
    if components.fresh("compare-ids", (other_name, len(ids))):
        state.set_selection(Selection("ids", [str(i) for i in ids]), ids)
    components.gallery(run, ids, key="compare-gallery", title="The samples they disagree on (inputs of run a)")
