"""Plotly selection events -> samples, and the compact selection strings kept in the URL. No Streamlit here.

`st.plotly_chart(..., on_select="rerun")` returns `{"selection": {"points": [...], "box": [...], "lasso": [...]}}`;
point indices count within each trace, so every figure that can be selected carries sample ids (or the confusion cell)
in `customdata`, and these functions read only that. A selection is kept as a short string, `kind:value`:
`cell:TRUE-PRED`, `slice:INDEX`, `rank:NAME`, `ids:ID,ID,...` (box / lasso / table picks), so a link reproduces it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("cell", "slice", "rank", "ids", "suspects", "pair")  # pair: two labels missed together (multi-label)
MAX_URL_IDS = 500  # a selection of more ids stays in the session but is not written into the link


def _get(obj, key, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, key, default)


def event_points(event) -> list:
    """The selected points of a plotly selection event (empty for no event or an empty selection)."""
    points = _get(_get(event, "selection"), "points") or []
    return list(points)


def customdata_values(value) -> list | None:
    """A point's customdata as a list. Streamlit hands back a row of a 2-D customdata array as a dict keyed by
    position ({"0": 3, "1": 5}, checked in Chromium with streamlit 1.67), a 1-D entry as a scalar."""
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            return [value[k] for k in sorted(value, key=int)]
        except (TypeError, ValueError):
            return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _first(value):
    values = customdata_values(value)
    return values[0] if values else None


def selected_ids(event) -> list:
    """Sample ids of the selected points, in selection order without repeats (first customdata entry per point)."""
    seen, out = set(), []
    for point in event_points(event):
        value = _first(_get(point, "customdata"))
        if value is None:
            continue
        key = str(value)
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def selected_cell(event) -> tuple[int, int] | None:
    """(true class, predicted class) of the clicked confusion-matrix marker, whose customdata is (true, pred, ...)."""
    for point in event_points(event):
        data = customdata_values(_get(point, "customdata"))
        if data is not None and len(data) >= 2:
            try:
                return int(data[0]), int(data[1])
            except (TypeError, ValueError):
                continue
    return None


@dataclass(frozen=True)
class Selection:
    kind: str
    value: object  # (true, pred) for cell, (label, label) for pair, int for slice, str for rank, list of id strings for ids

    def encode(self) -> str:
        if self.kind in ("cell", "pair"):
            return f"{self.kind}:{self.value[0]}-{self.value[1]}"
        if self.kind == "ids":
            return "ids:" + ",".join(str(v) for v in self.value)
        return f"{self.kind}:{self.value}"

    def fits_url(self) -> bool:
        return self.kind != "ids" or len(self.value) <= MAX_URL_IDS


def decode_selection(text: str | None) -> Selection | None:
    """The Selection a URL string describes, or None for an empty or malformed one (a hand-edited link)."""
    if not text or ":" not in text:
        return None
    kind, _, value = text.partition(":")
    try:
        if kind in ("cell", "pair"):
            first, second = value.split("-")
            return Selection(kind, (int(first), int(second)))
        if kind == "slice":
            return Selection("slice", int(value))
        if kind in ("rank", "suspects"):
            return Selection(kind, value) if value else None
        if kind == "ids":
            ids = [v for v in value.split(",") if v]
            return Selection("ids", ids) if ids else None
    except ValueError:
        return None
    return None


def id_positions(all_ids, wanted) -> np.ndarray:
    """Row positions in `all_ids` of the ids in `wanted`, in the order of `wanted`; ids are compared as strings
    (a URL or a browser hands them back as text or JSON numbers). Unknown ids are dropped. `all_ids` is an array
    of ids (`analyzers.loading.sample_table.positions_of`) or a run's samples table (`dashboard.data.id_index`),
    which finds them without an index of every id."""
    if hasattr(all_ids, "positions"):
        return all_ids.positions(wanted)
    from analyzers.loading.sample_table import positions_of

    return positions_of(np.asarray(all_ids), list(wanted))


def ids_in_box(coords: np.ndarray, box: dict) -> np.ndarray:
    """Boolean mask of the rows of (N, 2) `coords` inside a plotly selection box {"x": [x0, x1], "y": [y0, y1]}."""
    xs, ys = sorted(map(float, _get(box, "x"))), sorted(map(float, _get(box, "y")))
    return ((coords[:, 0] >= xs[0]) & (coords[:, 0] <= xs[1]) & (coords[:, 1] >= ys[0]) & (coords[:, 1] <= ys[1]))


def ids_in_lasso(coords: np.ndarray, lasso: dict) -> np.ndarray:
    """Boolean mask of the rows of (N, 2) `coords` inside a plotly lasso polygon {"x": [...], "y": [...]}."""
    from matplotlib.path import Path

    polygon = np.column_stack([np.asarray(_get(lasso, "x"), float), np.asarray(_get(lasso, "y"), float)])
    if len(polygon) < 3:
        return np.zeros(len(coords), dtype=bool)
    return Path(polygon).contains_points(coords)


def region_mask(event, coords) -> np.ndarray | None:
    """Rows of the full (N, 2) `coords` inside the event's boxes and lassos, or None if it has no region. `coords`
    may be a function that makes them, called only when there is a region (10M points are 80 MB per rerun).

    A big scatter is drawn downsampled, so its selected *points* miss the hidden ones; the region selects them all.
    """
    selection = _get(event, "selection")
    boxes, lassos = _get(selection, "box") or [], _get(selection, "lasso") or []
    if not boxes and not lassos:
        return None
    coords = coords() if callable(coords) else coords
    mask = np.zeros(len(coords), dtype=bool)
    for box in boxes:
        mask |= ids_in_box(coords, box)
    for lasso in lassos:
        mask |= ids_in_lasso(coords, lasso)
    return mask


def gallery_place(ids, current) -> int | None:
    """Where `current` first stands in the gallery `ids` (compared as text, as ids come back from a URL), or None.
    A gallery of integer ids is searched as numbers: a 10M-row run's slice holds millions."""
    from analyzers.loading.sample_table import integer_ids

    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        number = integer_ids([current], ids.dtype)  # empty where the text names no integer of the ids' type
        at = np.flatnonzero(ids == number[0]) if len(number) else []
    else:
        at = np.flatnonzero(np.asarray([str(i) for i in ids], dtype=object) == str(current))
    return int(at[0]) if len(at) else None


def neighbours(ids, current) -> tuple:
    """(previous id, next id) of `current` in the gallery `ids` (None at either end or when it is not there)."""
    i = gallery_place(ids, current)
    if i is None:
        return None, None
    ids = np.asarray(ids)

    def plain(value):  # a Python value, as a list of ids gave
        return value.item() if isinstance(value, np.generic) else value

    return (plain(ids[i - 1]) if i > 0 else None), (plain(ids[i + 1]) if i + 1 < len(ids) else None)
