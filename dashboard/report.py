"""A run's findings as one self-contained HTML file (`python -m analyzers report RUN_DIR --out report.html`, the
Overview's "Download report" button) and as panels in a notebook (`analyzers.show`).

The report is built from the run with the dashboard's own figure builders (`dashboard.figures`) and its own words
(`dashboard.summaries`, `dashboard.sample_display`): no second copy of a figure. It opens offline: plotly.js is
inlined once, images are PNG data URIs, and nothing names another host. Its size is bounded: at most
`MAX_THUMBNAILS` sample images, a few top slices and suspects, and no per-sample scatter (a 100k-sample run's report
is measured in `make bench`). Every value from the run (class names, ids, descriptions) is escaped, as the pages
escape it (`dashboard.text`).

No Streamlit here: the CLI and notebooks import this module.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from analyzers.errors import AnalyzerError, first_line
from analyzers.loading.runs import Run, open_run

from . import figures, sample_display, summaries

MAX_THUMBNAILS = 200  # sample images in one report, over every section (the bound)
TOP_SLICES = 5
SLICE_GALLERY = 12  # worst samples shown per slice
SUSPECTS_SHOWN = 24
EXPLANATIONS_SHOWN = 24  # stored maps drawn, over every method and target
THUMBNAIL_PX = 96
PROVENANCE_VALUE_CHARS = 2_000  # a long value (a text model's vocabulary) is cut in the provenance table
SECTIONS = ("provenance", "headline", "findings", "confusion", "slices", "label_noise", "calibration",
            "explanations", "gradients", "training", "comparison")


@dataclass(frozen=True)
class Html:
    """A piece of the report's HTML, built here with every value from the run escaped."""

    text: str

    def _repr_html_(self) -> str:  # a notebook shows it as HTML
        return self.text


@dataclass(frozen=True)
class Row:
    """Figures drawn side by side, each `width` pixels wide (a notebook shows them one after another)."""

    figures: tuple
    width: int = 340


@dataclass(frozen=True)
class Panel:
    """One section of the report: `parts` are `Html` pieces and plotly figures, in order. `skipped` says why a
    section that does not apply to this run is left out (the section is then kept as that one line)."""

    key: str
    title: str
    parts: tuple = ()
    skipped: str | None = None

    def _ipython_display_(self) -> None:
        """In Jupyter or VS Code: the title and text as HTML, each figure through plotly's own renderer."""
        from IPython.display import HTML, display

        display(HTML(f"<h3>{_e(self.title)}</h3>"))
        if self.skipped is not None:
            display(HTML(f"<p><em>{_e(self.skipped)}</em></p>"))
        for part in self.parts:
            for shown in (part.figures if isinstance(part, Row) else (part,)):
                display(HTML(shown.text) if isinstance(shown, Html) else shown)


