"""Plotly figure builders: arrays and tables in, `plotly.graph_objects.Figure` out. No Streamlit, so reports reuse them.

Colours are colour-blind safe: Okabe-Ito for categories (plotly's "Safe" beyond eight), Cividis for magnitudes, and a
diverging red-blue scale centred on zero for signed attributions (blue against the class, red for it).
Figures that can be clicked carry what a click means in `customdata`: sample ids, or (true, pred, count) for the
confusion matrix's cells.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from .text import plotly_text

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
SAFE = ("#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99", "#999933", "#882255",
        "#661100", "#6699CC", "#888888")
SEQUENTIAL = "Cividis"
# Magnitudes drawn as small points on white (the Embeddings page): Cividis up to 0.75 of its range. Its last quarter
# fades to a pale yellow (#fee838, 1.25:1 against white) that left the most confident points near-white on white.
POINTS_SEQUENTIAL = [[k / 8, colour] for k, colour in
                     enumerate(sample_colorscale(SEQUENTIAL, [0.75 * k / 8 for k in range(9)]))]
# The density of points under those drawn: empty cells are left clear (NaN); a cell of one point is already a light
# grey (1.6:1 against white), the densest a dark one, so a sparse region never vanishes into the background.
DENSITY = [[0.0, "#cccccc"], [1.0, "#404040"]]
# Confusion cells: white for none, then single-hue blues (ColorBrewer), any non-empty cell visibly tinted.
CELLS = [[0.0, "#ffffff"], [1e-9, "#deebf7"], [0.25, "#9ecae1"], [0.5, "#4292c6"], [1.0, "#08306b"]]
DIVERGING = "RdBu_r"
RIGHT, WRONG = "#0072B2", "#D55E00"
MAX_SCATTER_POINTS = 30_000
MAX_CURVE_POINTS = 2_000  # points of a PR or ROC line drawn; its first and last are always among them
FONT = dict(size=13)


def palette(n: int) -> list:
    """`n` distinct colours: colour-blind-safe palettes up to 12, then evenly spaced along a perceptual colour
    scale, so that no two layers share a colour (13 layers cycled the 12-colour palette into look-alikes)."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    if n <= len(SAFE):
        return list(SAFE[:n])
    return sample_colorscale("Turbo", [i / (n - 1) for i in range(n)])


def _layout(fig: go.Figure, *, title: str | None = None, height: int = 380, **kwargs) -> go.Figure:
    # titles name classes, layers and columns from the run: plain text, never plotly's pseudo-HTML
    fig.update_layout(title=plotly_text(title) if title else None, height=height, font=FONT, template="plotly_white",
                      margin=dict(l=10, r=10, t=50 if title else 20, b=10), **kwargs)
    return fig


# ------------------------------------------------------------------------------------------------- confusion matrix

def confusion_figure(counts, class_names, *, values=None, value_label: str = "count") -> go.Figure:
    """The confusion matrix: a heat map to look at, and over it one transparent scatter marker per cell to click.

    A heat map cell click gives Streamlit no selection; a scatter marker does. `values` (default the counts) sets the
    colours and labels, e.g. the counts normalised per true class. customdata of every marker: (true, pred, count).
    """
    counts = np.asarray(counts)
    k = len(counts)
    values = counts if values is None else np.asarray(values, dtype=float)
    names = [plotly_text(n) for n in class_names]
    is_count = np.issubdtype(values.dtype, np.integer)
    text = [[f"{int(v)}" if is_count else f"{v:.2f}" for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=values, x=names, y=names, text=text, texttemplate="%{text}" if k <= 20 else None,
                               colorscale=CELLS, zmin=0, colorbar=dict(title=value_label, thickness=12),
                               hoverinfo="skip", xgap=1, ygap=1))
    true, pred = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    true, pred = true.ravel(), pred.ravel()
    plot = int(max(330, min(640, 56 * k)))  # height of the square plotting area, in pixels
    fig.add_trace(go.Scatter(
        x=[names[p] for p in pred], y=[names[t] for t in true], mode="markers",
        marker=dict(symbol="square", size=max(6, int(0.9 * plot / k)), color="rgba(0,0,0,0)",
                    line=dict(width=0)),
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
        customdata=np.column_stack([true, pred, counts.ravel()]), text=np.asarray(text).ravel(),
        hovertemplate="true %{y}<br>predicted %{x}<br>" + value_label + " %{text}<br>%{customdata[2]} samples"
                      "<extra>click to see them</extra>",
        name="cells", showlegend=False))
    fig.update_xaxes(title="predicted class", type="category", categoryorder="array", categoryarray=names,
                     side="top", showgrid=False, zeroline=False)
    fig.update_yaxes(title="true class", type="category", categoryorder="array", categoryarray=names,
                     autorange="reversed", showgrid=False, zeroline=False, scaleanchor="x", constrain="domain")
    fig.update_layout(height=plot + 110, margin=dict(l=10, r=10, t=90, b=10), font=FONT, template="plotly_white",
                      hovermode="closest", hoverlabel=dict(bgcolor="white"))
    return fig


# ----------------------------------------------------------------------------------------------- metrics and data

MIN_BIN_SAMPLES = 10  # a reliability bin of fewer samples is too noisy to draw the curve through


