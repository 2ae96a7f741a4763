"""Figure builders: what each figure draws, checked against the numbers it was given."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyzers.evaluation.metrics import confusion, top_label_bins
from dashboard import figures


def _scatter(fig):
    return [t for t in fig.data if t.type in ("scatter", "scattergl")]


def test_confusion_has_one_clickable_marker_per_cell_carrying_the_cell():
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    conf = confusion(labels, pred, num_classes=4, class_names=["a", "b", "c", "d"])
    fig = figures.confusion_figure(conf.counts, conf.class_names)
    (cells,) = _scatter(fig)
    data = np.asarray(cells.customdata)
    assert len(cells.x) == 16 and data.shape == (16, 3)
    assert sorted(map(tuple, data[:, :2].tolist())) == [(t, p) for t in range(4) for p in range(4)]
    for t, p, count in data:
        assert count == ((labels == t) & (pred == p)).sum()  # each marker's count is its cell's
        assert cells.x[list(map(tuple, data[:, :2])).index((t, p))] == "abcd"[p]
    assert data[:, 2].sum() == 200
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    assert np.array_equal(np.asarray(heat.z), conf.counts)


def test_confusion_normalised_values_are_shown_but_customdata_keeps_counts():
    counts = np.array([[3, 1], [0, 4]])
    shares = counts / counts.sum(1, keepdims=True)
    fig = figures.confusion_figure(counts, ["x", "y"], values=shares, value_label="share")
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    assert np.allclose(np.asarray(heat.z), shares)
    assert np.asarray(_scatter(fig)[0].customdata)[:, 2].tolist() == [3, 1, 0, 4]


def test_reliability_figure_draws_its_curve_through_bins_with_enough_samples_and_labels_each_count():
    """Issue 18, item 7: a curve through bins of 1-3 samples dipped to 0.33 with no count in sight."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), 300)
    labels = rng.integers(0, 3, 300)
    bins = top_label_bins(labels, probs).to_dict()
    count = np.asarray(bins["count"])
    assert ((count > 0) & (count < figures.MIN_BIN_SAMPLES)).any()  # this draw has sparse bins at the top
    fig = figures.reliability_figure(bins)
    curve = [t for t in fig.data if t.name and t.name.startswith("model (")][0]
    full = count >= figures.MIN_BIN_SAMPLES
    assert np.allclose(curve.x, np.asarray(bins["mean_predicted"], dtype=float)[full])
    assert np.allclose(curve.y, np.asarray(bins["observed"], dtype=float)[full])
    assert list(curve.text) == [f"{c:,}" for c in count[full]]
    assert f"ECE {bins['ece']:.3f}" in curve.name
    (sparse,) = [t for t in fig.data if t.name == f"model: bins under {figures.MIN_BIN_SAMPLES} samples"]
    small = (count > 0) & ~full
    assert list(sparse.text) == [f"{c:,}" for c in count[small]] and sparse.mode == "markers+text"


def test_class_balance_counts():
    fig = figures.class_balance_figure([0, 0, 1, 2], [0, 1, 1, 1], ["a", "b", "c"])
    assert list(fig.data[0].y) == [2, 1, 1] and list(fig.data[1].y) == [1, 3, 0]


def test_signed_attributions_use_a_diverging_scale_centred_on_zero():
    image = np.random.default_rng(2).random((8, 8))
    attr = np.linspace(-2, 1, 64).reshape(8, 8)
    heat = [t for t in figures.image_attribution_figure(image, attr, signed=True).data if t.type == "heatmap"][0]
    assert heat.zmin == -2 and heat.zmax == 2 and heat.zmid == 0
    assert heat.colorscale[0][1] != heat.colorscale[-1][1]
    unsigned = figures.image_attribution_figure(image, np.abs(attr), signed=False).data[1]
    assert unsigned.zmin == 0
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    outlined = figures.image_attribution_figure(image, attr, signed=True, truth=mask)
    contour = [t for t in outlined.data if t.type == "contour"][0]
    assert np.array_equal(np.asarray(contour.z), mask.astype(float))


