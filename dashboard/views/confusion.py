"""Confusion matrix: click a cell to see exactly its samples; the most-confused pairs beside it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection, selected_cell

run = components.require_run()
components.header("Confusion matrix", run, "Rows are the true class, columns the prediction. Click a cell to see "
                                           "its samples.")
conf = data.confusion(run)
names = list(run.class_names)

view = st.segmented_control("Show", ["counts", "share of true class", "share of predicted class"],
                            default="counts", key="confusion-view")
over = {"share of true class": "true", "share of predicted class": "pred"}.get(view or "counts")
values = None if over is None else conf.normalized(over)
left, right = st.columns([3, 2], gap="large")
with left:
    fig = figures.confusion_figure(conf.counts, names, values=values, value_label="count" if over is None else "share")
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="confusion-chart",
                            config={"displayModeBar": False})
clicked = selected_cell(event)
sel = state.selection()
if components.fresh("confusion-click", clicked):
    sel = Selection("cell", clicked)
    state.set_selection(sel, conf.ids(*clicked).tolist())

with right:
    st.subheader("Most confused pairs")
    pairs = conf.most_confused(10)
    if pairs.empty:
        st.success("No mistakes: every sample sits on the diagonal.")
    else:
        shown = pd.DataFrame({"true": pairs["true_name"], "predicted as": pairs["pred_name"],
                              "samples": pairs["count"], "share of true class": pairs["share_of_true"]})
        picked = st.dataframe(shown, hide_index=True, on_select="rerun", selection_mode="single-row",
                              key="confused-pairs", column_config={"share of true class": st.column_config.
                                                                   ProgressColumn(min_value=0.0, max_value=1.0,
                                                                                  format="%.2f")})
        if components.fresh("confusion-pair", tuple(picked.selection.rows) or None):
            row = pairs.iloc[picked.selection.rows[0]]
            sel = Selection("cell", (int(row["true"]), int(row["pred"])))
            state.set_selection(sel, conf.ids(*sel.value).tolist())
        st.caption("Pick a row to see its samples.")

if sel is not None and sel.kind == "cell" and all(0 <= v < len(names) for v in sel.value):
    true, pred = sel.value
    ids = conf.ids(true, pred).tolist()
    state.set_gallery(ids)
    verdict = "correct" if true == pred else "mistakes"
    components.gallery(run, ids, key="confusion-gallery",
                       title=f"True {md(names[true])}, predicted {md(names[pred])} — {len(ids)} {verdict}")
else:
    st.caption("No cell selected yet.")
