"""Pieces every page shares: the open run, the sample gallery, input previews, links between pages."""
from __future__ import annotations

import contextlib

import html
import math

import numpy as np
import pandas as pd
import streamlit as st

from analyzers.errors import AnalyzerError
from analyzers.loading.runs import Run

from . import data, figures, sample_display, state, summaries
from .sample_display import sequence_letters, token_texts, token_vocabulary  # noqa: F401 (also components.*)
from .summaries import class_name, percent  # noqa: F401 (the pages call them as components.*)
from .text import md
from .selection import id_positions

PAGES: dict = {}  # name -> st.Page, filled by app.py on every rerun
BASE_COLOURS = {"A": "#009E73", "C": "#0072B2", "G": "#E69F00", "T": "#D55E00"}  # Okabe-Ito
GALLERY_PAGE = 24
TABLE_PAGE = 500  # rows of a tabular gallery per page: a slice of 500k rows is never one table sent to the browser


def go_to(name: str, **params) -> None:
    """Switch to page `name`, keeping the run and the given URL values."""
    for key, value in params.items():
        state.put(key, value)
    st.switch_page(PAGES[name])


def page_link(name: str, label: str, **params) -> None:
    """A link to page `name` that keeps the run and sets the given URL values (e.g. `sel="slice:0"`)."""
    if name in PAGES:
        query = {k: v for k, v in {"run": state.get("run"), **params}.items() if v is not None}
        st.page_link(PAGES[name], label=label, query_params=query, icon=":material/arrow_forward:")


def fresh(key: str, value) -> bool:
    """Whether a widget's value changed since the last rerun: a chart keeps its selection across reruns, and an old
    click must not override a selection made since (or one that came from the URL)."""
    last_key = f"_last_{key}"
    if st.session_state.get(last_key, None) == value:
        return False
    st.session_state[last_key] = value
    return value is not None


# --------------------------------------------------------------------------------------------------------- the run

def current_run() -> Run | None:
    """The run named in the URL, else the one given on the command line, else the newest; None if there is none."""
    runs = data.known_runs()
    name = state.get("run")
    if name and name not in runs:
        st.warning(f"There is no run called {md(repr(name))} in {md(data.settings().runs_dir)}: showing another one.")
        name = None
    if not name:  # none named: the command line's run, else the newest run that opens
        default = data.settings().run
        name = default.name if default is not None and default.name in runs else next(iter(data.usable_runs()), None)
        if name is None:
            return None
        state.put("run", name)
    try:
        return data.load_run(runs[name])
    except AnalyzerError as exc:  # a damaged run: its pages say why, every other run keeps working
        st.error(md(exc))
        page_link("load", "See the stored runs")
        st.stop()


CLASS_TASKS = ("classification", "binary")  # the tasks whose outputs are class probabilities
# where a run of another task finds what a class-only page would show
ELSEWHERE = {
    "regression": "its metrics, predictions against targets, residuals, largest errors and error slices are on the "
                  "Overview page, and Explain explains each predicted value",
    "multilabel": "its per-label report, the labels missed together, error slices and the samples with most labels "
                  "wrong are on the Overview page; each label's 2x2 matrix, calibration and threshold on the "
                  "Confusion page; Explain explains each label",
}


def require_run(*, tasks: tuple = CLASS_TASKS) -> Run:
    """The open run, or a pointer to the Load page and stop. `tasks`: the tasks (run.json's `task`) this page
    draws; a run of another task is pointed to the pages that show it, never given panels that do not apply."""
    run = current_run()
    if run is None:
        from .run_creation import offer_samples

        st.info("No run is open. Analyse a model on the **Load** page, or open an existing run there.")
        page_link("load", "Go to Load")
        offer_samples()  # a first start with no runs: one click to a run of a built-in sample
        st.stop()
    if run.task not in tasks:
        st.info(f"This page shows what a classifier gets wrong between classes, and this run is a "
                f"**{md(run.task)}**: {ELSEWHERE.get(run.task, 'see its Overview page')}.")
        page_link("overview", "Go to Overview")
        st.stop()
    data.warm_up(run)
    return run


