"""Overview: headline metrics, the top findings in plain words, per-class table, class balance, reliability."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import components, data, figures, health, state, summaries
from dashboard.selection import Selection, selected_cell
from dashboard.text import md

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Overview", run)
st.download_button("Download report", data=lambda: data.report_html(run), file_name=f"{run.path.name}-report.html",
                   mime="text/html", icon=":material/download:", key="overview-report",
                   help="One HTML file that opens offline: the metrics, findings, confusion matrix, slices with "
                        "their worst samples, label-noise suspects, calibration, stored explanations, gradient "
                        "health, training curves and the run's provenance.")
sandbox = run.info.get("sandbox") or {}
if sandbox.get("level") == "reduced":
    st.warning("This run's model ran in a reduced sandbox: " + md(sandbox.get("reason", "")), icon="⚠️")
elif sandbox.get("level") == "full":
    st.caption("The model ran in a sandboxed worker (no network, private filesystem, no new processes).")
for stage in (run.info.get("analyses") or {}):
    reason = components.skipped_reason(run, stage)
    if reason is not None:  # the rest of the run is complete; this part of it does not apply to the model
        st.warning(f"The {md(stage)} analysis was skipped: {md(reason)}", icon=":material/block:")
order = (run.info.get("preprocessing") or {}).get("feature_order")
features = run.info["dataset"].get("feature_names") or []
if order and features:  # which column fed which input: a table in another order would be read silently wrong
    shown = ", ".join(md(f) for f in features[:12]) + (", …" if len(features) > 12 else "")
    st.caption(f"The model was given {len(features)} features in {md(order)}: {shown}.")
m = data.metrics(run)
names = run.class_names
task = data.run_task(run)
health.splits_panel(run, m)  # the train-test gap first: every number below mixes the splits
if health.data_problems(run) is not None:
    st.subheader("Data problems")
    with st.container(border=True):
        health.problems_panel(run, key="overview-problems", galleries=False)


def _slices_table(error_column: str, error_name: str, rate_name: str, none_found: str,
                  quantile_column: str | None = None, z_column: str | None = None) -> None:
    """The error slices, with the task's error measure inside each and elsewhere, the p-value that it is larger
    inside, and (`quantile_column`) that column's quantiles inside."""
    from analyzers.evaluation.slices import slice_error_summary

    slices = data.optional_table(run, "slices.parquet")
    st.subheader("Where the errors concentrate")
    if slices is None or not len(slices):
        st.markdown(none_found)
        return
    top = slices.head(10)
    summary = slice_error_summary(run.sample_table, top, error_column, quantile_column=quantile_column,
                                  z_column=z_column)
    table = pd.DataFrame({"slice": top["description"], "samples": top["size"].astype(int),
                          rate_name: 100 * top["error_rate"], f"{error_name} inside": summary["mean_inside"],
                          f"{error_name} elsewhere": summary["mean_elsewhere"], "p (larger inside)": summary["p_value"]})
    number = st.column_config.NumberColumn(format="%.4g")
    config = {rate_name: components.percent_column(), f"{error_name} inside": number,
              f"{error_name} elsewhere": number, "p (larger inside)": st.column_config.NumberColumn(format="%.2g")}
    if z_column is not None:  # the model predicts its spread: how often its 90% interval holds the target here
        table["90% interval coverage"] = 100 * summary["coverage"]
        config["90% interval coverage"] = components.percent_column()
    elif quantile_column is not None:
        for q in ("q10", "q50", "q90"):
            table[f"{quantile_column} {q}"] = summary[q]
            config[f"{quantile_column} {q}"] = number
    st.dataframe(table, hide_index=True, column_config=config)
    st.caption(f"p: one-sided Mann-Whitney U test that the {error_name} is larger inside the slice than elsewhere."
               + (" Coverage: the share of the slice's targets inside the model's own 90% interval (mean ± 1.645 "
                  "predicted standard deviations); well below 90%, the model is too sure of itself there."
                  if z_column else
                  f" {quantile_column.capitalize()} quantiles inside the slice (10%, median, 90%): where its "
                  f"predictions sit against the targets." if quantile_column else ""))