def reliability_figure(bins: dict, *, label: str = "model", other: dict | None = None,
                       other_label: str = "rest", min_samples: int = MIN_BIN_SAMPLES,
                       x_title: str = "confidence (top class probability)", y_title: str = "accuracy") -> go.Figure:
    """Reliability diagram from `CalibrationBins.to_dict()`: observed accuracy against mean confidence per bin, the
    diagonal of perfect calibration, and the share of samples per bin below. Each point is labelled with its count;
    the curve runs through bins of at least `min_samples`, and smaller bins are grey open markers off the curve (a
    bin of 3 samples made a dip to 0.33). `other` adds a second curve."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.06)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#888"),
                             name="perfectly calibrated", hoverinfo="skip"), row=1, col=1)
    for curve, name, colour in ((bins, label, OKABE_ITO[0]), (other, other_label, OKABE_ITO[1])):
        if not curve:
            continue
        mean = np.array([np.nan if v is None else v for v in curve["mean_predicted"]], dtype=float)
        obs = np.array([np.nan if v is None else v for v in curve["observed"]], dtype=float)
        count = np.asarray(curve["count"])
        keep = count >= min_samples
        sparse = (count > 0) & ~keep
        ece = curve.get("ece")
        tag = f"{name} (ECE {ece:.3f})" if ece is not None and np.isfinite(ece) else name
        hover = "confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} samples<extra></extra>"
        fig.add_trace(go.Scatter(x=mean[keep], y=obs[keep], mode="lines+markers+text", name=tag,
                                 line=dict(color=colour), customdata=count[keep], text=[f"{c:,}" for c in count[keep]],
                                 textposition="top center", textfont=dict(size=10), hovertemplate=hover),
                      row=1, col=1)
        if sparse.any():
            fig.add_trace(go.Scatter(x=mean[sparse], y=obs[sparse], mode="markers+text",
                                     name=f"{name}: bins under {min_samples} samples", customdata=count[sparse],
                                     text=[f"{c:,}" for c in count[sparse]], textposition="top center",
                                     textfont=dict(size=10, color="#999"),
                                     marker=dict(color="#bbb", symbol="circle-open", size=9), hovertemplate=hover),
                          row=1, col=1)
        edges = np.asarray(curve["edges"], dtype=float)
        centres = (edges[:-1] + edges[1:]) / 2
        share = count / max(count.sum(), 1)
        fig.add_trace(go.Bar(x=centres, y=share, width=np.diff(edges) * 0.9, marker_color=colour, opacity=0.6,
                             name=f"{name}: share of samples", showlegend=False,
                             hovertemplate="%{y:.1%} of samples<extra></extra>"), row=2, col=1)
    fig.update_xaxes(range=[0, 1], row=2, col=1, title=x_title)
    fig.update_xaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title=y_title, row=1, col=1)
    fig.update_yaxes(title="share", tickformat=".0%", row=2, col=1)
    return _layout(fig, height=430, legend=dict(orientation="h", y=-0.25), barmode="overlay")


def co_missed_figure(matrix, label_names) -> go.Figure:
    """Which labels are missed together: cell (a, b) counts the samples in which both are missed (the diagonal,
    each label's own misses); click a cell for its samples (customdata: (a, b, count), as `confusion_figure`)."""
    fig = confusion_figure(matrix, label_names, value_label="samples")
    fig.update_traces(hovertemplate="%{y} and %{x} both missed<br>%{customdata[2]} samples"
                                    "<extra>click to see them</extra>", selector=dict(type="scatter"))
    fig.update_xaxes(title="missed label")
    fig.update_yaxes(title="missed label")
    return fig


def class_balance_figure(labels, pred, class_names) -> go.Figure:
    """How many samples each class has, and how many the model assigns to it."""
    k = len(class_names)
    names = [plotly_text(n) for n in class_names]
    true_counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    pred_counts = np.bincount(np.asarray(pred, dtype=np.int64), minlength=k)
    fig = go.Figure([go.Bar(x=names, y=true_counts, name="labelled", marker_color=OKABE_ITO[0]),
                     go.Bar(x=names, y=pred_counts, name="predicted", marker_color=OKABE_ITO[1])])
    fig.update_xaxes(title="class", type="category")
    fig.update_yaxes(title="samples")
    return _layout(fig, barmode="group", height=340, legend=dict(orientation="h", y=1.12))


def per_class_figure(report: dict, class_names) -> go.Figure:
    """Precision, recall and F1 per class from a `classification_report(output_dict=True)`."""
    keys = [str(n) for n in class_names if str(n) in report]
    names = [plotly_text(n) for n in keys]
    fig = go.Figure()
    for metric, colour in zip(("precision", "recall", "f1-score"), OKABE_ITO):
        fig.add_trace(go.Bar(x=names, y=[report[n][metric] for n in keys], name=metric, marker_color=colour,
                             hovertemplate="%{x}: %{y:.3f}<extra>" + metric + "</extra>"))
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(type="category", title="class")
    return _layout(fig, barmode="group", height=340, legend=dict(orientation="h", y=1.12))


# ------------------------------------------------------------------------------------------------------ thresholds

def threshold_curves_figure(curve, *, chosen: float, marks: dict) -> go.Figure:
    """A `thresholds.ThresholdCurve` as its precision-recall and ROC curves side by side, with the chosen threshold
    and the marked ones (`{"best F1": t, ...}`) as points on both."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"Precision and recall (AP {curve.average_precision:.3f})" if curve.average_precision is not None
        else "Precision and recall", f"ROC (AUC {curve.roc_auc:.3f})" if curve.roc_auc is not None else "ROC"))
    line = curve.thinned(MAX_CURVE_POINTS)  # its rates over MAX_CURVE_POINTS thresholds, not 10M
    finite = np.flatnonzero(np.isfinite(line.thresholds))
    text = [f"threshold {t:.3f}" for t in line.thresholds[finite]]
    fig.add_trace(go.Scatter(x=line.recall[finite], y=line.precision[finite], mode="lines", name="precision",
                             line=dict(color=OKABE_ITO[0]), text=text, showlegend=False,
                             hovertemplate="%{text}<br>recall %{x:.3f}<br>precision %{y:.3f}<extra></extra>"),
                  row=1, col=1)
    fig.add_hline(y=curve.prevalence, line=dict(color="#888888", dash="dot"), row=1, col=1)
    fig.add_trace(go.Scatter(x=line.fpr[finite], y=line.recall[finite], mode="lines", name="ROC",
                             line=dict(color=OKABE_ITO[0]), text=text, showlegend=False,
                             hovertemplate="%{text}<br>false-positive rate %{x:.3f}<br>recall %{y:.3f}"
                                           "<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#888888", dash="dash"),
                             hoverinfo="skip", showlegend=False), row=1, col=2)
    symbols = ("circle", "diamond", "square", "cross")
    for k, (name, t) in enumerate({"chosen": chosen, **marks}.items()):
        at = curve.at(t)
        negatives = curve.total - curve.positives
        colour = WRONG if name == "chosen" else OKABE_ITO[(k + 1) % len(OKABE_ITO)]
        for col, x, y in ((1, at["recall"], at["precision"]),
                          (2, at["fp"] / negatives if negatives else 0.0, at["recall"])):
            fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=f"{name} ({t:.3f})", legendgroup=name,
                                     showlegend=col == 1, marker=dict(size=11, color=colour, symbol=symbols[k % 4]),
                                     hovertemplate=f"{plotly_text(name)}: threshold {t:.3f}<extra></extra>"),
                          row=1, col=col)
    fig.update_xaxes(title="recall", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title="precision", range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(title="false-positive rate", range=[0, 1.02], row=1, col=2)
    fig.update_yaxes(title="recall", range=[0, 1.02], row=1, col=2)
    return _layout(fig, height=400, legend=dict(orientation="h", y=-0.25))


# ------------------------------------------------------------------------------------------------------ regression

def predicted_vs_true_figure(target, prediction, ids, *, wrong=None, max_points: int = MAX_SCATTER_POINTS
                             ) -> go.Figure:
    """A regression's predictions against its targets, the diagonal y = x drawn (a perfect model lies on it), the
    samples counted as wrong (`wrong`, the largest errors) in the error colour. customdata: sample ids, so a click
    opens the sample."""
    target, prediction = np.asarray(target, dtype=float), np.asarray(prediction, dtype=float)
    wrong = np.zeros(len(target), dtype=bool) if wrong is None else np.asarray(wrong, dtype=bool)
    keep = downsample_rows(len(target), max_points, keep=np.flatnonzero(wrong))
    ids = np.asarray(ids).astype(str)
    fig = go.Figure()
    for flag, name, colour in ((False, "other samples", RIGHT), (True, "largest errors", WRONG)):
        rows = keep[wrong[keep] == flag]
        fig.add_trace(go.Scattergl(x=target[rows], y=prediction[rows], mode="markers", name=name,
                                   marker=dict(color=colour, size=6, opacity=0.7),
                                   customdata=[plotly_text(i) for i in ids[rows]],
                                   hovertemplate="id %{customdata}<br>target %{x:.4g}<br>predicted %{y:.4g}"
                                                 "<extra></extra>"))
    low = float(min(target.min(), prediction.min())) if len(target) else 0.0
    high = float(max(target.max(), prediction.max())) if len(target) else 1.0
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x",
                             line=dict(color="#888888", dash="dash"), hoverinfo="skip"))
    fig.update_xaxes(title="target")
    fig.update_yaxes(title="prediction")
    return _layout(fig, height=420, legend=dict(orientation="h", y=-0.2))


def residual_figure(prediction, residual, ids, *, max_points: int = MAX_SCATTER_POINTS) -> go.Figure:
    """Residuals (prediction − target) against the prediction, around a zero line: a trend or a funnel is a bias
    or an error that grows with the value. customdata: sample ids."""
    prediction, residual = np.asarray(prediction, dtype=float), np.asarray(residual, dtype=float)
    largest = np.flatnonzero(np.abs(residual) >= np.quantile(np.abs(residual), 0.9)) if len(residual) else None
    keep = downsample_rows(len(prediction), max_points, keep=largest)
    ids = np.asarray(ids).astype(str)
    fig = go.Figure(go.Scattergl(x=prediction[keep], y=residual[keep], mode="markers",
                                 marker=dict(color=OKABE_ITO[0], size=6, opacity=0.6),
                                 customdata=[plotly_text(i) for i in ids[keep]],
                                 hovertemplate="id %{customdata}<br>predicted %{x:.4g}<br>residual %{y:.4g}"
                                               "<extra></extra>", showlegend=False))
    fig.add_hline(y=0, line=dict(color="#888888", dash="dash"))
    fig.update_xaxes(title="prediction")
    fig.update_yaxes(title="residual (prediction − target)")
    return _layout(fig, height=420)


def coverage_figure(coverage: dict) -> go.Figure:
    """A mean-and-variance regression's interval coverage (metrics.json's `interval_coverage`: level -> observed
    share of targets inside that central interval) against the nominal level, with the diagonal of a calibrated
    spread."""
    levels = np.array([float(k) for k in coverage], dtype=float)
    observed = np.array([float(v) for v in coverage.values()], dtype=float)
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#888"),
                               name="calibrated spread", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=levels, y=observed, mode="lines+markers+text", name="model",
                             line=dict(color=OKABE_ITO[0]), text=[f"{v:.0%}" for v in observed],
                             textposition="top left",
                             hovertemplate="%{x:.0%} interval holds %{y:.1%} of targets<extra></extra>"))
    fig.update_xaxes(range=[0, 1], title="nominal level of the central interval", tickformat=".0%")
    fig.update_yaxes(range=[0, 1.02], title="share of targets inside", tickformat=".0%")
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def error_histogram_figure(abs_error, *, bins: int = 40) -> go.Figure:
    """How the absolute errors are spread: most near zero and a long tail is the usual shape; a second hump is a
    group the model gets wrong."""
    fig = go.Figure(go.Histogram(x=np.asarray(abs_error, dtype=float), nbinsx=bins, marker_color=OKABE_ITO[0],
                                 hovertemplate="absolute error %{x}<br>%{y} samples<extra></extra>"))
    fig.update_xaxes(title="absolute error")
    fig.update_yaxes(title="samples")
    return _layout(fig, height=320)


def probabilities_figure(probs, class_names, *, label: int | None = None, pred: int | None = None) -> go.Figure:
    """The probability of every class for one sample; the true class and the prediction are marked."""
    probs = np.asarray(probs, dtype=float)
    names = [plotly_text(n) for n in class_names]
    colours = [RIGHT if i == label else (WRONG if i == pred else "#9aa5b1") for i in range(len(names))]
    tags = [" (true)" if i == label else (" (predicted)" if i == pred else "") for i in range(len(names))]
    order = np.argsort(probs)[-25:]  # at most 25 classes, the likeliest
    fig = go.Figure(go.Bar(x=probs[order], y=[names[i] + tags[i] for i in order], orientation="h",
                           marker_color=[colours[i] for i in order], text=[f"{probs[i]:.3f}" for i in order],
                           textposition="outside", hovertemplate="%{y}: %{x:.4f}<extra></extra>"))
    fig.update_xaxes(range=[0, 1.22], title="probability")
    fig.update_yaxes(type="category")
    return _layout(fig, height=max(200, 26 * len(order) + 70))


def group_figure(groups: pd.DataFrame, column: str) -> go.Figure:
    """Accuracy per group of a metadata column (from analyzers.evaluation.metrics.group_metrics), with group sizes."""
    fig = go.Figure(go.Bar(x=groups["group"].astype(str).map(plotly_text), y=groups["accuracy"], marker_color=OKABE_ITO[0],
                           customdata=groups["size"], text=[f"{a:.2f}" for a in groups["accuracy"]],
                           hovertemplate="%{x}<br>accuracy %{y:.3f}<br>%{customdata} samples<extra></extra>"))
    fig.update_yaxes(range=[0, 1.05], title="accuracy")
    fig.update_xaxes(title=plotly_text(column), type="category")
    return _layout(fig, height=320)


# ------------------------------------------------------------------------------------------------------- attributions

def default_bands(channels: int):
    """What an image of `channels` bands shows by default: grey, RGB, or a false-colour composite (red, green, blue
    from bands 1, 2, 3; two bands as magenta and green), never a mean that would blur the bands together."""
    if channels in (1, 3):
        return None
    return (1, 0, 1) if channels == 2 else (0, 1, 2)


def to_display_image(x, *, mean=None, std=None, bands=None) -> np.ndarray:
    """One model input (C, H, W) as an (H, W) or (H, W, 3) float image in [0, 1]: normalisation undone, else scaled.

    `bands` chooses what an image of other than 1 or 3 channels shows: one band index (grey) or three (a
    false-colour composite, each band stretched on its own); default `default_bands`."""
    x = np.asarray(x, dtype=np.float32)
    c = x.shape[0]
    if std is not None and mean is not None:
        x = x * np.resize(np.asarray(std, np.float32), c)[:, None, None] + np.resize(np.asarray(mean, np.float32), c)[:, None, None]
    bands = default_bands(c) if bands is None else bands
    if bands is not None:
        picked = [int(bands)] if np.ndim(bands) == 0 else [int(b) for b in bands]
        if any(not 0 <= b < c for b in picked):
            raise ValueError(f"bands {picked} do not exist in a {c}-band image")
        layers = []
        for b in picked:  # each band on its own scale: bands of one image can differ by orders of magnitude
            band = x[b]
            lo, hi = float(band.min()), float(band.max())
            layers.append((band - lo) / (hi - lo or 1.0))
        return layers[0] if len(layers) == 1 else np.stack(layers, axis=-1)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        x = (x - lo) / (hi - lo or 1.0)
    x = np.clip(x, 0, 1)
    return x[0] if c == 1 else x.transpose(1, 2, 0)


def band_labels(channels: int, names=None) -> tuple:
    """Each band's name: `names` when there is one per band (a dataset that names its bands), else band 1, 2, ..."""
    names = tuple(str(n) for n in names) if names is not None else ()
    return names if len(names) == channels else tuple(f"band {b + 1}" for b in range(channels))