def file_label(info: dict, kind: str) -> str:
    """The run's model or dataset file as the person named it (run.json's `name`: the upload's own name), never
    the workspace's hashed copy; runs from before names were recorded show their spec's last part."""
    return info[kind].get("name") or str(info[kind]["spec"]).rsplit("/", 1)[-1]


def run_caption(run: Run) -> str:
    info = run.info
    return (f"**{md(run.path.name)}** · model {md(file_label(info, 'model'))} · data "
            f"{md(file_label(info, 'dataset'))} · {info['num_samples']:,} "
            f"{md(info['dataset']['modality'])} samples · " +
            (f"{len(run.class_names)} classes" if run.task in CLASS_TASKS else
             f"{len(run.class_names)} labels (multi-label)" if run.task == "multilabel" else md(run.task)))


def header(title: str, run: Run | None, help_text: str | None = None) -> None:
    st.title(title)
    if run is not None:
        st.caption(run_caption(run))
    if help_text:
        st.caption(help_text)


def skipped_reason(run: Run, stage: str) -> str | None:
    """Why the run's `stage` was skipped (run.json `analyses`), or None when it ran or was not asked for."""
    summary = (run.info.get("analyses") or {}).get(stage)
    if isinstance(summary, dict) and summary.get("status") == "skipped":
        return str(summary.get("reason") or "no reason was recorded")
    return None


def not_in_run(what: str, how: str, *, run: Run | None = None, stage: str | None = None) -> None:
    """Say that something is missing from the run: why, when its stage was skipped, else how to add it."""
    reason = skipped_reason(run, stage) if run is not None and stage else None
    if reason is not None:
        st.warning(f"{what} is not in this run: its {md(stage)} analysis was skipped because {md(reason)}",
                   icon=":material/block:")
    else:
        st.info(f"{what} is not in this run. {how}")


def short(value) -> str:
    """A metadata value as a person reads it: floats to four significant digits."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def percent_column(label: str | None = None):
    """A table column of shares (0..1) written as `percent` writes them: Streamlit's own "percent" format dropped
    trailing zeros, so one column read "5.13%" beside "4%". The column's values are shares times 100."""
    return st.column_config.NumberColumn(label, format="%.1f%%")


def duration(seconds: float) -> str:
    """A wait as a person says it: "4 s", "1 min 05 s"."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def readable_samples(run: Run, table: pd.DataFrame) -> pd.DataFrame:
    """`summaries.readable_samples` at the run's task."""
    return summaries.readable_samples(run, table, data.run_task(run))


SAMPLE_COLUMNS = {
    "confidence": st.column_config.ProgressColumn("confidence", min_value=0.0, max_value=1.0, format="%.3f"),
    "loss": st.column_config.NumberColumn("loss", format="%.3f"),
    "correct": st.column_config.CheckboxColumn("correct"),
}


# ---------------------------------------------------------------------------------------------------- input previews

def token_html(tokens: list, *, words: bool = False) -> str:
    """`tokens` as chips, headed "tokens" when they are words (`words`), else "token ids"."""
    chips = "".join(f'<span style="border:1px solid #ccc;border-radius:3px;padding:0 3px;margin:1px;'
                    f'display:inline-block">{html.escape(t)}</span>' for t in tokens)
    heading = "tokens" if words else "token ids"
    return f'<div style="font-family:monospace;font-size:13px;line-height:1.8">{heading}: {chips}</div>'


def sequence_html(letters: str) -> str:
    spans = "".join(f'<span style="color:{BASE_COLOURS.get(ch, "#333")}">{html.escape(ch)}</span>' for ch in letters)
    return (f'<div style="font-family:monospace;font-size:14px;letter-spacing:1px;word-break:break-all;'
            f'line-height:1.5">{spans}</div>')


@contextlib.contextmanager
def progress_bar(text: str, label):
    """A progress bar over a long call: yields `on_batch(done, total)`, which moves it and writes `label(done,
    total)` on it; the bar is removed when the call ends, however it ends."""
    bar = st.progress(0.0, text=text)

    def on_batch(done, total) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=label(done, total))

    try:
        yield on_batch
    finally:
        bar.empty()