def _multilabel_overview() -> None:
    """A multi-label run's page: subset accuracy and the Hamming loss, every label's report, which labels are
    missed together (click a cell for its samples), the error slices and the samples with most labels wrong."""
    from analyzers.evaluation.metrics import RANKINGS, rank_errors

    def score(key: str) -> str:
        return "—" if m.get(key) is None else f"{m[key]:.3f}"

    if isinstance(task.threshold, tuple):
        st.caption("At the run's own threshold for each label (set on the Confusion page): " + ", ".join(
            f"{md(name)} {cut:.3f}" for name, cut in zip(names, task.threshold)) + ".")
    cols = st.columns(5)
    cols[0].metric("Subset accuracy", score("subset_accuracy"), help="Share of samples with every label right.")
    cols[1].metric("Hamming loss", score("hamming_loss"), help="Share of all sample-label pairs predicted wrongly.")
    cols[2].metric("ROC AUC (macro)", score("roc_auc_macro"), help="Mean over labels; undefined when a label is "
                                                                   "always present or always absent.")
    cols[3].metric("ROC AUC (micro)", score("roc_auc_micro"), help="Over all sample-label pairs together.")
    cols[4].metric("Average precision (macro)", score("average_precision_macro"))
    report = m["classification_report"]
    prevalence = m.get("prevalence", {})
    st.subheader("Per label")
    table = pd.DataFrame([{"label": name, "prevalence": prevalence.get(name), **report[name]} for name in names])
    number = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(table, hide_index=True, column_config={"prevalence": components.percent_column(),
                                                        "precision": number, "recall": number,
                                                        "f1-score": number})
    components.page_link("confusion", "Each label's 2x2 matrix, calibration and threshold")
    st.subheader("Labels missed together")
    ml = data.multilabel_report(run)
    left, right = st.columns([3, 2], gap="large")
    with left:
        event = st.plotly_chart(figures.co_missed_figure(np.asarray(ml["co_missed_matrix"]), names),
                                on_select="rerun", selection_mode="points", key="overview-co-missed",
                                config={"displayModeBar": False})
    clicked = selected_cell(event)
    with right:
        pairs = pd.DataFrame(ml["co_missed"])
        if pairs.empty or pairs["both_missed"].max() == 0:
            st.success("No two labels are ever missed in the same sample.")
        else:
            shown = pairs[pairs["both_missed"] > 0].head(10)
            st.dataframe(pd.DataFrame({"labels": shown["label_a"] + " and " + shown["label_b"],
                                       "both missed": shown["both_missed"], "of samples with both": shown["rate"],
                                       "times independent misses": shown["lift"]}), hide_index=True,
                         column_config={"of samples with both": components.percent_column(),
                                        "times independent misses": st.column_config.NumberColumn(format="%.1f×")})
            st.caption("Pairs missed together most often. 'Times independent misses' compares that with what each "
                       "label's own miss rate would give if misses were unrelated: far above 1, the model misses "
                       "the pair as a pair.")
    if clicked is not None and components.fresh("overview-co-missed", clicked):
        state.set_selection(Selection("pair", clicked))
    sel = state.selection()
    if sel is not None and sel.kind == "pair" and all(0 <= v < len(names) for v in sel.value):
        a, b = sel.value
        labels, probs = np.asarray(run.labels), np.asarray(run.probs)
        missed = (labels == 1) & (probs < task.thresholds)
        ids = run.sample_table["id"].to_numpy()[missed[:, a] & missed[:, b]].tolist()
        state.set_gallery(ids)
        title = (f"{md(names[a])} missed — {len(ids)} samples" if a == b else
                 f"{md(names[a])} and {md(names[b])} both missed — {len(ids)} samples")
        components.gallery(run, ids, key="co-missed-gallery", title=title)
    _slices_table("hamming_error", "Hamming error", "share with a label wrong",
                  "No group of samples has significantly more wrong labels than the rest.")
    st.subheader("Most labels wrong")
    by = st.segmented_control("Order", list(task.rankings), default=task.rankings[0], key="overview-ranking",
                              format_func=lambda r: RANKINGS[r][0]) or task.rankings[0]
    ranked = rank_errors(data.decided_samples(run), by=by, limit=20)
    st.dataframe(ranked[["id", "label", "pred", "missed", "false_alarms", "labels_wrong", "loss"]], hide_index=True,
                 column_config={"label": "true labels", "pred": "predicted", "false_alarms": "predicted wrongly",
                                "labels_wrong": "labels wrong"})