def default_composite(names) -> tuple:
    """The three bands (red, green, blue) a false-colour composite of a multispectral image shows first: colour
    infrared (near-infrared as red, red as green, green as blue: vegetation shows red) when its bands are named so,
    else bands 1, 2, 3."""
    lowered = [str(n).lower() for n in names]
    if all(b in lowered for b in ("nir", "red", "green")):
        return tuple(lowered.index(b) for b in ("nir", "red", "green"))
    return (0, 1, 2)


def band_composite_figure(x, bands, names, *, mean=None, std=None, height: int = 320) -> go.Figure:
    """One multispectral input (C, H, W) as a picture: one band (an index) in grey, or three (a tuple) as red, green
    and blue, each band stretched on its own scale; titled with what shows where (`names`: one per band)."""
    image = to_display_image(x, mean=mean, std=std, bands=bands)
    if np.ndim(bands) == 0:
        title = str(names[int(bands)])
    else:
        title = " · ".join(f"{colour} = {names[int(b)]}" for colour, b in zip(("R", "G", "B"), bands))
    return image_figure(image, title=title, height=height)


def band_shares_text(names, shares) -> str:
    """Each band's share of a map's |attribution|, largest first: "nir 44% · red 32% · ..."."""
    order = np.argsort(-np.asarray(shares, dtype=float), kind="stable")
    return " · ".join(f"{names[b]} {float(shares[b]):.0%}" for b in order)


