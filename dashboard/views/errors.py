"""Errors and slices: ranked errors, automatically found slices, label-noise suspects, group metrics; CSV of each."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from dashboard import components, data, figures, state
from dashboard.text import md
from dashboard.selection import Selection, id_positions

run = components.require_run(tasks=(*components.CLASS_TASKS, "regression", "multilabel"))
components.header("Errors & slices", run)
samples = run.sample_table
names = run.class_names
task = data.run_task(run)
sel = state.selection()

SECTIONS = {"rank": "Error rankings", "slice": "Slices", "suspects": "Label-noise suspects", "groups": "Groups"}
if not task.has_classes:  # label noise and the per-group accuracy read class probabilities
    SECTIONS = {"rank": "Error rankings", "slice": "Slices"}
    st.caption(f"A sample counts as wrong when {md(task.what_is_wrong)}.")
# the error measure a non-class task's slices are read by, inside and outside (regression: its absolute error)
ERROR_COLUMN = None if task.error_column is None else (task.error_column, f"mean {task.error_name}")
default = SECTIONS.get(sel.kind if sel else "rank", SECTIONS["rank"])
if (components.fresh("errors-url-sel", state.get("sel")) and sel is not None and sel.kind in SECTIONS) \
        or st.session_state.get("errors-section") is None:
    st.session_state["errors-section"] = default  # a link to a slice or the suspects opens that view
section = st.segmented_control("View", list(SECTIONS.values()), key="errors-section") or default


def _select(selection: Selection) -> None:
    """Keep a selection made on this page; marked as seen, so it does not switch the view like a link does."""
    state.set_selection(selection)
    components.fresh("errors-url-sel", selection.encode())


def _merged_words(merged) -> str:
    """A slice's `merged` cell in plain words: what it also covers and why that was not shown apart ("" if nothing,
    as for runs stored before slices were merged)."""
    from analyzers.evaluation.slices import merged_slices

    def words(m: dict) -> str:
        if m.get("relation") == "broader":  # holds most of this slice and, without it, fails as the rest does
            return (f"{m['description']} (broader: {m['size']:,} samples failing at {m['error_rate']:.0%}, holding "
                    f"{m['holds']:.0%} of this slice; without this slice's samples it fails at "
                    f"{m['rest_error_rate']:.0%}, not clearly more than the rest of the data "
                    f"({m['outside_error_rate']:.0%}))")
        return (f"{m['description']} (merged: {m['inside']:.0%} of its {m['size']:,} samples are in this slice; "
                f"its error rate is {m['error_rate']:.0%})")

    return "; ".join(words(m) for m in merged_slices(merged))


def _metrics_block(rows: np.ndarray, label: str) -> None:
    """Metrics of a subset and its calibration against the rest of the samples."""
    if len(rows) == 0:
        return
    if ERROR_COLUMN is not None:
        column, words = ERROR_COLUMN
        errors = samples[column].to_numpy(np.float64)
        inside = np.zeros(len(samples), dtype=bool)
        inside[rows] = True
        cols = st.columns(3)
        cols[0].metric("Samples", f"{len(rows):,}")
        cols[1].metric(f"{words} in {md(label)}", f"{errors[inside].mean():.4g}",
                       delta=f"{errors[inside].mean() - errors.mean():+.4g} vs all", delta_color="inverse")
        cols[2].metric(f"{words} of the rest", "—" if inside.all() else f"{errors[~inside].mean():.4g}")
        return
    sub = data.subset_metrics(run, np.asarray(rows, dtype=np.int64))
    cols = st.columns(4)
    cols[0].metric("Samples", f"{len(rows):,}")
    cols[1].metric("Accuracy", f"{sub['accuracy']:.3f}", delta=f"{sub['accuracy'] - data.metrics(run)['accuracy']:+.3f}"
                   " vs all")
    cols[2].metric(f"ECE in {md(label)}", f"{sub['ece_inside']:.3f}")
    rest = sub["ece_outside"]
    cols[3].metric("ECE of the rest", "—" if rest != rest else f"{rest:.3f}")
    st.plotly_chart(figures.reliability_figure(sub["bins_inside"], label=label, other=sub["bins_outside"],
                                               other_label="rest"), key=f"rel-{label}",
                    config={"displayModeBar": False})


# --------------------------------------------------------------------------------------------------- rankings
if section == SECTIONS["rank"]:
    from analyzers.evaluation.metrics import RANKINGS
    from analyzers.evaluation.thresholds import THRESHOLDS

    offered = list(data.run_task(run).rankings)  # the task's rankings: a classifier's are by confidence and margin
    current = sel.value if sel is not None and sel.kind == "rank" and sel.value in offered else offered[0]
    by = st.selectbox("Ranking", offered, index=offered.index(current),
                      format_func=lambda r: RANKINGS[r][0].capitalize(), key="errors-ranking")
    chosen = data.optional_json(run, THRESHOLDS)
    if chosen and "per_label" in chosen:
        st.caption("Right and wrong at the run's own threshold for each label (set on the Confusion page): " +
                   ", ".join(f"{md(name)} {cut:.3f}" for name, cut in zip(run.class_names, chosen["per_label"])) +
                   ".")
    elif chosen:
        st.caption(f"Right and wrong at the run's threshold: {md(components.class_name(run, chosen['positive']))} "
                   f"when its probability is at least {chosen['threshold']:.3f} (set on the Confusion page).")
    if by != current or sel is None or sel.kind != "rank":
        _select(Selection("rank", by))
    ranked = data.ranking(run, by, 200)
    table = components.readable_samples(run, ranked)
    if "margin" in ranked:
        table["margin"] = ranked["margin"].to_numpy()
    ids = ranked["id"].tolist()
    state.set_gallery(ids)
    from analyzers.evaluation.stage import errors_csv

    if run.info["dataset"]["modality"] == "tabular":
        # rows are a table either way: one table of the ranking, whose rows open an explanation (it was shown twice)
        components.gallery(run, ids, key="rank-gallery",
                           title=f"The {len(ids)} samples of this ranking (click one to explain it)")
    else:
        # the table and the gallery hold the same samples, so their counts agree (a "Top 54" sat above 48)
        st.caption(f"The {len(table)} samples of this ranking, as a table and below as a gallery.")
        st.dataframe(table, hide_index=True, column_config=components.SAMPLE_COLUMNS, height=300)
        components.gallery(run, ids, key="rank-gallery", title="The samples of this ranking")
    # written when the button is clicked (streamlit runs the callable then): the whole ranking of a 10M-row run
    # took 6 s of every rerun of this page
    decided, probs, class_names = data.decided_samples(run), run.probs, names if task.has_classes else None
    st.download_button("Download CSV (whole ranking)",
                       lambda: errors_csv(decided, probs, by=by, class_names=class_names),
                       file_name=f"{run.path.name}-{by}.csv", mime="text/csv", key="dl-ranking")

# ----------------------------------------------------------------------------------------------------- slices
elif section == SECTIONS["slice"]:
    slices = data.optional_table(run, "slices.parquet")
    if slices is None:
        components.not_in_run("Slice discovery", "Run the evaluation analysis (python -m analyzers run) to find them.",
                              run=run, stage="evaluation")
    elif slices.empty:
        st.success("No slice of the data fails clearly more often than the rest.")
    else:
        also_covers = slices["merged"].map(_merged_words) if "merged" in slices else None  # older runs: no column
        if also_covers is not None and not also_covers.str.len().any():
            also_covers = None
        st.caption("Groups of samples where the model fails more than on average, found from metadata and features "
                   "(a shallow decision tree) and from clusters of the embeddings. Lift is the slice's error rate "
                   "over the overall error rate. " + ("A slice lying mostly inside a better one, and failing no more "
                   "than the rest of it, is merged into it and listed under \"also covers\"; so is a broader slice "
                   "holding most of a better one that, without that one's samples, fails no more than the rest of "
                   "the data. " if also_covers is not None else "") + "Pick a row to see the slice.")
        shown = pd.DataFrame({"source": slices["source"], "description": slices["description"],
                              "size": slices["size"], "error rate": slices["error_rate"] * 100,
                              "lift": slices["lift"]})
        for column in ("ece", "ece_rest"):
            if column in slices:
                shown[column.replace("_", " of the ")] = slices[column]
        if also_covers is not None:
            shown["also covers"] = also_covers
        picked = st.dataframe(shown, hide_index=True, on_select="rerun", selection_mode="single-row",
                              key="slices-table", height=min(400, 36 * len(shown) + 40),
                              column_config={"error rate": components.percent_column(),
                                             "lift": st.column_config.NumberColumn(format="%.2f×"),
                                             "description": st.column_config.TextColumn(width="large")})
        rows_picked = tuple(picked.selection.rows)
        if components.fresh("slices-pick", rows_picked or None):
            _select(Selection("slice", rows_picked[0]))
            sel = state.selection()
        from analyzers.evaluation.stage import slices_csv

        # written on the click, as the ranking's: a 10M-row run's slices list millions of ids
        st.download_button("Download CSV", lambda: slices_csv(slices), file_name=f"{run.path.name}-slices.csv",
                           mime="text/csv", key="dl-slices")
        index = sel.value if sel is not None and sel.kind == "slice" and 0 <= sel.value < len(slices) else None
        if index is not None:
            chosen = slices.iloc[index]
            ids = np.asarray(chosen["ids"])  # millions at 10M rows: kept as one array
            state.set_gallery(ids)
            st.subheader(f"Slice {index + 1}: {md(chosen['description'])}")
            if also_covers is not None and also_covers.iloc[index]:
                st.caption(f"Also covers: {md(also_covers.iloc[index])}.")
            rows = id_positions(data.id_index(run), ids)
            _metrics_block(rows, "slice")
            components.gallery(run, ids, key="slice-gallery")

# ---------------------------------------------------------------------------------------------- label noise
elif section == SECTIONS["suspects"]:
    noise = data.optional_table(run, "label_noise.parquet")
    if noise is None:
        components.not_in_run("Label-noise detection", "Run the evaluation analysis to score the labels.", run=run,
                              stage="evaluation")
    else:
        from analyzers.evaluation.label_noise import suspect_reasons

        suspects = noise  # the stored suspects: as many as confident learning estimates are mislabelled
        st.caption("The labels most probably wrong, as many as confident learning estimates are wrong: score is the "
                   "estimated probability that the label is wrong, each class read against its own typical "
                   "confidence and the pattern of flips in the run.")
        if suspects.empty:
            st.success("No label-noise suspects: confident learning estimates that no label is wrong (no sample is "
                       "confidently of another class than its label).")
        else:
            _select(Selection("suspects", "top"))
            try:  # worded with the class names; a table without the probabilities keeps its stored words
                reasons = suspect_reasons(suspects, class_names=names)
            except AnalyzerError:
                reasons = suspects["reason"] if "reason" in suspects.columns else None
            table = pd.DataFrame({"id": suspects["id"].astype(str), "label": np.asarray(names, object)[suspects["label"]],
                                  "suggested label": np.asarray(names, object)[suspects["suggested_label"]],
                                  "score": suspects["score"]})
            if reasons is not None:
                table["reason"] = reasons.to_numpy()
                suspects = suspects.assign(reason=reasons.to_numpy())
            st.dataframe(table, hide_index=True, height=min(400, 36 * len(table) + 40),
                         column_config={"score": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                                 format="%.3f"),
                                        "reason": st.column_config.TextColumn(width="large")})
            from analyzers.evaluation.stage import suspects_csv

            st.download_button("Download CSV", lambda: suspects_csv(suspects, class_names=names),
                               file_name=f"{run.path.name}-label-suspects.csv", mime="text/csv", key="dl-suspects")
            ids = suspects["id"].tolist()[:48]
            state.set_gallery(ids)
            components.gallery(run, ids, key="suspect-gallery", title="Suspects, strongest first")

# ---------------------------------------------------------------------------------------------------- groups
else:
    info = run.info["dataset"]
    columns, id_like = data.grouping_columns(run, (info.get("metadata_columns") or []) +
                                             (info.get("feature_names") or []))
    if id_like:
        st.caption(f"Not offered as groups, since they name samples rather than groups: "
                   f"{', '.join(md(c) for c in id_like)}. Give an id column on the Load page to search by it.")
    if not columns:
        components.not_in_run("A metadata column to group by", "Datasets with metadata or feature columns get "
                                                              "per-group metrics here.")
    else:
        pick = st.columns([2, 1])
        column = pick[0].selectbox("Group by", columns, key="groups-column")
        bins = pick[1].number_input("Bins for numeric columns", 2, 20, 5, key="groups-bins")
        try:
            groups = data.group_table(run, column, int(bins))
        except AnalyzerError as exc:
            st.error(md(exc))
            st.stop()
        from analyzers.evaluation.metrics import largest_gap

        try:
            gap = largest_gap(groups, metric="accuracy", min_size=max(1, int(0.01 * len(samples))))
            st.markdown(f"Largest accuracy gap: **{gap.gap:.3f}** between **{md(gap.best_group)}** "
                        f"({gap.best_value:.3f}) and **{md(gap.worst_group)}** ({gap.worst_value:.3f}).")
        except AnalyzerError as exc:
            st.info(md(exc))
        left, right = st.columns([3, 2], gap="large")
        right.plotly_chart(figures.group_figure(groups, column), key="groups-figure",
                           config={"displayModeBar": False})
        readable = groups.rename(columns=lambda c: c.replace("_", " "))
        left.dataframe(readable, hide_index=True, column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in readable.columns if c not in ("group", "size")})
        components.download(groups, f"{run.path.name}-groups-{column}.csv")
