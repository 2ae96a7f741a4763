"""Confusion matrix: click a cell to see exactly its samples; the most-confused pairs beside it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection, selected_cell

run = components.require_run(tasks=(*components.CLASS_TASKS, "multilabel"))


def _store_label_thresholds(cuts, names, *, cost_fp: float, cost_fn: float) -> None:
    from analyzers.errors import AnalyzerError
    from analyzers.evaluation.thresholds import save_label_thresholds
    from dashboard import access

    if not access.may_change(run.info.get("owner")):
        st.error(md(access.change_refusal(run.path.name, run.info.get("owner"))))
        return
    try:
        save_label_thresholds(run.path, [float(c) for c in cuts], names=names, cost_fp=float(cost_fp),
                              cost_fn=float(cost_fn))
    except AnalyzerError as exc:
        st.error(md(exc))
        return
    data.forget_runs()  # the stored thresholds are read afresh by every page
    st.success("Stored: " + ", ".join(f"{md(n)} when p ≥ {float(c):.3f}" for n, c in zip(names, cuts)) + ".")


def per_label_page() -> None:
    """A multi-label run: every label's 2x2 matrix and scores, then one label's threshold and calibration."""
    components.header("Per-label matrices", run, "Each label is its own yes/no question: its 2x2 matrix at the "
                                                 "run's threshold, its calibration, and the threshold it would need.")
    report = data.multilabel_report(run)
    rows = pd.DataFrame(report["labels"])
    table = rows[["label", "prevalence", "support", "tp", "fp", "fn", "tn", "precision", "recall", "f1",
                  "average_precision", "roc_auc", "ece", "best_f1_threshold", "best_f1"]]
    number = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(table, hide_index=True, column_config={
        "prevalence": components.percent_column(), "precision": number, "recall": number, "f1": number,
        "average_precision": number, "roc_auc": number, "ece": number, "best_f1_threshold": number,
        "best_f1": number, "tp": "true positives", "fp": "false positives", "fn": "missed", "tn": "true negatives"})
    task = data.run_task(run)
    names = list(run.class_names)
    cuts = task.thresholds
    at = (f"the run's threshold of {cuts[0]:g}" if not isinstance(task.threshold, tuple) else
          "the run's own threshold for each label (" + ", ".join(f"{md(n)} {c:.3f}" for n, c in zip(names, cuts))
          + ")")
    st.caption(f"At {at} on each label's probability. Prevalence is the share of samples holding the label.")
    cols = st.columns([2, 1, 1], vertical_alignment="bottom")
    label = cols[0].selectbox("Label", list(range(len(names))), key="label-threshold-label",
                              format_func=lambda k: names[k])
    cost_fp = cols[1].number_input("Cost of a false positive", min_value=0.0, value=1.0, key="label-cost-fp")
    cost_fn = cols[2].number_input("Cost of a false negative", min_value=0.0, value=1.0, key="label-cost-fn")
    threshold = st.slider(f"Threshold on p({names[label]})", 0.0, 1.0, float(cuts[label]), step=0.001,
                          format="%.3f", key=f"label-threshold-value-{label}")
    components.threshold_view(data.label_curve(run, int(label)), threshold, cost_fp=cost_fp, cost_fn=cost_fn,
                              positive_name=names[label], key="label-threshold")
    buttons = st.columns(2)
    chosen = None
    if buttons[0].button(f"Use this threshold for {md(names[label])}", key="label-threshold-save",
                         help="Stored in the run (thresholds.json) beside the other labels' thresholds: the "
                              "rankings, their CSV export and every page then read each label at its own cut."):
        chosen = cuts.copy()
        chosen[label] = threshold
    if buttons[1].button("Use every label's best-F1 threshold", key="label-threshold-best",
                         help="Each label at the threshold of its highest F1 on this run's samples."):
        chosen = [row["best_f1_threshold"] for row in report["labels"]]
    if chosen is not None:
        _store_label_thresholds(chosen, names, cost_fp=cost_fp, cost_fn=cost_fn)
    st.subheader(f"Calibration of p({md(names[label])})")
    st.plotly_chart(figures.reliability_figure(report["labels"][label]["calibration"], label=names[label],
                                               x_title=f"p({names[label]})", y_title="share holding the label"),
                    key="label-reliability", config={"displayModeBar": False})
    st.caption("Of the samples given a probability near x, the share that truly hold the label: on the diagonal, "
               "the probability means what it says.")


if data.run_task(run).per_label:
    per_label_page()
    st.stop()
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
    state.set_selection(sel, conf.ids(*clicked))

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
            state.set_selection(sel, conf.ids(*sel.value))
        st.caption("Pick a row to see its samples.")

if sel is not None and sel.kind == "cell" and all(0 <= v < len(names) for v in sel.value):
    true, pred = sel.value
    ids = conf.ids(true, pred)
    state.set_gallery(ids)
    verdict = "correct" if true == pred else "mistakes"
    components.gallery(run, ids, key="confusion-gallery",
                       title=f"True {md(names[true])}, predicted {md(names[pred])} — {len(ids)} {verdict}")
else:
    st.caption("No cell selected yet.")

# ------------------------------------------------------------------------------------------------------ threshold
from analyzers.errors import AnalyzerError  # noqa: E402
from analyzers.evaluation.thresholds import THRESHOLDS, save_threshold  # noqa: E402
from dashboard import access  # noqa: E402

st.subheader("Decision threshold: one class against the rest")
st.caption("The matrix above predicts the most probable class (for two classes, a threshold of 0.5). With rare "
           "classes another threshold is usually better: move it and see what it trades.")
stored = data.optional_json(run, THRESHOLDS) or {}
default_class = data.default_threshold_class(run)
cols = st.columns([2, 1, 1], vertical_alignment="bottom")
positive = cols[0].selectbox("Class", list(range(len(names))), index=default_class, key="threshold-class",
                             format_func=lambda k: names[k])
cost_fp = cols[1].number_input("Cost of a false positive", min_value=0.0, value=float(stored.get("cost_fp", 1.0)),
                               key="threshold-cost-fp")
cost_fn = cols[2].number_input("Cost of a false negative", min_value=0.0, value=float(stored.get("cost_fn", 1.0)),
                               key="threshold-cost-fn")
curve = data.threshold_curve(run, int(positive))
start = float(stored["threshold"]) if stored.get("positive") == positive and "threshold" in stored else 0.5
threshold = st.slider("Threshold on p(class)", 0.0, 1.0, start, step=0.001, format="%.3f", key="threshold-value")
components.threshold_view(curve, threshold, cost_fp=cost_fp, cost_fn=cost_fn, positive_name=names[positive], key="threshold")
slices = data.optional_table(run, "slices.parquet")
if slices is not None and len(slices):
    st.markdown("**Inside each error slice, at this threshold**")
    table = pd.DataFrame(data.slice_metrics_at(run, int(positive), float(threshold)))
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