def _regression_overview() -> None:
    """A regression's page: its errors in the target's units, predictions against targets (click a point to
    explain it), residuals, the error histogram, the error slices with their MAE, and the largest errors."""
    from analyzers.evaluation.metrics import RANKINGS, rank_errors

    cols = st.columns(5)
    cols[0].metric("MAE", f"{m['mae']:.4g}", help="Mean absolute error, in the target's units.")
    cols[1].metric("RMSE", f"{m['rmse']:.4g}", help="Root of the mean squared error: large errors weigh more.")
    cols[2].metric("R²", "—" if m.get("r2") is None else f"{m['r2']:.3f}",
                   help="Share of the target's variance the model explains (1 is perfect, 0 is the mean).")
    cols[3].metric("Median absolute error", f"{m['median_absolute_error']:.4g}")
    cols[4].metric("MAPE", "—" if m.get("mape") is None else components.percent(m["mape"]),
                   help="Mean absolute percentage error; undefined when a target is 0.")
    st.caption(f"Targets: mean {m['target_mean']:.4g}, standard deviation {m['target_std']:.4g}, over "
               f"{m['num_samples']:,} samples. A sample counts as one of the largest errors when "
               f"{md(task.what_is_wrong)}.")
    samples = run.sample_table
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader("Predicted against true")
        event = st.plotly_chart(figures.predicted_vs_true_figure(samples["target"], samples["prediction"],
                                                                 samples["id"], wrong=~samples["correct"]),
                                key="overview-predicted", on_select="rerun", selection_mode="points",
                                config={"displayModeBar": False})
        points = (event or {}).get("selection", {}).get("points", []) if event else []
        clicked = [p.get("customdata") for p in points if p.get("customdata") is not None]
        if clicked and components.fresh("overview-predicted", clicked[0]):
            components.go_to("explain", sample=str(clicked[0]))
        st.caption("Click a point to explain that sample's prediction.")
    with right:
        st.subheader("Residuals")
        st.plotly_chart(figures.residual_figure(samples["prediction"], samples["residual"], samples["id"]),
                        key="overview-residuals", config={"displayModeBar": False})
    st.subheader("Absolute errors")
    st.plotly_chart(figures.error_histogram_figure(samples["abs_error"]), key="overview-errors",
                    config={"displayModeBar": False})
    coverage = m.get("interval_coverage")
    if coverage:  # the model predicts a mean and a variance: do its intervals hold the targets as often as claimed?
        st.subheader("Interval coverage")
        left, right = st.columns([3, 2], gap="large")
        with left:
            st.plotly_chart(figures.coverage_figure(coverage), key="overview-coverage",
                            config={"displayModeBar": False})
        with right:
            st.metric("Gaussian NLL", f"{m['gaussian_nll']:.4g}", help="Mean negative log-likelihood of the targets "
                                                                       "under the predicted Gaussians (lower is "
                                                                       "better).")
            st.metric("Mean predicted standard deviation", f"{m['mean_predicted_std']:.4g}")
            st.caption("Each point: the share of targets inside the model's central interval of that level (mean ± "
                       "the normal quantile × its predicted standard deviation). On the diagonal, its spread means "
                       "what it says; below it, the model is overconfident.")
    _slices_table("abs_error", "MAE", "share of largest errors",
                  "No group of samples has significantly more of the largest errors than the rest.",
                  quantile_column="residual", z_column="z_score" if "z_score" in samples else None)
    st.subheader("Largest errors")
    by = st.segmented_control("Order", list(task.rankings), default=task.rankings[0], key="overview-ranking",
                              format_func=lambda r: RANKINGS[r][0]) or task.rankings[0]
    ranked = rank_errors(samples, by=by, limit=20)
    st.dataframe(ranked[["id", "target", "prediction", "residual", "abs_error"]], hide_index=True)