def test_sequence_and_feature_attributions():
    fig = figures.sequence_attribution_figure("ACGT", [0.1, -0.3, 0.0, 0.2], signed=True)
    assert np.asarray(fig.data[0].z).shape == (1, 4) and list(fig.data[0].text[0]) == list("ACGT")
    wrapped = figures.sequence_attribution_figure("ACGTA", [1, 2, 3, 4, 5], signed=False, width=2).data[0]
    z = np.asarray(wrapped.z, dtype=float)
    assert z.shape == (3, 2) and z[2, 0] == 5 and np.isnan(z[2, 1])  # rows of two positions, read left to right
    assert np.asarray(wrapped.customdata)[1].tolist() == [2, 3]
    marked = figures.sequence_attribution_figure("ACG", [1, 2, 3], signed=False, truth=[False, True, False])
    assert list(marked.data[0].text[0]) == ["A", "<b>C</b>", "G"]
    (frame,) = marked.layout.shapes
    assert (frame.x0, frame.x1) == (0.5, 1.5)  # around position 1 only
    bars = figures.feature_attribution_figure(["a", "b", "c"], [0.5, -2.0, 0.1], top=2).data[0]
    assert list(bars.y) == ["a", "b"] and list(bars.x) == [0.5, -2.0]  # the two largest by magnitude


def test_embedding_scatter_carries_ids_and_downsamples_big_tables():
    n = 50
    table = pd.DataFrame({"id": np.arange(100, 100 + n), "x": np.arange(n), "y": np.zeros(n),
                          "label": np.where(np.arange(n) % 2, "odd", "even")})
    fig = figures.embedding_figure(table, colour="label", categorical=True)
    assert all(t.type == "scattergl" for t in fig.data)
    drawn = np.concatenate([np.asarray(t.customdata) for t in fig.data])
    assert sorted(drawn.tolist()) == table["id"].tolist()
    for trace in fig.data:  # each point's id sits on its own coordinates
        assert np.array_equal(np.asarray(trace.customdata) - 100, np.asarray(trace.x))
    small = figures.embedding_figure(table, colour="x", categorical=False, max_points=20)
    (points,) = [t for t in small.data if t.type == "scattergl"]
    assert len(points.x) == 20 and "all 50 points, 20 of them drawn" in small.layout.title.text


def test_a_projection_too_large_to_draw_is_a_density_of_every_point():
    """issue 15: above max_points every point is counted (numpy's histogram2d, the reference), under a sample."""
    rng = np.random.default_rng(4)
    n = 5000
    x, y = np.r_[rng.normal(size=n - 500), rng.normal(8, 0.2, 500)], rng.normal(size=n)
    table = pd.DataFrame({"id": np.arange(n), "x": x, "y": y, "label": np.where(x > 4, "far", "near")})
    fig = figures.embedding_figure(table, colour="label", categorical=True, max_points=300)
    density, *points = fig.data
    assert density.type == "heatmap" and all(t.type == "scattergl" for t in points)
    counts, _, _ = np.histogram2d(x, y, bins=figures.DENSITY_BINS)
    np.testing.assert_array_equal(np.asarray(density.customdata), counts.T)
    assert np.asarray(density.customdata).sum() == n  # the 4,700 points not drawn are counted too
    z = np.asarray(density.z, dtype=float)
    assert np.isnan(z[counts.T == 0]).all() and (np.diff(np.sort(z[counts.T > 0])) >= 0).all()
    assert sum(len(t.x) for t in points) == 300
    whole = figures.embedding_figure(table.head(300), colour="label", categorical=True, max_points=300)
    assert all(t.type == "scattergl" for t in whole.data)  # small enough: points only, no density


