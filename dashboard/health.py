"""Panels shared by the Overview and the Data health page: the splits side by side with the train-test gap, and the
data problems the run's data-health stage found (analyzers.data_health.stage)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analyzers.data_health.stage import DATA_HEALTH
from dashboard import components, data, state
from dashboard.text import md

# how each headline metric of a split is named, and whether a larger value is better (the gap's colour)
METRIC_WORDS = {"accuracy": ("Accuracy", True), "balanced_accuracy": ("Balanced accuracy", True),
                "subset_accuracy": ("Subset accuracy", True), "hamming_loss": ("Hamming loss", False),
                "average_precision_macro": ("Average precision", True), "mae": ("MAE", False),
                "rmse": ("RMSE", False), "r2": ("R²", True), "error_rate": ("Error rate", False),
                "mean_loss": ("Mean loss", False)}
# a gap in the mean loss this many times the training loss is an overfitting warning
LOSS_GAP_WARNING = 0.5


def splits_panel(run, metrics: dict, *, detailed: bool = False) -> None:
    """Per-split metrics side by side, the gap of the evaluation split against the training split first and large;
    nothing for a run over one dataset."""
    splits, gap = metrics.get("splits") or {}, metrics.get("split_gap") or {}
    if not splits:
        return
    st.subheader("Splits")
    if gap.get("metrics"):
        train, evaluation = gap["train"], gap["eval"]
        shown = list(gap["metrics"].items())[:5]
        cols = st.columns(len(shown))
        for col, (key, value) in zip(cols, shown):
            name, higher_better = METRIC_WORDS.get(key, (key, True))
            col.metric(f"{name}: {evaluation}", f"{value['eval']:.3f}", delta=f"{value['gap']:+.3f} vs {train}",
                       delta_color="normal" if higher_better else "inverse",
                       help=f"On {train}: {value['train']:.3f}. The gap is {evaluation} minus {train}.")
        loss = gap["metrics"].get("mean_loss")
        if loss and loss["train"] > 0 and loss["gap"] > LOSS_GAP_WARNING * loss["train"]:
            st.warning(f"The mean loss on {md(evaluation)} is {loss['eval'] / loss['train']:.1f}× the loss on "
                       f"{md(train)}: the model fits its training split far better than new data (overfitting, "
                       f"or a shift between the splits: see Data health).", icon=":material/trending_up:")
    rows = []
    for name, values in splits.items():
        row = {"split": name, "samples": int(values.get("num_samples", 0))}
        for key in METRIC_WORDS:
            if isinstance(values.get(key), (int, float)):
                row[METRIC_WORDS[key][0]] = values[key]
        if isinstance(values.get("ece"), (int, float)):
            row["ECE"] = values["ece"]
        rows.append(row)
    table = pd.DataFrame(rows)
    st.dataframe(table, hide_index=True, column_config={c: st.column_config.NumberColumn(format="%.4f")
                                                        for c in table.columns if c not in ("split", "samples")})
    if detailed:
        st.caption("Every metric on each split's own rows. The other pages show all the splits together; the split "
                   "column is in every sample table.")


def data_problems(run) -> tuple[list, dict] | None:
    """(problems, skipped parts) of the run's data-health stage, or None when the run has none."""
    record = data.optional_json(run, DATA_HEALTH)
    if record is None:
        return None
    return list(record.get("problems") or []), dict(record.get("skipped") or {})


def problems_panel(run, *, key: str, galleries: bool = False) -> None:
    """Every data problem found, one line each with its count; on the Data health page (`galleries`) each opens
    a gallery of its samples, on the Overview it links there."""
    found = data_problems(run)
    if found is None:
        components.not_in_run("The data-health check", "Run the analysis again with the data_health stage.",
                              run=run, stage="data_health")
        return
    problems, skipped = found
    if not problems:
        st.markdown("No duplicate, leak, shift, outlier region or input problem was found.")
    for index, problem in enumerate(problems):
        line = f"**{md(problem['title'])}**" + (f": {md(problem['detail'])}" if problem.get("detail") else "")
        if galleries and problem.get("ids"):
            with st.expander(f"{problem['title']}", expanded=False):
                st.markdown(line)
                if st.checkbox("Show these samples", key=f"{key}-show-{index}"):
                    ids = list(problem["ids"])
                    state.set_gallery(ids)
                    components.gallery(run, ids, key=f"{key}-gallery-{index}")
        else:
            st.markdown("- " + line)
    for part, reason in skipped.items():
        st.caption(f"The {md(part)} check did not apply: {md(reason)}")
    if not galleries and problems:
        components.page_link("health", "See them on the Data health page")