if task.per_label:
    _multilabel_overview()
    st.stop()
if not task.has_classes:
    _regression_overview()
    st.stop()

cols = st.columns(5)
cols[0].metric("Accuracy", f"{m['accuracy']:.3f}")
cols[1].metric("Balanced accuracy", f"{m['balanced_accuracy']:.3f}")
cols[2].metric("Log loss", f"{m['log_loss']:.3f}", help="Mean negative log probability of the true class.")
auc = m.get("roc_auc_ovr")
cols[3].metric("ROC AUC (one-vs-rest)", "—" if auc is None else f"{auc:.3f}",
               help="Macro average; undefined when some class has no sample.")
cols[4].metric("Calibration error (ECE)", f"{m['ece']:.3f}",
               help="Expected calibration error over 10 equal-width confidence bins.")

# ------------------------------------------------------------------------------------------------------ findings
def _finding(finding) -> None:
    """One finding in plain words, with what it accounts for (the ranking's one scale) and a link to its samples."""
    text, accounts, link = summaries.finding_text(run, finding)
    st.markdown(text)
    st.caption(f"Accounts for: {accounts}.")
    if link is not None:
        page, words, sel = link
        components.page_link(page, words, **({"sel": sel} if sel else {}))


st.subheader("Top findings")
st.caption("Ranked by how many samples each accounts for: calibration, class imbalance, error slices, confused "
           "pairs and label-noise suspects on one scale.")
ranked = data.findings(run)
with st.container(border=True):
    if not ranked:
        st.markdown("No calibration, imbalance, slice, confusion or label-noise finding in this run.")
    for finding in ranked[:3]:
        _finding(finding)
    if len(ranked) > 3:
        with st.expander(f"{len(ranked) - 3} more finding{'s' if len(ranked) > 4 else ''}"):
            for finding in ranked[3:]:
                _finding(finding)
    flags = data.optional_json(run, "gradients/flags.json")
    if flags:  # training health: not errors, so not on the ranking's scale
        lines, flagged = summaries.gradient_flags_text(flags)
        for line in lines:
            st.markdown(line)
        if flagged:
            components.page_link("training", "See the gradient traces")

# ---------------------------------------------------------------------------------------------------------- tables
left, right = st.columns(2, gap="large")
report = m["classification_report"]
with left:
    st.subheader("Per class")
    table = pd.DataFrame([{"class": n, "precision": report[n]["precision"], "recall": report[n]["recall"],
                           "F1": report[n]["f1-score"], "support": int(report[n]["support"])}
                          for n in names if n in report])
    bar = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(table, hide_index=True, column_config={"precision": bar, "recall": bar, "F1": bar},
                 height=min(420, 36 * len(table) + 40))
    averages = {k: report[k] for k in ("macro avg", "weighted avg") if k in report}
    st.caption(" · ".join(f"{md(k)}: F1 {v['f1-score']:.3f}" for k, v in averages.items()))
with right:
    st.subheader("Class balance")
    st.plotly_chart(figures.class_balance_figure(run.sample_table["label"], run.sample_table["pred"], names),
                    key="overview-balance", config={"displayModeBar": False})

left, right = st.columns(2, gap="large")
with left:
    st.subheader("Reliability")
    strategy = st.segmented_control("Bins", ["equal width", "equal mass"], default="equal width",
                                    key="overview-bins")
    bins = data.reliability(run, "quantile" if strategy == "equal mass" else "uniform")
    st.plotly_chart(figures.reliability_figure(bins), key="overview-reliability", config={"displayModeBar": False})
with right:
    st.subheader("Precision, recall and F1")
    st.plotly_chart(figures.per_class_figure(report, names), key="overview-per-class",
                    config={"displayModeBar": False})
    top_k = m.get("top_k_accuracy") or {}
    if len(top_k) > 1:
        st.caption("Top-k accuracy: " + " · ".join(f"top-{k}: {v:.3f}" for k, v in top_k.items()))