@pytest.mark.parametrize("block", [figures.BIN_BLOCK, 997])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_density_of_float32_points_on_the_bin_edges_counts_as_histogram2d(dtype, block, monkeypatch):
    """A run's projection is float32, binned in its own type: points on and beside every edge (where the arithmetic
    lands a bin off) and a non-finite one (left out) are counted as numpy's histogram2d counts the finite ones
    (as float64, as the embedding figure had passed them), in one block or in many (997 points each)."""
    monkeypatch.setattr(figures, "BIN_BLOCK", block)
    rng = np.random.default_rng(5)
    low, high = -3.7, 11.2
    edges = np.linspace(low, high, figures.DENSITY_BINS + 1).astype(dtype)
    on_edges = np.r_[edges, np.nextafter(edges, np.inf, dtype=dtype), np.nextafter(edges, -np.inf, dtype=dtype)]
    x = np.clip(np.r_[on_edges, rng.uniform(low, high, 20000).astype(dtype)], low, high).astype(dtype)
    y = rng.permutation(x)
    x[7] = np.nan
    finite = np.isfinite(x) & np.isfinite(y)
    density = figures.density_trace(x, y)
    # a constant large value (the range widened by 0.5, which float32 cannot hold) is binned as histogram2d does
    constant = np.full(50, 1e8, dtype=dtype)
    flat = figures.density_trace(constant, y[:50].astype(dtype))
    reference, _, _ = np.histogram2d(constant.astype(np.float64), y[:50].astype(np.float64), bins=figures.DENSITY_BINS)
    np.testing.assert_array_equal(np.asarray(flat.customdata), reference.T)
    # the reference bins the points' float64 values (numpy would put float32 points on float32 edges)
    counts, _, _ = np.histogram2d(x[finite].astype(np.float64), y[finite].astype(np.float64),
                                  bins=figures.DENSITY_BINS)
    np.testing.assert_array_equal(np.asarray(density.customdata), counts.T)


def test_downsample_is_fixed_and_keeps_requested_rows():
    rows = figures.downsample_rows(1000, 100, keep=[999, 3])
    assert np.array_equal(rows, figures.downsample_rows(1000, 100, keep=[999, 3]))
    assert {3, 999} <= set(rows.tolist()) and len(rows) <= 102
    assert np.array_equal(figures.downsample_rows(5, 100), np.arange(5))


def test_grad_norm_lines_name_their_flags():
    table = pd.DataFrame({"batch": [0, 1], "conv": [1e-9, 2e-9], "fc": [0.1, 0.2]})
    fig = figures.grad_norm_figure(table, x="batch", flags={"conv": "vanishing"})
    names = [t.name for t in fig.data]
    assert names == ["conv ⚠ vanishing", "fc"]
    assert fig.layout.yaxis.type == "log"


def test_palette_is_colour_blind_safe_and_sized():
    assert figures.palette(3) == list(figures.OKABE_ITO[:3])
    assert len(set(figures.palette(11))) == 11


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 5)])
def test_display_image_undoes_normalisation(shape):
    rng = np.random.default_rng(3)
    raw = rng.random(shape).astype(np.float32)
    mean, std = [0.5] * shape[0], [0.25] * shape[0]
    shown = figures.to_display_image((raw - 0.5) / 0.25, mean=mean, std=std)
    expected = raw[0] if shape[0] == 1 else raw.transpose(1, 2, 0)
    assert np.allclose(shown, expected, atol=1e-6)


def test_layer_colours_are_distinct_and_log_axes_show_decades():
    """Issue 18, item 7: thirteen layers shared look-alike colours; log ticks read "7 6 5 4 3 2"."""
    for n in (3, 8, 12, 13, 40):
        assert len(set(figures.palette(n))) == n
    table = pd.DataFrame({"step": range(5), **{f"layer{i}": np.geomspace(1e-4, 1e-2, 5) for i in range(13)}})
    fig = figures.grad_norm_figure(table)
    assert len({t.line.color for t in fig.data}) == 13
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1


def test_a_threshold_curve_of_many_scores_is_drawn_through_a_bounded_number_of_its_own_points():
    from analyzers.evaluation.thresholds import threshold_curve

    rng = np.random.default_rng(0)
    n = 50_000
    logits = rng.normal(size=(n, 2))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    curve = threshold_curve(rng.integers(0, 2, n), probs, positive=1)
    fig = figures.threshold_curves_figure(curve, chosen=0.5, marks={})
    pr, roc = fig.data[0], fig.data[1]
    assert len(curve.thresholds) > 10 * figures.MAX_CURVE_POINTS and len(pr.x) <= figures.MAX_CURVE_POINTS
    finite = np.isfinite(curve.thresholds)
    recall, precision, fpr = curve.recall[finite], curve.precision[finite], curve.fpr[finite]
    assert (pr.x[0], pr.x[-1]) == (recall[0], recall[-1]) and (roc.x[0], roc.x[-1]) == (fpr[0], fpr[-1])
    drawn = {(x, y) for x, y in zip(recall, precision)}
    assert all((x, y) in drawn for x, y in zip(pr.x, pr.y))  # points of the curve, none made up


