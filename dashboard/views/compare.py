"""Compare two runs on the same dataset: accuracy, where they disagree and who is right, per-class and per-slice."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection

run = components.require_run()
components.header("Compare runs", run)
dataset_sha = run.info["dataset"]["sha256"]
others = {name: path for name, path in data.usable_runs().items()  # damaged runs are listed on Load, not here
          if name != run.path.name and data.run_status(path)[0]["dataset"]["sha256"] == dataset_sha}
if not others:
    st.info("No other stored run was made on this run's dataset. Analyse a second model on the same dataset on the "
            "Load page to compare the two.")
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
cols = st.columns(5)
cols[0].metric(f"Accuracy (a) {md(run.path.name)}", f"{s['accuracy_a']:.3f}")
cols[1].metric(f"Accuracy (b) {md(other_name)}", f"{s['accuracy_b']:.3f}", delta=f"{s['accuracy_delta']:+.3f}")
cols[2].metric("ECE (b)", f"{s['ece_b']:.3f}", delta=f"{s['ece_b'] - s['ece_a']:+.3f} vs (a)", delta_color="inverse")
cols[3].metric("Disagree on", f"{s['disagree']:,} samples")
cols[4].metric("McNemar p-value", f"{s['mcnemar_p']:.3g}",
               help="Exact test that the samples only one run gets right are split evenly between the runs.")
st.markdown(f"Both right on **{s['both_right']:,}**, only (a) right on **{s['only_a_right']:,}**, only (b) right on "
            f"**{s['only_b_right']:,}**, both wrong on **{s['both_wrong']:,}** "
            f"({s['both_wrong_differently']:,} of them with different answers).")

left, right = st.columns([2, 3], gap="large")
with left:
    st.subheader("Per class")
    per_class = comparison.per_class
    st.plotly_chart(figures.bar_figure(per_class["name"], per_class["recall_delta"], x_title="class",
                                       y_title="recall (b) − recall (a)",
                                       highlight=per_class["recall_delta"].to_numpy() < 0),
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
        st.caption("Error rate of both runs on the same samples of every slice either run found; largest change "
                   "first. Each slice is matched to the other run's slice that shares most of its samples (the "
                   "overlap is the share of samples in either that are in both): two runs' clusters are not the same "
                   "because they carry the same number.")
        shown = per_slice[["description", "size", "error_rate_a", "error_rate_b", "error_rate_delta", "run",
                           "closest_in_other_run", "overlap"]].copy()
        shares = ["error_rate_a", "error_rate_b", "error_rate_delta", "overlap"]
        shown[shares] = shown[shares] * 100
        st.dataframe(shown.rename(columns={"run": "found in", "error_rate_a": "error (a)", "error_rate_b": "error (b)",
                                           "error_rate_delta": "change",
                                           "closest_in_other_run": "closest slice of the other run"}),
                     hide_index=True,
                     column_config={"description": st.column_config.TextColumn(width="medium"),
                                    **{c: components.percent_column() for c in ("error (a)", "error (b)", "change",
                                                                                "overlap")}})

st.subheader("Where they disagree")
dis = comparison.disagreements
if dis.empty:
    st.success("The two runs predict the same class for every sample.")
else:
    names = np.asarray(run.class_names, dtype=object)
    table = pd.DataFrame({"id": dis["id"].astype(str), "label": names[dis["label"]], "(a) predicts": names[dis["pred_a"]],
                          "(b) predicts": names[dis["pred_b"]], "right": dis["right"],
                          "confidence (a)": dis["confidence_a"], "confidence (b)": dis["confidence_b"]})
    st.dataframe(table, hide_index=True, height=min(360, 36 * len(table) + 40))
    components.download(dis, f"{run.path.name}-vs-{other_name}-disagreements.csv")
    ids = dis["id"].tolist()
    if components.fresh("compare-ids", (other_name, len(ids))):
        state.set_selection(Selection("ids", [str(i) for i in ids]), ids)
    components.gallery(run, ids, key="compare-gallery", title="The samples they disagree on (inputs of run a)")
