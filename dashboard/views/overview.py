"""Overview: headline metrics, the top findings in plain words, per-class table, class balance, reliability."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import components, data, figures
from dashboard.text import md

run = components.require_run()
components.header("Overview", run)
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
st.subheader("Top findings")
findings = 0
with st.container(border=True):
    slices = data.optional_table(run, "slices.parquet")
    if slices is not None and len(slices):
        top = slices.iloc[0]
        st.markdown(f"**Worst slice:** {md(top['description'])} — {int(top['size'])} samples, error rate "
                    f"{top['error_rate']:.1%} ({top['lift']:.1f}× the overall rate).")
        components.page_link("errors", "See this slice", sel="slice:0")
        findings += 1
    conf = data.confusion(run)
    pairs = conf.most_confused(1)
    if len(pairs):
        p = pairs.iloc[0]
        st.markdown(f"**Most confused:** true **{md(p['true_name'])}** predicted as **{md(p['pred_name'])}** "
                    f"{int(p['count'])} times ({p['share_of_true']:.1%} of {md(p['true_name'])}).")
        components.page_link("confusion", "See these samples", sel=f"cell:{int(p['true'])}-{int(p['pred'])}")
        findings += 1
    noise = data.optional_table(run, "label_noise.parquet")
    if noise is not None and len(noise):
        suspects = noise[noise["score"] > 0.5]
        if len(suspects):
            top = suspects.iloc[0]
            st.markdown(f"**Label-noise suspects:** {len(suspects)} samples whose label the model contradicts "
                        f"more than it supports it; the strongest, id {md(top['id'])}, is labelled "
                        f"{md(components.class_name(run, top['label']))} but looks like "
                        f"{md(components.class_name(run, top['suggested_label']))}.")
            components.page_link("errors", "Review the suspects", sel="suspects:top")
            findings += 1
    flags = data.optional_json(run, "gradients/flags.json")
    if flags:
        problems = [f"{md(layer)} (vanishing)" for layer in flags.get("vanishing", [])]
        problems += [f"{md(layer)} (exploding)" for layer in flags.get("exploding", [])]
        dead = {k: v for k, v in (flags.get("dead_relu_layers") or {}).items() if v >= 0.25}
        if problems:
            st.markdown(f"**Gradients:** {', '.join(problems)}.")
        if dead:
            st.markdown("**Dead units:** " + ", ".join(f"{md(k)} has {v:.0%} of its units never active"
                                                         for k, v in dead.items()) + ".")
        if problems or dead:
            components.page_link("training", "See the gradient traces")
            findings += 1
        else:
            st.markdown("**Gradients:** no vanishing or exploding layer on the loaded data.")
    if not findings:
        st.markdown("No slice, confusion, label-noise or gradient finding in this run.")

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
    st.plotly_chart(figures.class_balance_figure(run.samples["label"], run.samples["pred"], names),
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