# Contrast against the white page (WCAG 2.1 relative luminance). WCAG asks 3:1 of graphics one needs to read content
# (1.4.11), which a sequential scale running light to dark cannot keep at its light end without giving up half its
# range; half that ratio, 1.5:1, keeps three quarters of Cividis and rules out what issue 17 saw: Cividis's pale
# yellow top, drawn at the points' opacity, is 1.2:1, the "near-white on white" of the most confident points.
LIGHT_END_CONTRAST = 1.5


def _contrast_with_white(colour: str, opacity: float = 1.0) -> float:
    from plotly.colors import hex_to_rgb, unlabel_rgb

    rgb = hex_to_rgb(colour) if colour.startswith("#") else unlabel_rgb(colour)
    drawn = [opacity * c + (1 - opacity) * 255 for c in rgb]  # a translucent mark over the white page

    def linear(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(drawn[0]) + 0.7152 * linear(drawn[1]) + 0.0722 * linear(drawn[2])
    return 1.05 / (luminance + 0.05)


def _scale_colours(colorscale, at) -> list:
    from plotly.colors import sample_colorscale

    return sample_colorscale([[float(p), c] for p, c in colorscale], list(at))


def test_points_coloured_by_a_number_stay_visible_on_white_at_both_ends():
    """issue 17: coloured by confidence, most points (confident ones, at the top of the scale) were near-white."""
    from plotly.colors import get_colorscale

    rng = np.random.default_rng(0)
    n = 2000
    table = pd.DataFrame({"id": np.arange(n), "x": rng.normal(size=n), "y": rng.normal(size=n),
                          "confidence": rng.beta(8, 1, n)})
    for max_points in (None, 500):  # all points drawn, and a sample over the density
        fig = figures.embedding_figure(table, colour="confidence", categorical=False, max_points=max_points)
        (points,) = _scatter(fig)
        colours = _scale_colours(points.marker.colorscale, np.linspace(0, 1, 41))
        contrasts = [_contrast_with_white(c, points.marker.opacity) for c in colours]
        assert min(contrasts) >= LIGHT_END_CONTRAST, (max_points, colours[int(np.argmin(contrasts))])
        assert _contrast_with_white(colours[0]) > 10 > 3 > _contrast_with_white(colours[-1])  # dark to light still
        old = [_contrast_with_white(c, points.marker.opacity)
               for c in _scale_colours(get_colorscale("Cividis"), np.linspace(0, 1, 41))]
        assert min(old) < LIGHT_END_CONTRAST  # the scale issue 17 saw fails this check


def test_the_density_leaves_empty_cells_clear_and_tints_a_cell_of_one_point():
    # a crowd of 100,000 points in one cell and one point far out: the log scale puts the lone point low on it
    x = y = np.r_[np.zeros(100_000), [9.0]]
    density = figures.density_trace(x, y)
    z, counts = np.asarray(density.z, dtype=float), np.asarray(density.customdata)
    assert np.isnan(z[counts == 0]).all() and density.hoverongaps is False  # empty cells: nothing drawn
    fraction = (z[counts > 0] - density.zmin) / (np.nanmax(z) - density.zmin)  # where each cell sits on the scale
    lightest = _scale_colours(density.colorscale, [fraction.min()])[0]
    assert fraction.min() < 0.3 and _contrast_with_white(lightest) >= LIGHT_END_CONTRAST
    greys = _scale_colours([[0, "rgb(255,255,255)"], [1, "rgb(0,0,0)"]], [fraction.min()])[0]
    assert _contrast_with_white(greys) < LIGHT_END_CONTRAST  # the white-based greys it had: a lone point vanished
