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

# ------------------------------------------------------------------------------------------------------ threshold
from analyzers.errors import AnalyzerError  # noqa: E402
from analyzers.evaluation.thresholds import THRESHOLDS, save_threshold, slice_metrics_at  # noqa: E402
from dashboard import access  # noqa: E402

st.subheader("Decision threshold: one class against the rest")
st.caption("The matrix above predicts the most probable class (for two classes, a threshold of 0.5). With rare "
           "classes another threshold is usually better: move it and see what it trades.")
stored = data.optional_json(run, THRESHOLDS) or {}
default_class = int(stored.get("positive", 1 if len(names) == 2 else int(conf.counts.sum(1).argmin())))
cols = st.columns([2, 1, 1], vertical_alignment="bottom")
positive = cols[0].selectbox("Class", list(range(len(names))), index=default_class, key="threshold-class",
                             format_func=lambda k: names[k])
cost_fp = cols[1].number_input("Cost of a false positive", min_value=0.0, value=float(stored.get("cost_fp", 1.0)),
                               key="threshold-cost-fp")
cost_fn = cols[2].number_input("Cost of a false negative", min_value=0.0, value=float(stored.get("cost_fn", 1.0)),
                               key="threshold-cost-fn")
curve = data.threshold_curve(run, int(positive))
best_f1, best_cost = curve.best_f1(), curve.best_cost(cost_fp, cost_fn)
start = float(stored["threshold"]) if stored.get("positive") == positive and "threshold" in stored else 0.5
threshold = st.slider("Threshold on p(class)", 0.0, 1.0, start, step=0.001, format="%.3f", key="threshold-value")
at = curve.at(threshold, cost_fp=cost_fp, cost_fn=cost_fn)
metric = st.columns(6)
metric[0].metric("Prevalence", components.percent(at["prevalence"]), help="Share of samples of this class.")
metric[1].metric("Precision", f"{at['precision']:.3f}")
metric[2].metric("Recall", f"{at['recall']:.3f}")
metric[3].metric("F1", f"{at['f1']:.3f}")
metric[4].metric("Cost", f"{at['cost']:,.4g}", help=f"{cost_fp:g} per false positive + {cost_fn:g} per false "
                                                   f"negative.")
metric[5].metric("Predicted as the class", components.percent(at["predicted_positive"]))
at_half = curve.at(0.5)
st.caption(f"Best F1 at **{best_f1:.3f}** (F1 {curve.at(best_f1)['f1']:.3f}); lowest cost at **{best_cost:.3f}** "
           f"(cost {curve.at(best_cost, cost_fp=cost_fp, cost_fn=cost_fn)['cost']:,.4g}); at 0.5: F1 "
           f"{at_half['f1']:.3f}, cost {curve.at(0.5, cost_fp=cost_fp, cost_fn=cost_fn)['cost']:,.4g}.")
left, right = st.columns([2, 3], gap="large")
with left:
    rest = f"not {names[positive]}"
    st.plotly_chart(figures.confusion_figure([[at["tn"], at["fp"]], [at["fn"], at["tp"]]], [rest, names[positive]]),
                    key="threshold-confusion", config={"displayModeBar": False})
with right:
    st.plotly_chart(figures.threshold_curves_figure(curve, chosen=threshold,
                                                    marks={"best F1": best_f1, "lowest cost": best_cost}),
                    key="threshold-curves", config={"displayModeBar": False})
slices = data.optional_table(run, "slices.parquet")
if slices is not None and len(slices):
    st.markdown("**Inside each error slice, at this threshold**")
    table = pd.DataFrame(slice_metrics_at(run.samples["label"].to_numpy(), run.probs, slices.head(10), run.samples,
                                          positive=int(positive), threshold=threshold))
    bar = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(table, hide_index=True, column_config={"precision": bar, "recall": bar, "f1": bar,
                                                        "prevalence": bar})
if st.button("Use this threshold for the run", key="threshold-save",
             help="Stored in the run (thresholds.json): the error rankings and their CSV export then use it."):
    if not access.may_change(run.info.get("owner")):
        st.error(md(access.change_refusal(run.path.name, run.info.get("owner"))))
    else:
        try:
            save_threshold(run.path, positive=int(positive), threshold=float(threshold), num_classes=len(names),
                           cost_fp=float(cost_fp), cost_fn=float(cost_fn))
            data.forget_runs()  # the stored threshold is read afresh by every page
            st.success(f"Stored: {md(names[positive])} when p ≥ {threshold:.3f}.")
        except AnalyzerError as exc:
            st.error(md(exc))