def _symmetric_range(values: np.ndarray) -> float:
    m = float(np.nanmax(np.abs(values))) if values.size else 0.0
    return m or 1.0


def image_attribution_figure(image, attribution, *, signed: bool, title: str | None = None,
                             opacity: float = 0.6, truth=None) -> go.Figure:
    """A heat map over the image: `image` (H, W) or (H, W, 3) in [0, 1], `attribution` (H, W); `truth`, an (H, W)
    mask of where the evidence really is (a planted ground truth), is outlined."""
    image = np.asarray(image, dtype=float)
    attribution = np.asarray(attribution, dtype=float)
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    fig = go.Figure(go.Image(z=(rgb * 255).astype(np.uint8), hoverinfo="skip"))
    bound = _symmetric_range(attribution)
    fig.add_trace(go.Heatmap(z=attribution, colorscale=DIVERGING if signed else SEQUENTIAL,
                             zmin=-bound if signed else 0.0, zmax=bound, zmid=0 if signed else None, opacity=opacity,
                             colorbar=dict(thickness=10, len=0.8),
                             hovertemplate="row %{y}, column %{x}<br>attribution %{z:.3g}<extra></extra>"))
    if truth is not None:
        fig.add_trace(go.Contour(z=np.asarray(truth, dtype=float), contours=dict(start=0.5, end=0.5, size=1,
                                                                                coloring="lines"),
                                 line=dict(width=2, dash="dot"), colorscale=[[0, "black"], [1, "black"]],
                                 showscale=False, hoverinfo="skip",
                                 name="planted ground truth"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return _layout(fig, title=title, height=320)


def image_figure(image, *, title: str | None = None, height: int = 320) -> go.Figure:
    image = np.asarray(image, dtype=float)
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    fig = go.Figure(go.Image(z=(rgb * 255).astype(np.uint8)))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return _layout(fig, title=title, height=height)


def _frequency_label(hz: float) -> str:
    return f"{hz / 1000:.1f}k" if hz >= 1000 else f"{hz:.0f}"


def spectrogram_figure(spectrogram, *, sample_rate: float, hop_length: int, frequencies=None, attribution=None,
                       signed: bool = False, title: str | None = None, opacity: float = 0.6,
                       height: int = 320) -> go.Figure:
    """A spectrogram (bins, frames) as a heat map: time in seconds along x (frame i at i * hop_length / sample_rate),
    frequency along y from low to high, each bin labelled with its centre in Hz (`frequencies`, one per bin; else the
    bin's index). With `attribution` (bins, frames) the spectrogram is drawn in grey and the map over it, half
    transparent, on the colour scale of the image maps."""
    spectrogram = np.asarray(spectrogram, dtype=float)
    bins, frames = spectrogram.shape
    times = np.arange(frames) * float(hop_length) / float(sample_rate)
    rows = np.arange(bins)
    named = frequencies is not None and len(frequencies) == bins
    hz = np.asarray(frequencies, dtype=float) if named else None
    labels = [f"{f:.0f} Hz" for f in hz] if named else [f"bin {b}" for b in rows]
    hover = np.broadcast_to(np.asarray(labels, dtype=object)[:, None], spectrogram.shape)
    base = dict(x=times, y=rows, customdata=hover, hoverongaps=False)
    if attribution is None:
        fig = go.Figure(go.Heatmap(z=spectrogram, colorscale=SEQUENTIAL, colorbar=dict(thickness=10, title="level"),
                                   hovertemplate="%{x:.3f} s, %{customdata}<br>level %{z:.3g}<extra></extra>",
                                   **base))
    else:
        attribution = np.asarray(attribution, dtype=float)
        fig = go.Figure(go.Heatmap(z=spectrogram, colorscale=[[0.0, "#ffffff"], [1.0, "#000000"]], showscale=False,
                                   hoverinfo="skip", **base))
        bound = _symmetric_range(attribution)
        fig.add_trace(go.Heatmap(z=attribution, colorscale=DIVERGING if signed else SEQUENTIAL,
                                 zmin=-bound if signed else 0.0, zmax=bound, zmid=0 if signed else None,
                                 opacity=opacity, colorbar=dict(thickness=10, len=0.8),
                                 hovertemplate="%{x:.3f} s, %{customdata}<br>attribution %{z:.3g}<extra></extra>",
                                 **base))
    step = max(1, bins // 8)
    ticks = rows[::step]
    fig.update_xaxes(title="time (s)", showgrid=False, automargin=True)
    fig.update_yaxes(title="frequency (Hz)" if named else "frequency bin", tickmode="array", tickvals=ticks,
                     ticktext=[_frequency_label(hz[b]) for b in ticks] if named else [str(b) for b in ticks],
                     showgrid=False, automargin=True)
    return _layout(fig, title=title, height=height)


def sequence_attribution_figure(letters: str, scores, *, signed: bool, title: str | None = None,
                                width: int = 50, truth=None) -> go.Figure:
    """One coloured cell per position with its letter, wrapped into rows of `width` positions, read left to right;
    positions in `truth` (a boolean per position: a planted ground truth) are written in bold and framed."""
    scores = np.asarray(scores, dtype=float)
    n = len(scores)
    rows = max(1, -(-n // width))
    z = np.full((rows, min(width, n)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    position = np.full(z.shape, -1)
    for i in range(n):
        z[i // width, i % width] = scores[i]
        letter = plotly_text(letters[i]) if i < len(letters) else ""  # a token may be a word from the run's files
        text[i // width, i % width] = f"<b>{letter}</b>" if truth is not None and truth[i] else letter
        position[i // width, i % width] = i
    bound = _symmetric_range(scores)
    labels = [f"{r * width}–{min(n, (r + 1) * width) - 1}" for r in range(rows)]
    fig = go.Figure(go.Heatmap(z=z, y=labels, text=text, customdata=position, texttemplate="%{text}",
                               textfont=dict(size=12),
                               colorscale=DIVERGING if signed else SEQUENTIAL, zmin=-bound if signed else 0.0,
                               zmax=bound, zmid=0 if signed else None, colorbar=dict(thickness=10), xgap=1, ygap=3,
                               hovertemplate="position %{customdata}: %{text}<br>attribution %{z:.3g}<extra></extra>"))
    if truth is not None:
        marked = np.flatnonzero(np.asarray(truth, dtype=bool))
        for r in range(rows):
            cols = marked[(marked // width) == r] % width
            if len(cols):
                fig.add_shape(type="rect", x0=cols.min() - 0.5, x1=cols.max() + 0.5, y0=r - 0.5, y1=r + 0.5,
                              line=dict(color="black", width=2, dash="dot"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(autorange="reversed", title="positions", type="category")
    return _layout(fig, title=title, height=90 + 42 * rows)


def feature_attribution_figure(feature_names, values, *, title: str | None = None, top: int = 15) -> go.Figure:
    """Horizontal bars of the `top` features by absolute attribution, red for the class and blue against it."""
    values = np.asarray(values, dtype=float)
    names = [plotly_text(n) for n in feature_names]
    order = np.argsort(np.abs(values))[-top:]
    colours = [WRONG if values[i] > 0 else RIGHT for i in order]
    fig = go.Figure(go.Bar(x=values[order], y=[names[i] for i in order], orientation="h", marker_color=colours,
                           hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    fig.update_xaxes(title="attribution", zeroline=True, zerolinecolor="#444")
    fig.update_yaxes(type="category")
    return _layout(fig, title=title, height=max(240, 22 * len(order) + 80))


# --------------------------------------------------------------------------------------------------------- embeddings

def downsample_rows(n: int, max_points: int = MAX_SCATTER_POINTS, *, keep=None, seed: int = 0) -> np.ndarray:
    """Row positions to draw: all rows up to `max_points`, else a fixed random sample (plus the rows in `keep`)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=max_points, replace=False)
    if keep is not None and len(keep):
        rows = np.union1d(rows, np.asarray(keep, dtype=np.int64))
    return np.sort(rows)


DENSITY_BINS = 160  # bins per axis of the density under a projection too large to draw point by point
BIN_BLOCK = 1 << 20  # points binned at a time


def _bin_indices(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(each value's bin, the edges) over `bins` equal bins from the minimum to the maximum, as numpy's histogram
    bins them: the last bin holds the maximum, one value spans min - 0.5 to max + 0.5, and a value on an edge
    belongs to the bin above it."""
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    scale = bins / (high - low)
    # in float32 where the values are (a projection is: not copied to float64) and in place: 0.65 s to 0.3 s at 10M;
    # float64 where float32 cannot hold the range's ends (one large constant value widened by 0.5) or its width
    # (compared as Python floats: numpy compares a float32 with a Python float in float32)
    small = np.finfo(np.float32)
    if values.dtype != np.float32 or float(np.float32(low)) != low or float(np.float32(high)) != high or \
            not (high - low < small.max and scale < small.max):
        values = np.asarray(values, dtype=np.float64)
    index = np.empty(len(values), dtype=np.int32)
    # a block at a time: the temporaries of 10M points at once (the edges looked up, in float64) had added 200 MB
    # to the Embeddings page's peak
    for start in range(0, len(values), BIN_BLOCK):
        part, block = index[start:start + BIN_BLOCK], values[start:start + BIN_BLOCK]
        scaled = block - values.dtype.type(low)
        scaled *= values.dtype.type(scale)
        part[:] = scaled
        np.clip(part, 0, bins - 1, out=part)
        # the arithmetic can land one bin off at an edge: correct against the edges themselves, as numpy does
        part -= block < edges[part]
        part += (block >= edges[part + 1]) & (part != bins - 1)
    return index, edges


def density_trace(x: np.ndarray, y: np.ndarray, *, bins: int = DENSITY_BINS) -> go.Heatmap:
    """Every point counted in a `bins` x `bins` grid (as numpy's histogram2d counts), drawn on a log scale in greys
    (`DENSITY`), empty cells left clear; each cell's count is its customdata (the hover says it)."""
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():  # a projection is finite: no copy of 10M points for nothing
        x, y = x[finite], y[finite]
    try:
        (ix, x_edges), (iy, y_edges) = _bin_indices(x, bins), _bin_indices(y, bins)
        # one bincount of the cells: histogram2d's general binning took 6.6 s at 10M points
        ix *= bins
        ix += iy
        del iy
        counts = np.zeros(bins * bins, dtype=np.int64)
        for start in range(0, len(ix), BIN_BLOCK):  # bincount widens to int64: a block at a time
            counts += np.bincount(ix[start:start + BIN_BLOCK], minlength=bins * bins)
        counts = counts.reshape(bins, bins).astype(np.float64)
    except ZeroDivisionError:  # one value so large that +-0.5 leaves no width: histogram2d's own handling
        counts, x_edges, y_edges = np.histogram2d(x, y, bins=bins)
    z = np.where(counts > 0, np.log10(np.maximum(counts, 1)) + 1.0, np.nan).T  # rows of the heatmap are y
    return go.Heatmap(x=(x_edges[:-1] + x_edges[1:]) / 2, y=(y_edges[:-1] + y_edges[1:]) / 2, z=z,
                      customdata=counts.T.astype(np.int64), colorscale=DENSITY, zmin=0.0, showscale=False,
                      hovertemplate="%{customdata:,} samples here<extra>density</extra>", name="density",
                      zsmooth=False, hoverongaps=False)


def embedding_figure(table: pd.DataFrame, *, colour: str, categorical: bool, title: str | None = None,
                     max_points: int | None = None, category_order=None, selected=None) -> go.Figure:
    """A WebGL scatter of a projection table (columns x, y, id and `colour`), each point's id in customdata.

    Categories get one trace each; a number is drawn on `POINTS_SEQUENTIAL` (Cividis short of its palest end). A
    table larger than `max_points` (default MAX_SCATTER_POINTS) is drawn as the density of every point
    (`density_trace`, first) under a fixed random sample of them (the title says so);
    a box or lasso selection still selects by region on every point.
    `selected` ids (a selection made elsewhere: another projection, another page) are drawn bold, the rest faded.
    """
    rows = downsample_rows(len(table), MAX_SCATTER_POINTS if max_points is None else max_points)
    shown = table.iloc[rows]
    fig = go.Figure()
    dense = len(rows) < len(table)
    if dense:  # every point counted, under the ones drawn: where the rest lie is never guessed from a sample
        fig.add_trace(density_trace(table["x"].to_numpy(), table["y"].to_numpy()))
    point_size, point_opacity = (4, 0.55) if dense else (6, 0.8)
    if categorical:
        values = shown[colour].astype(str)
        cats = [str(c) for c in (category_order if category_order is not None else sorted(values.unique()))]
        for cat, col in zip(cats, palette(len(cats))):
            part = shown[values.to_numpy() == cat]
            if part.empty:
                continue
            fig.add_trace(go.Scattergl(x=part["x"], y=part["y"], mode="markers", name=plotly_text(cat),
                                       marker=dict(size=point_size, color=col, opacity=point_opacity),
                                       customdata=part["id"],
                                       text=part["id"].astype(str).map(plotly_text),
                                       hovertemplate="id %{text}<br>"
                                                     + f"{plotly_text(colour)} {plotly_text(cat)}<extra></extra>"))
    else:
        values = pd.to_numeric(shown[colour], errors="coerce")
        fig.add_trace(go.Scattergl(x=shown["x"], y=shown["y"], mode="markers", name=plotly_text(colour),
                                   marker=dict(size=point_size, color=values, colorscale=POINTS_SEQUENTIAL,
                                               showscale=True, colorbar=dict(title=plotly_text(colour), thickness=12),
                                               opacity=min(0.85, point_opacity + 0.05)),
                                   customdata=shown["id"], text=shown["id"].astype(str).map(plotly_text),
                                   hovertemplate="id %{text}<br>" + plotly_text(colour)
                                                 + " %{marker.color:.3g}<extra></extra>"))
    if selected is not None:
        chosen = {str(i) for i in selected}
        for trace in fig.data:
            if trace.type != "scattergl":
                continue
            trace.selectedpoints = [i for i, sample in enumerate(trace.customdata) if str(sample) in chosen]
            trace.selected = dict(marker=dict(opacity=1.0))
            trace.unselected = dict(marker=dict(opacity=0.12))
    if dense:
        title = (f"{title or ''} — the density of all {len(table):,} points, {len(rows):,} of them drawn "
                 f"(select a region, then zoom to it for every point)").strip(" —")
    fig.update_xaxes(title="component 1", showgrid=False, zeroline=False)
    fig.update_yaxes(title="component 2", showgrid=False, zeroline=False)
    # dragging draws a selection box at once (checked in Chromium: Streamlit otherwise starts in pan mode)
    return _layout(fig, title=title, height=560, legend=dict(itemsizing="constant"), dragmode="select")


# ------------------------------------------------------------------------------------------- training and gradients

def training_curves_figure(steps: pd.DataFrame, validation: pd.DataFrame) -> go.Figure:
    """Training loss per step, validation loss, the gap between them, and the learning rate (right axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if not steps.empty and "loss" in steps:
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["loss"], name="training loss", mode="lines",
                                 line=dict(color=OKABE_ITO[0], width=1.5)))
    if not validation.empty and "val_loss" in validation:
        fig.add_trace(go.Scatter(x=validation["step"], y=validation["val_loss"], name="validation loss",
                                 mode="lines+markers", line=dict(color=OKABE_ITO[1], width=2)))
        if not steps.empty and "loss" in steps:
            train_at = np.interp(validation["step"], steps["step"], steps["loss"])
            fig.add_trace(go.Scatter(x=validation["step"], y=validation["val_loss"] - train_at,
                                     name="gap (validation − training)", mode="lines",
                                     line=dict(color=OKABE_ITO[3], dash="dash")))
    if not steps.empty and "lr" in steps:
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["lr"], name="learning rate", mode="lines",
                                 line=dict(color="#777", dash="dot")), secondary_y=True)
        fig.update_yaxes(title="learning rate", secondary_y=True, showgrid=False, tickformat=".1e", rangemode="tozero")
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss", secondary_y=False)
    return _layout(fig, height=380, legend=dict(orientation="h", y=1.15))


def grad_norm_figure(table: pd.DataFrame, *, x: str = "step", flags: dict | None = None,
                     title: str | None = None) -> go.Figure:
    """Per-layer gradient norms (one column per layer, log scale); layers flagged vanishing or exploding are drawn
    dashed and named with their flag. `flags` maps layer -> "vanishing" | "exploding"."""
    flags = flags or {}
    layers = [c for c in table.columns if c != x]
    fig = go.Figure()
    for layer, colour in zip(layers, palette(len(layers))):
        flag = flags.get(layer)
        name = plotly_text(layer)
        fig.add_trace(go.Scatter(x=table[x], y=table[layer], mode="lines", name=f"{name} ⚠ {flag}" if flag else name,
                                 line=dict(color=colour, dash="dash" if flag else "solid", width=3 if flag else 1.5),
                                 hovertemplate=name + ": %{y:.3g}<extra></extra>"))
    # decades only: plotly labels a short log range's minor ticks "7 6 5 4 3 2", which read as values
    fig.update_yaxes(type="log", title="gradient norm", dtick=1, exponentformat="power")
    fig.update_xaxes(title=x)
    return _layout(fig, title=title, height=380)


def bar_figure(labels, values, *, x_title: str, y_title: str, highlight=None, percent: bool = False,
               title: str | None = None) -> go.Figure:
    """Simple vertical bars; `highlight` (a boolean per bar) draws flagged bars in the warning colour."""
    highlight = np.zeros(len(values), dtype=bool) if highlight is None else np.asarray(highlight, dtype=bool)
    fig = go.Figure(go.Bar(x=[plotly_text(v) for v in labels], y=values,
                           marker_color=[WRONG if h else OKABE_ITO[0] for h in highlight],
                           hovertemplate="%{x}: %{y:" + (".1%" if percent else ".3g") + "}<extra></extra>"))
    fig.update_xaxes(title=x_title, type="category")
    # a share runs from 0 to 100%: autoscaling drew all-zero bars on an axis from -100% to 100%
    fig.update_yaxes(title=y_title, tickformat=".0%" if percent else None, range=[0, 1] if percent else None)
    return _layout(fig, title=title, height=320)


def recall_delta_figure(per_class: pd.DataFrame, unit: str = "class") -> go.Figure:
    """A comparison's recall of run (b) minus run (a) per class or label (`Comparison.per_class`), drops marked."""
    return bar_figure(per_class["name"], per_class["recall_delta"], x_title=unit, y_title="recall (b) − recall (a)",
                      highlight=per_class["recall_delta"].to_numpy() < 0)


def dead_units_figure(dead: pd.DataFrame) -> go.Figure:
    """Each ReLU layer's share of units never active (gradients/dead_units.parquet), a quarter or more marked."""
    return bar_figure(dead["layer"], dead["dead_fraction"], x_title="layer", y_title="dead units", percent=True,
                      highlight=dead["dead_fraction"].to_numpy() >= 0.25)


def feature_map_grid_figure(maps, channels, strength, *, columns: int = 6) -> go.Figure:
    """A grid of one sample's feature maps: `maps` (C, H, W) or (C, L) channels first, drawn for `channels` in that
    order (strongest first), each titled with its channel number and response. A line map (C, L) is a 1 × L strip.
    Each map has its own colour scale: a grid shows where each channel fires, not which fires most (the titles do)."""
    maps = np.asarray(maps, dtype=float)
    channels = [int(c) for c in channels]
    rows = max(1, int(np.ceil(len(channels) / columns)))
    fig = make_subplots(rows=rows, cols=columns, horizontal_spacing=0.01, vertical_spacing=0.06,
                        subplot_titles=[f"#{c} · {strength[c]:.3g}" for c in channels])
    for i, c in enumerate(channels):
        grid = maps[c] if maps[c].ndim == 2 else maps[c][None, :]
        hover = f"channel {c}<br>row %{{y}}, column %{{x}}<br>%{{z:.3g}}<extra></extra>"
        fig.add_trace(go.Heatmap(z=grid, colorscale="Viridis", showscale=False, hovertemplate=hover),
                      row=i // columns + 1, col=i % columns + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    fig.update_annotations(font_size=10)
    fig.update_layout(height=40 + 120 * rows, margin=dict(l=4, r=4, t=30, b=4))
    return fig


def unit_bars_figure(units, strength, *, y_title: str = "response") -> go.Figure:
    """The strongest units of a linear or token layer for one sample: one bar per unit, strongest first."""
    units = [int(u) for u in units]
    fig = go.Figure(go.Bar(x=[f"#{u}" for u in units], y=[float(strength[u]) for u in units],
                           marker_color=OKABE_ITO[0], hovertemplate="unit %{x}<br>%{y:.3g}<extra></extra>"))
    fig.update_xaxes(title="unit", type="category")
    fig.update_yaxes(title=y_title)
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=10, b=10))
    return fig


def attention_figure(weights, labels, *, title: str | None = None, colour_title: str = "attention") -> go.Figure:
    """A query × key attention (or rollout) matrix as a heat map: row i is how much token i draws on each token.
    `labels` name the tokens (words, or patch numbers); hover gives both tokens and the weight."""
    weights = np.asarray(weights, dtype=float)
    names = [f"{i}:{plotly_text(str(t))}" for i, t in enumerate(labels)]
    fig = go.Figure(go.Heatmap(z=weights, x=names, y=names, colorscale="Blues", zmin=0,
                               colorbar=dict(title=colour_title, thickness=12),
                               hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_xaxes(title="key (attended to)", type="category", tickangle=-60, showgrid=False)
    fig.update_yaxes(title="query (attending)", type="category", autorange="reversed", showgrid=False)
    side = int(min(640, max(320, 18 * len(names) + 120)))
    fig.update_layout(height=side, margin=dict(l=10, r=10, t=30 if title else 10, b=10),
                      title=dict(text=plotly_text(title), font_size=13) if title else None)
    return fig


# ---------------------------------------------------------------------------------------------------- data health
def robustness_figure(strengths, values, *, metric: str, unit: str, groups: dict | None = None,
                      title: str | None = None, adversarial: bool = False) -> go.Figure:
    """The metric against perturbation strength: the overall curve bold, and one thin line per group (a class, a
    slice, a split: name -> values at the same strengths)."""
    fig = go.Figure()
    colours = palette(max(1, len(groups or {})))
    for (name, curve), colour in zip((groups or {}).items(), colours):
        fig.add_trace(go.Scatter(x=list(strengths), y=list(curve), mode="lines+markers", name=plotly_text(name)[:60],
                                 line=dict(width=1.5, color=colour), marker=dict(size=5)))
    fig.add_trace(go.Scatter(x=list(strengths), y=list(values), mode="lines+markers", name="all samples",
                             line=dict(width=4, color="#000000"), marker=dict(size=8)))
    what = "attack step ε" if adversarial else "strength"
    return _layout(fig, title=title, xaxis_title=f"{what} ({plotly_text(unit)})", yaxis_title=plotly_text(metric),
                   legend=dict(font=dict(size=11)))


def latency_figure(batch_sizes, p50, p95, throughput) -> go.Figure:
    """Latency per batch (p50 and p95, ms) and throughput (samples/s) against batch size, on log axes."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    sizes = [int(b) for b in batch_sizes]
    fig.add_trace(go.Scatter(x=sizes, y=[1e3 * v for v in p50], name="latency p50 (ms)", mode="lines+markers",
                             line=dict(color=OKABE_ITO[0], width=3)), secondary_y=False)
    fig.add_trace(go.Scatter(x=sizes, y=[1e3 * v for v in p95], name="latency p95 (ms)", mode="lines+markers",
                             line=dict(color=OKABE_ITO[0], width=1.5, dash="dash")), secondary_y=False)
    fig.add_trace(go.Scatter(x=sizes, y=list(throughput), name="throughput (samples/s)", mode="lines+markers",
                             line=dict(color=OKABE_ITO[1], width=3)), secondary_y=True)
    fig.update_xaxes(type="log", title_text="batch size")
    fig.update_yaxes(type="log", title_text="ms per batch", secondary_y=False)
    fig.update_yaxes(type="log", title_text="samples per second", secondary_y=True)
    return _layout(fig)


def channel_stats_figure(channels: pd.DataFrame) -> go.Figure:
    """Each channel's mean with its standard deviation as an error bar, and its range as a faint bar."""
    names = [plotly_text(str(c)) for c in channels["channel"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=(channels["max"] - channels["min"]).tolist(), base=channels["min"].tolist(),
                         name="range (min to max)", marker_color="#dddddd"))
    fig.add_trace(go.Scatter(x=names, y=channels["mean"].tolist(), mode="markers", name="mean ± std",
                             marker=dict(size=10, color=OKABE_ITO[0]),
                             error_y=dict(type="data", array=channels["std"].tolist(), visible=True)))
    return _layout(fig, xaxis_title="channel", yaxis_title="value as the model receives it", height=320)