@dataclass(frozen=True)
class Report:
    """The panels of one run's report (`build_report`), in `SECTIONS` order."""

    title: str
    panels: tuple
    thumbnails: int = 0  # sample images in the galleries
    explanation_maps: int = 0  # stored maps drawn over their image inputs (the same image budget)
    notes: tuple = field(default_factory=tuple)
    run_dir: Path | None = None  # the run reported (what `analyzers.serve` opens)

    def panel(self, key: str) -> Panel:
        for panel in self.panels:
            if panel.key == key:
                return panel
        raise KeyError(key)

    def to_html(self) -> str:
        """One HTML document that opens offline: plotly.js inlined once, every figure drawn by it."""
        from plotly.offline import get_plotlyjs

        body = []
        for panel in self.panels:
            body.append(f'<section id="{panel.key}"><h2>{_e(panel.title)}</h2>')
            if panel.skipped is not None:
                body.append(f'<p class="skipped">{_e(panel.skipped)}</p>')
            for part in panel.parts:
                if isinstance(part, Html):
                    body.append(part.text)
                elif isinstance(part, Row):
                    body.append("<div class=\"row\">" + "".join(
                        f"<div style=\"width:{part.width}px\">{_figure_html(f)}</div>" for f in part.figures)
                                + "</div>")
                else:  # a plotly figure, drawn by the one plotly.js above
                    body.append(_figure_html(part))
            body.append("</section>")
        notes = "".join(f"<li>{_e(note)}</li>" for note in self.notes)
        # plotly.js inside a <script> element: its text never holds "</script" (checked in the tests)
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                # no request leaves the file: not even an image, a font or a frame from elsewhere
                "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:; "
                "font-src data:\">"
                f"<title>{_e(self.title)}</title><style>{STYLE}</style>"
                f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
                f"<h1>{_e(self.title)}</h1>" + (f"<ul class=\"notes\">{notes}</ul>" if notes else "")
                + "".join(body) + "</body></html>")

    def write(self, out: str | Path) -> Path:
        """The report's HTML at `out`, written atomically (a failed write leaves what was there)."""
        from analyzers.loading.runs import write_atomic

        out = Path(out)
        if out.is_dir():
            raise AnalyzerError(f"{out} is a directory: give the report's file name, such as {out / 'report.html'}")
        text = self.to_html().encode("utf-8")
        write_atomic(out, lambda tmp: Path(tmp).write_bytes(text))
        return out

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(HTML(f"<h2>{_e(self.title)}</h2>"))
        for panel in self.panels:
            panel._ipython_display_()


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;font-size:0.9em;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.skipped{color:#777;font-style:italic}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:112px;font-size:0.75em}
.gallery img{image-rendering:pixelated;width:96px;border:1px solid #ccc}.wrong{color:#D55E00}
.row{display:flex;flex-wrap:wrap;gap:8px}
.seq{font-family:monospace;font-size:0.85em;word-break:break-all}
"""


def _figure_html(figure) -> str:
    import plotly.io as pio

    return pio.to_html(figure, full_html=False, include_plotlyjs=False,
                       config={"displayModeBar": False, "responsive": True})


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _markdown(text: str) -> str:
    """The dashboard's Markdown lines (values already escaped by `dashboard.text.md`) as HTML; raw HTML is shown as
    text, never interpreted."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).renderInline(text)


def _table(frame: pd.DataFrame, *, digits: int = 4) -> Html:
    cells = []
    for _, row in frame.iterrows():
        cells.append("<tr>" + "".join(f"<td>{_e(_cell(v, digits))}</td>" for v in row) + "</tr>")
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>")


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W) or (H, W, 3) image in [0, 1] as a PNG data URI."""
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Inputs:
    """The run's model inputs for the report's thumbnails, loaded once when first needed (`dataset`, else the run's
    own files through `load_run_inputs`, the sandboxed worker for a model file); a run whose inputs cannot be
    loaded gets its galleries as text, with the reason in the report's notes. Counts the images drawn: gallery
    thumbnails and explanation maps over image inputs share the one budget `limit`."""

    def __init__(self, run: Run, dataset, *, load: bool, allow_import: bool, limit: int):
        self.run, self._dataset, self._load, self._allow_import = run, dataset, load, allow_import
        self.limit, self.thumbnails, self.maps, self.problem = limit, 0, 0, None
        if dataset is None and not load:
            self.problem = "the samples' inputs were not loaded for this report: galleries list the samples"

    def x(self, rows: np.ndarray):
        if self._dataset is None and self._load and self.problem is None:
            from analyzers.engines.pipeline import load_run_inputs

            try:
                model, self._dataset = load_run_inputs(self.run, allow_import=self._allow_import)
                close = getattr(model, "close", None)
                if close is not None:  # a sandboxed worker: the dataset came back as arrays
                    close()
            except AnalyzerError as exc:
                self.problem = f"the samples' inputs could not be loaded ({first_line(exc)}): galleries list them"
        if self._dataset is None:
            return None
        return self._dataset.x[np.asarray(rows, dtype=np.int64)]

    def image_room(self) -> int:
        return max(0, self.limit - self.thumbnails - self.maps)


def _sample_caption(run: Run, task, row) -> str:
    if task.has_classes:
        return (f"{'✓' if row['correct'] else '✗'} id {row['id']} · true {summaries.class_name(run, row['label'])}"
                f" · pred {summaries.class_name(run, row['pred'])} · {float(row['confidence']):.2f}")
    if task.per_label:
        return f"id {row['id']} · {int(row.get('labels_wrong', 0))} labels wrong · loss {float(row['loss']):.3g}"
    return (f"id {row['id']} · target {float(row['target']):.4g} · predicted {float(row['prediction']):.4g}")


def _gallery(run: Run, task, rows: pd.DataFrame, inputs: _Inputs) -> Html:
    """The samples `rows` (rows of the samples table, indexed by position) as their modality shows best: images
    as thumbnails while the report's image budget lasts, sequences as letters, tokens as words, else a table."""
    if rows.empty:
        return Html("<p>No samples here.</p>")
    modality = run.info["dataset"]["modality"]
    if modality == "tabular":  # the gallery's table: the core columns, class names for indices, then the rest
        extra = rows[[c for c in rows.columns if c not in ("id", "label", "pred", "confidence", "loss", "correct")]]
        return _table(pd.concat([summaries.readable_samples(run, rows, task).reset_index(drop=True),
                                 extra.reset_index(drop=True)], axis=1))
    shown = rows.iloc[:inputs.image_room()] if modality == "image" else rows
    x = inputs.x(shown.index.to_numpy()) if len(shown) else None
    cards = []
    for i, (_, row) in enumerate(rows.iterrows()):
        caption = _e(_sample_caption(run, task, row))
        wrong = " class=\"wrong\"" if "correct" in row and not bool(row["correct"]) else ""
        if x is not None and i < len(shown) and modality == "image":
            uri = png_data_uri(sample_display.enlarged(sample_display.display_image(run, x[i]), THUMBNAIL_PX))
            inputs.thumbnails += 1
            cards.append(f"<figure><img alt=\"sample {_e(row['id'])}\" src=\"{uri}\">"
                         f"<figcaption{wrong}>{caption}</figcaption></figure>")
        elif x is not None and i < len(shown) and modality in ("sequence", "tokens"):
            text = (sample_display.sequence_letters(x[i]) if modality == "sequence" else
                    " ".join(sample_display.token_texts(run, x[i])))
            cards.append(f"<p{wrong}>{caption}<br><span class=\"seq\">{_e(text[:400])}</span></p>")
        else:
            cards.append(f"<p{wrong}>{caption}</p>")
    if modality == "image":
        return Html(f"<div class=\"gallery\">{''.join(cards)}</div>")
    return Html("".join(cards))


# ------------------------------------------------------------------------------------------------------- sections

def _provenance(run: Run, compare: Run | None) -> Panel:
    info = run.info
    rows = [("run", str(Path(run.path).name)), ("created", info.get("created")),
            ("model", info["model"].get("name") or info["model"].get("spec")),
            ("model sha256", info["model"].get("sha256")), ("architecture", info["model"].get("arch")),
            ("input shape", info["model"].get("input_shape")),
            ("dataset", info["dataset"].get("spec")), ("dataset sha256", info["dataset"].get("sha256")),
            ("task", run.task), ("samples", info.get("num_samples")), ("engine", info.get("engine")),
            ("sandbox", (info.get("sandbox") or {}).get("level")), ("seeds", info.get("seeds")),
            ("parameters", info.get("parameters")), ("preprocessing", info.get("preprocessing")),
            ("analyses", {k: (v or {}).get("status", "done") if isinstance(v, dict) else v
                          for k, v in (info.get("analyses") or {}).items()}),
            ("versions", info.get("packages"))]
    if compare is not None:
        rows += [("compared with", str(Path(compare.path).name)),
                 ("its model sha256", compare.info["model"].get("sha256"))]
    rows.append(("report written", datetime.now(timezone.utc).isoformat(timespec="seconds")))
    table = pd.DataFrame([(k, _provenance_value(v)) for k, v in rows if v is not None], columns=["", "value"])
    return Panel("provenance", "Provenance", (_table(table),))


def _provenance_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= PROVENANCE_VALUE_CHARS else text[:PROVENANCE_VALUE_CHARS] + f"… ({len(text):,} chars)"


def _headline(run: Run, task, metrics: dict) -> Panel:
    """Every scalar metric of the run (the task's headline ones first), and the per-class report."""
    first = [k for k in ("accuracy", "balanced_accuracy", "log_loss", "roc_auc_ovr", "ece", "subset_accuracy",
                         "hamming_loss", "mae", "rmse", "r2") if k in metrics]
    rest = [k for k, v in metrics.items() if k not in first and isinstance(v, (int, float)) and not isinstance(v, bool)]
    table = pd.DataFrame([(k.replace("_", " "), metrics[k]) for k in first + rest
                          if isinstance(metrics[k], (int, float)) or metrics[k] is None],
                         columns=["metric", "value"])
    parts = [_table(table)]
    report = metrics.get("classification_report")
    if isinstance(report, dict):
        names = [n for n in run.class_names if n in report]
        parts.append(Html("<h4>Per class</h4>" if task.has_classes else "<h4>Per label</h4>"))
        parts.append(_table(pd.DataFrame([{"class": n, **{k: report[n].get(k) for k in
                                                            ("precision", "recall", "f1-score", "support")}}
                                           for n in names])))
        if task.has_classes:
            parts.append(figures.per_class_figure(report, run.class_names))
    return Panel("headline", "Headline metrics", tuple(parts))


def _findings(run: Run, task) -> Panel:
    if not task.has_classes:
        return Panel("findings", "Top findings", skipped=f"The ranked findings are a classifier's; this is a "
                                                         f"{run.task} run: its slices are below.")
    ranked = summaries.findings(run)
    if not ranked:
        return Panel("findings", "Top findings", (Html("<p>No calibration, imbalance, slice, confusion or "
                                                       "label-noise finding in this run.</p>"),))
    items = []
    for finding in ranked:
        text, accounts, _ = summaries.finding_text(run, finding)
        items.append(f"<li>{_markdown(text)}<br><small>Accounts for: {_e(accounts)}.</small></li>")
    return Panel("findings", "Top findings", (Html("<p>Ranked by how many samples each accounts for.</p>"
                                                   f"<ol>{''.join(items)}</ol>"),))


def _confusion(run: Run, task) -> Panel:
    """A classifier's confusion matrix; a multi-label run's labels missed together; a regression's predictions
    against its targets and its errors."""
    samples = run.sample_table
    if task.per_label:
        report = summaries.multilabel_report(run, task)
        return Panel("confusion", "Labels missed together",
                     (figures.co_missed_figure(np.asarray(report["co_missed_matrix"]), run.class_names),))
    if not task.has_classes:
        return Panel("confusion", "Predicted against true", (
            figures.predicted_vs_true_figure(samples["target"], samples["prediction"], samples["id"],
                                             wrong=~samples["correct"]),
            figures.error_histogram_figure(samples["abs_error"])))
    return Panel("confusion", "Confusion matrix",
                 (figures.confusion_figure(summaries.confusion(run).counts, run.class_names),))


def _slices(run: Run, task, inputs: _Inputs) -> Panel:
    from analyzers.evaluation.metrics import rank_errors
    from analyzers.evaluation.slices import slice_mask

    slices = summaries.optional_table(run, "slices.parquet")
    if slices is None:
        return Panel("slices", "Where the errors concentrate", skipped="This run has no slice analysis.")
    if not len(slices):
        return Panel("slices", "Where the errors concentrate",
                     (Html("<p>No group of samples has significantly more errors than the rest.</p>"),))
    top = slices.head(TOP_SLICES)
    parts = [_table(pd.DataFrame({"slice": top["description"], "samples": top["size"].astype(int),
                                  "error rate": [summaries.percent(v) for v in top["error_rate"]],
                                  "lift": top["lift"]}))]
    samples = run.sample_table
    for number, (_, s) in enumerate(top.iterrows(), start=1):
        members = np.flatnonzero(slice_mask(samples, s["ids"]))
        worst = rank_errors(samples.rows(members), by=task.rankings[0], limit=SLICE_GALLERY)
        parts.append(Html(f"<h4>{number}. {_e(s['description'])}: its worst samples</h4>"))
        parts.append(_gallery(run, task, worst, inputs))
    return Panel("slices", "Where the errors concentrate", tuple(parts))


def _label_noise(run: Run, task, inputs: _Inputs) -> Panel:
    suspects = summaries.optional_table(run, "label_noise.parquet")
    if suspects is None:
        return Panel("label_noise", "Label-noise suspects", skipped="This run has no label-noise analysis.")
    if not len(suspects):
        return Panel("label_noise", "Label-noise suspects", (Html("<p>No sample's label looks wrong.</p>"),))
    top = suspects.sort_values("score", ascending=False, kind="stable").head(SUSPECTS_SHOWN)
    rows = run.sample_table.rows(run.sample_table.positions(top["id"].to_numpy()))
    parts = [Html(f"<p>{len(suspects):,} samples whose label is probably wrong; the {len(top)} strongest:</p>"),
             _table(pd.DataFrame({"id": top["id"].astype(str),
                                  "labelled": [summaries.class_name(run, v) for v in top["label"]],
                                  "looks like": [summaries.class_name(run, v) for v in top["suggested_label"]],
                                  "score": top["score"]})),
             _gallery(run, task, rows, inputs)]
    return Panel("label_noise", "Label-noise suspects", tuple(parts))


def _calibration(run: Run, task) -> Panel:
    if not task.has_classes:
        return Panel("calibration", "Calibration", skipped=f"Top-label calibration is a classifier's; this is a "
                                                           f"{run.task} run.")
    bins = summaries.reliability(run)
    return Panel("calibration", "Calibration", (figures.reliability_figure(bins),))


def _explanations(run: Run, inputs: _Inputs) -> Panel:
    """The maps `python -m analyzers explain` stored, each beside its faithfulness scores."""
    from analyzers.explanations.attributions import METHODS, reduce_for_display
    from analyzers.explanations.explain_run import EXPLANATIONS, FAITHFULNESS
    from analyzers.loading.runs import read_cache_entry

    title = "Explanations and their faithfulness"
    scores = summaries.optional_table(run, FAITHFULNESS)
    stored = sorted(p for p in run.file(EXPLANATIONS).glob("*/*.npz") if p.parent.name in METHODS) \
        if run.file(EXPLANATIONS).is_dir() else []
    if scores is None and not stored:
        return Panel("explanations", title, skipped="No explanation is stored in this run: python -m analyzers "
                                                    "explain RUN --ids ... stores some.")
    parts = []
    if scores is not None and len(scores):
        columns = [c for c in ("id", "method", "target", "deletion_auc", "insertion_auc", "completeness_gap",
                               "road_gap", "sanity_mean_corr", "sanity_flag") if c in scores]
        parts.append(_table(scores[columns].head(100)))
        parts.append(Html("<p>Deletion and insertion AUC: the model's output as the most important features are "
                          "removed or added first (lower deletion, higher insertion is more faithful). Sanity: the "
                          "maps' rank correlation with those of a randomised model (flagged when they barely "
                          "change).</p>"))
    modality = run.info["dataset"]["modality"]
    drawn = 0
    for path in stored:
        entry = read_cache_entry(path)
        if entry is None or "ids" not in entry or "attributions" not in entry:
            parts.append(_left_out(path, "is damaged"))
            continue
        method = path.parent.name
        ids = [str(v) for v in entry["ids"]]
        positions = run.sample_table.positions(entry["ids"])
        if len(positions) != len(ids) or len(entry["attributions"]) != len(ids):
            parts.append(_left_out(path, "names samples this run does not hold"))
            continue
        room = min(len(ids), EXPLANATIONS_SHOWN - drawn,
                   inputs.image_room() if modality == "image" else EXPLANATIONS_SHOWN)
        if room <= 0:
            break
        x = inputs.x(positions[:room])
        if x is None:
            continue
        display = reduce_for_display(entry["attributions"][:room], "tokens" if modality == "tokens" else None)
        maps = []
        for i in range(room):
            maps.append(sample_display.attribution_figure(
                run, x[i], display[i], signed=METHODS[method].signed,
                title=f"id {ids[i]}" + _scores_words(scores, ids[i], method, path.stem)))
            drawn += 1
            if modality == "image":
                inputs.maps += 1
        parts.append(Html(f"<h4>{_e(method)}, explaining the {_e(path.stem)} class (del: deletion AUC, ins: "
                          f"insertion AUC)</h4>"))
        parts.append(Row(tuple(maps), width=340 if modality == "image" else 1100))
    return Panel("explanations", title, tuple(parts))


def _left_out(path: Path, why: str) -> Html:
    return Html(f"<p class=\"skipped\">{_e(path.parent.name)}/{_e(path.name)} {_e(why)}: left out.</p>")


def _scores_words(scores, sample_id: str, method: str, target: str) -> str:
    """A map's faithfulness beside it: its deletion and insertion AUC from faithfulness.parquet."""
    if scores is None or not len(scores):
        return ""
    row = scores[(scores["id"].astype(str) == sample_id) & (scores["method"] == method) & (scores["target"] == target)]
    if row.empty:
        return ""
    r = row.iloc[-1]
    words = [f"{name} {float(r[column]):.2f}" for name, column in (("del", "deletion_auc"), ("ins", "insertion_auc"))
             if column in r and r[column] == r[column]]
    return " · " + " · ".join(words) if words else ""


def _gradients(run: Run) -> Panel:
    flags = summaries.optional_json(run, "gradients/flags.json")
    traces = summaries.optional_table(run, "gradients/traces.parquet")
    if flags is None and traces is None:
        return Panel("gradients", "Gradient health", skipped="This run has no gradient analysis.")
    parts = []
    if flags:
        lines, _ = summaries.gradient_flags_text(flags)
        parts.append(Html("".join(f"<p>{_markdown(line)}</p>" for line in lines)))
    wide = summaries.gradient_traces(traces, "parameters") if traces is not None else pd.DataFrame()
    if not wide.empty:
        parts.append(figures.grad_norm_figure(wide, x="batch", flags=summaries.layer_flags(flags or {}),
                                              title="Gradient norm of the parameters per layer, batch by batch"))
    dead = summaries.optional_table(run, "gradients/dead_units.parquet")
    if dead is not None and len(dead) and (dead["dead_fraction"] > 0).any():
        parts.append(figures.dead_units_figure(dead))
    return Panel("gradients", "Gradient health", tuple(parts))


def _training(run: Run) -> Panel:
    from analyzers.training.recorder import read_training_log

    path = run.file("training/log.jsonl")
    if not path.is_file():
        return Panel("training", "Training curves", skipped="This run holds no training log "
                                                           "(analyzers.TrainingRecorder writes one).")
    try:
        steps, validation, grad_norms = read_training_log(path)
    except AnalyzerError as exc:
        return Panel("training", "Training curves", skipped=f"The training log cannot be read: {first_line(exc)}")
    parts = [figures.training_curves_figure(steps, validation)]
    if not grad_norms.empty:
        parts.append(figures.grad_norm_figure(grad_norms, x="step", title="Gradient norm per layer during training"))
    return Panel("training", "Training curves", tuple(parts))


def _comparison(run: Run, compare: Run | None) -> Panel:
    title = "Comparison with another run"
    if compare is None:
        return Panel("comparison", title, skipped="No second run was given (--compare RUN_B).")
    from analyzers.evaluation.comparison import compare_runs

    c = compare_runs(run, compare)
    s = c.summary
    headline = pd.DataFrame([(k.replace("_", " "), s["headline_a"][k], s["headline_b"].get(k),
                              None if s["headline_a"][k] is None or s["headline_b"].get(k) is None
                              else s["headline_b"][k] - s["headline_a"][k]) for k in s["headline_a"]],
                            columns=["metric", f"(a) {Path(run.path).name}", f"(b) {Path(compare.path).name}",
                                     "(b) − (a)"])
    parts = [_table(headline),
             Html(f"<p>(a) less wrong on <b>{s['better_a']:,}</b> samples, (b) less wrong on <b>{s['better_b']:,}"
                  f"</b>, the same on <b>{s['same_error']:,}</b>; {_e(s['paired_test'])} p = "
                  f"{s['paired_p']:.3g}.</p>")]
    if not c.per_class.empty:
        parts.append(figures.recall_delta_figure(c.per_class, "class" if run.task != "multilabel" else "label"))
    if not c.per_slice.empty:
        shown = c.per_slice[["description", "size", "error_a", "error_b", "error_delta"]].head(10)
        parts.append(Html("<h4>Slices, largest change first</h4>"))
        parts.append(_table(shown.rename(columns={"error_a": "error (a)", "error_b": "error (b)",
                                                  "error_delta": "change"})))
    return Panel("comparison", title, tuple(parts))


# ----------------------------------------------------------------------------------------------------- the report

def build_report(run, *, compare=None, dataset=None, load_inputs: bool = True, allow_import: bool = False,
                 max_thumbnails: int = MAX_THUMBNAILS) -> Report:
    """The report of `run` (a run directory or an opened `Run`): every section of `SECTIONS`, each skipped with
    its reason where it does not apply. `compare`, a second run on the same dataset, adds the deltas. The
    thumbnails read the run's inputs: `dataset` (an `analyzers.Dataset` in the run's order), else the run's own
    files when `load_inputs` (a model file's in the sandboxed worker; an import-path architecture only with
    `allow_import`, as on the command line)."""
    if not isinstance(max_thumbnails, (int, np.integer)) or isinstance(max_thumbnails, bool) or max_thumbnails < 0:
        raise AnalyzerError(f"max_thumbnails must be a whole number from 0, got {max_thumbnails!r}")
    run = run if isinstance(run, Run) else open_run(run)
    compare = compare if compare is None or isinstance(compare, Run) else open_run(compare)
    from analyzers.evaluation.thresholds import THRESHOLDS

    task = summaries.run_task(run, summaries.optional_json(run, THRESHOLDS))
    inputs = _Inputs(run, dataset, load=load_inputs, allow_import=allow_import, limit=int(max_thumbnails))
    metrics = summaries.metrics(run, task)
    builders = {
        "provenance": lambda: _provenance(run, compare), "headline": lambda: _headline(run, task, metrics),
        "findings": lambda: _findings(run, task), "confusion": lambda: _confusion(run, task),
        "slices": lambda: _slices(run, task, inputs), "label_noise": lambda: _label_noise(run, task, inputs),
        "calibration": lambda: _calibration(run, task), "explanations": lambda: _explanations(run, inputs),
        "gradients": lambda: _gradients(run), "training": lambda: _training(run),
        "comparison": lambda: _comparison(run, compare)}
    panels = []
    for key in SECTIONS:
        try:
            panels.append(builders[key]())
        except AnalyzerError as exc:  # one section that cannot be drawn never takes the others with it
            panels.append(Panel(key, key.replace("_", " ").capitalize(), skipped=f"Left out: {first_line(exc)}"))
    notes = (inputs.problem,) if inputs.problem else ()
    title = f"Model report: {Path(run.path).name} ({run.info.get('num_samples', 0):,} samples, {run.task})"
    return Report(title, tuple(panels), thumbnails=inputs.thumbnails,
                  explanation_maps=inputs.maps, notes=notes, run_dir=Path(run.path))


def report_command(args) -> int:
    """`python -m analyzers report RUN_DIR --out report.html [--compare RUN_B]`."""
    report = build_report(args.run_dir, compare=args.compare, allow_import=True,
                          max_thumbnails=args.max_thumbnails)
    out = report.write(args.out)
    size = out.stat().st_size
    skipped = [p.key for p in report.panels if p.skipped is not None]
    print(f"report written to {out} ({size / 1e6:.1f} MB, {report.thumbnails} thumbnails"
          + (f", {report.explanation_maps} explanation maps" if report.explanation_maps else "")
          + (f"; not in this run: {', '.join(skipped)}" if skipped else "") + ")")
    return 0