BANDS_KEY = "image-bands"


def band_choice(run: Run, channels: int) -> None:
    """For images of other than 1 or 3 channels: which bands every image of the run shows (kept in the session)."""
    if channels in (1, 3):
        return
    default = figures.default_bands(channels)
    options = {f"false colour (bands {', '.join(str(b + 1) for b in default)})": None}
    options.update({f"band {b + 1}": b for b in range(channels)})
    label = st.selectbox("Bands shown", list(options), key=f"{BANDS_KEY}-{run.path.name}",
                         help=f"These images have {channels} bands; a picture shows three at most.")
    st.session_state[BANDS_KEY] = options[label]


def display_image(run: Run, x: np.ndarray) -> np.ndarray:
    """`sample_display.display_image` with the bands picked on this session's pages (one, or three as red, green
    and blue)."""
    bands = st.session_state.get(BANDS_KEY)
    if bands is not None and not all(0 <= int(b) < np.asarray(x).shape[0] for b in np.atleast_1d(bands)):
        bands = None  # chosen on another run with more bands
    return sample_display.display_image(run, x, bands=bands)


def thumbnail(run: Run, x: np.ndarray, size: int = 96) -> np.ndarray:
    return sample_display.enlarged(display_image(run, x), size)


# ----------------------------------------------------------------------------------------------------------- gallery

def open_explanation(sample_id, gallery: list | None = None) -> None:
    if gallery is not None:
        state.set_gallery(gallery)
    go_to("explain", sample=sample_id)


def gallery(run: Run, ids, *, key: str, title: str | None = None) -> None:
    """The samples `ids` as the run's modality shows best, with their confidence; a click opens an explanation."""
    rows = id_positions(data.id_index(run), ids if isinstance(ids, np.ndarray) else list(ids))
    if title:
        st.subheader(title)
    if len(rows) == 0:
        st.info("No samples here.")
        return
    # the gallery pages through ids: its counts come from the kept columns, and only the page's rows are read
    samples = run.sample_table
    ordered_ids = samples["id"].to_numpy()[rows]  # what previous / next walk through on the Explain page
    modality = run.info["dataset"]["modality"]
    size = TABLE_PAGE if modality == "tabular" else GALLERY_PAGE
    pages = max(1, math.ceil(len(rows) / size))
    top = st.columns([3, 1])
    confidence = samples["confidence"].to_numpy()[rows].astype(np.float64).mean()  # a regression has none
    top[0].caption(f"{len(rows):,} samples · {percent(samples['correct'].to_numpy()[rows].mean())} correct" +
                   (f" · mean confidence {confidence:.3f}" if confidence == confidence else ""))
    page = 1
    if pages > 1:
        page = top[1].number_input(f"page (of {pages})", 1, pages, 1, key=f"{key}-page")
    shown = samples.rows(rows[(page - 1) * size: page * size])
    try:
        inputs = data.sample_inputs(run, shown.index.to_numpy()) if modality != "tabular" else None
    except AnalyzerError as exc:
        st.warning(f"The inputs cannot be shown: {md(exc)}")
        inputs = None
    if modality == "image" and inputs is not None:
        per_row = 6
        for start in range(0, len(shown), per_row):
            cols = st.columns(per_row)
            for col, (_, row), x in zip(cols, shown.iloc[start:start + per_row].iterrows(),
                                        inputs[start:start + per_row]):
                with col:
                    st.image(thumbnail(run, x), width=96)
                    mark = "✓" if row["correct"] else "✗"
                    st.caption(f"{mark} id {md(row['id'])} · true {md(class_name(run, row['label']))} · pred "
                               f"{md(class_name(run, row['pred']))} · {row['confidence']:.2f}")
                    if st.button("Explain", key=f"{key}-explain-{row['id']}"):
                        open_explanation(row["id"], ordered_ids)
    elif modality in ("sequence", "tokens") and inputs is not None:
        for (_, row), x in zip(shown.iterrows(), inputs):
            left, right = st.columns([6, 1])
            with left:
                mark = "✓" if row["correct"] else "✗"
                st.markdown(f"{mark} **id {md(row['id'])}** · true {md(class_name(run, row['label']))} · "
                            f"predicted {md(class_name(run, row['pred']))} · confidence {row['confidence']:.3f}")
                st.html(token_html(token_texts(run, x), words=token_vocabulary(run) is not None)
                        if modality == "tokens" else
                        sequence_html(sequence_letters(x)))
            if right.button("Explain", key=f"{key}-explain-{row['id']}"):
                open_explanation(row["id"], ordered_ids)
    else:
        readable = readable_samples(run, shown)
        extra = [c for c in shown.columns if c not in ("id", "label", "pred", "confidence", "loss", "correct")]
        full = pd.concat([readable.reset_index(drop=True), shown[extra].reset_index(drop=True)], axis=1)
        event = st.dataframe(full, hide_index=True, column_config=SAMPLE_COLUMNS, on_select="rerun",
                             selection_mode="single-row", key=f"{key}-table", height=min(420, 36 * len(full) + 40))
        picked = event.selection.rows if event is not None else []
        if picked:
            open_explanation(full["id"].iloc[picked[0]], ordered_ids)
    with st.container(horizontal=True, vertical_alignment="bottom"):
        # the page's ids: a selectbox of a 10M-row run's slice would send millions of options to the browser
        choice = st.selectbox("Explain a sample of this page", [str(i) for i in shown["id"]],
                              key=f"{key}-pick-{page}")
        if st.button("Open explanation", key=f"{key}-open", type="primary"):
            open_explanation(choice, ordered_ids)


def download(table: pd.DataFrame, name: str, label: str = "Download CSV", key: str | None = None) -> None:
    from analyzers.evaluation.stage import to_csv

    st.download_button(label, to_csv(table).encode(), file_name=name, mime="text/csv",
                       key=key or f"dl-{name}")


def threshold_view(curve, threshold: float, *, cost_fp: float, cost_fn: float, positive_name: str,
                   key: str) -> None:
    """At `threshold` on one class's (or label's) curve: prevalence, precision, recall, F1, cost, the share predicted
    positive, the best-F1 and lowest-cost thresholds beside 0.5, the 2x2 matrix and the PR and ROC curves."""
    best_f1, best_cost = curve.best_f1(), curve.best_cost(cost_fp, cost_fn)
    at = curve.at(threshold, cost_fp=cost_fp, cost_fn=cost_fn)
    metric = st.columns(6)
    metric[0].metric("Prevalence", percent(at["prevalence"]), help="Share of samples of this class.")
    metric[1].metric("Precision", f"{at['precision']:.3f}")
    metric[2].metric("Recall", f"{at['recall']:.3f}")
    metric[3].metric("F1", f"{at['f1']:.3f}")
    metric[4].metric("Cost", f"{at['cost']:,.4g}", help=f"{cost_fp:g} per false positive + {cost_fn:g} per false "
                                                       f"negative.")
    metric[5].metric("Predicted as the class", percent(at["predicted_positive"]))
    at_half = curve.at(0.5)
    st.caption(f"Best F1 at **{best_f1:.3f}** (F1 {curve.at(best_f1)['f1']:.3f}); lowest cost at **{best_cost:.3f}** "
               f"(cost {curve.at(best_cost, cost_fp=cost_fp, cost_fn=cost_fn)['cost']:,.4g}); at 0.5: F1 "
               f"{at_half['f1']:.3f}, cost {curve.at(0.5, cost_fp=cost_fp, cost_fn=cost_fn)['cost']:,.4g}.")
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.plotly_chart(figures.confusion_figure([[at["tn"], at["fp"]], [at["fn"], at["tp"]]],
                                                 [f"not {positive_name}", positive_name]),
                        key=f"{key}-confusion", config={"displayModeBar": False})
    with right:
        st.plotly_chart(figures.threshold_curves_figure(curve, chosen=threshold,
                                                        marks={"best F1": best_f1, "lowest cost": best_cost}),
                        key=f"{key}-curves", config={"displayModeBar": False})
