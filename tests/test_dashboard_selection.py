"""Plotly selection events -> samples: the pure functions behind every click in the dashboard."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard.selection import (MAX_URL_IDS, Selection, customdata_values, decode_selection, gallery_place,
                                 id_positions, ids_in_box, ids_in_lasso, neighbours, region_mask, selected_cell,
                                 selected_ids)


def _event(points=(), box=(), lasso=()):
    return {"selection": {"points": list(points), "point_indices": [], "box": list(box), "lasso": list(lasso)}}


def test_cell_from_a_click_as_streamlit_sends_it():
    # a row of a 2-D customdata array comes back keyed by position (seen in Chromium with streamlit 1.67)
    event = _event([{"curve_number": 1, "point_index": 81, "customdata": {"0": 8, "1": 1, "2": 2}}])
    assert selected_cell(event) == (8, 1)
    assert selected_cell(_event([{"customdata": [3, 5, 10]}])) == (3, 5)


def test_no_selection_gives_nothing():
    for event in (None, {}, _event(), {"selection": {"points": []}}):
        assert selected_cell(event) is None
        assert selected_ids(event) == []
        assert region_mask(event, np.zeros((3, 2))) is None
        assert region_mask(event, lambda: pytest.fail("no region: the points are not made")) is None


def test_ids_from_points_keep_order_and_drop_repeats():
    event = _event([{"customdata": 7}, {"customdata": "a-1"}, {"customdata": 7}, {"customdata": None},
                    {"customdata": {"0": 12}}])
    assert selected_ids(event) == [7, "a-1", 12]


def test_customdata_values_orders_numeric_keys():
    assert customdata_values({"10": "k", "2": "c", "0": "a"}) == ["a", "c", "k"]
    assert customdata_values(5) == [5]
    assert customdata_values(None) is None


def test_box_and_lasso_select_by_region_on_every_point():
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 0.5]])
    box = {"x": [1.5, -0.5], "y": [-1, 1.5]}  # corners in any order
    assert ids_in_box(coords, box).tolist() == [True, True, False, False]
    triangle = {"x": [-1, 3, -1], "y": [-1, 3, 3]}  # the half-plane y > x, roughly
    inside = ids_in_lasso(coords + np.array([0, 0.1]), triangle)
    assert inside.tolist() == [True, True, True, False]
    event = _event(box=[box], lasso=[{"x": [4, 6, 6, 4], "y": [0, 0, 1, 1]}])
    assert region_mask(event, coords).tolist() == region_mask(event, lambda: coords).tolist() == [True, True, False,
                                                                                                 True]


def test_selection_strings_round_trip():
    for sel in (Selection("cell", (3, 8)), Selection("slice", 2), Selection("rank", "loss"),
                Selection("ids", ["a", "17"]), Selection("suspects", "top")):
        assert decode_selection(sel.encode()) == sel


@pytest.mark.parametrize("text", [None, "", "cell", "cell:x-y", "slice:one", "ids:", "rank:", "other:3", "cell:1"])
def test_malformed_selection_strings_are_ignored(text):
    assert decode_selection(text) is None


def test_long_id_selection_stays_out_of_the_link():
    assert not Selection("ids", [str(i) for i in range(MAX_URL_IDS + 1)]).fits_url()
    assert Selection("ids", ["1", "2"]).fits_url()


def test_id_positions_match_ids_as_text():
    ids = np.array([10, 11, 12, 13])
    assert id_positions(ids, ["12", 10, "99"]).tolist() == [2, 0]
    assert id_positions(np.array(["a", "b"]), ["b"]).tolist() == [1]


def test_neighbours_walk_the_gallery():
    gallery = [5, 9, 2]
    assert neighbours(gallery, 5) == (None, 9)
    assert neighbours(gallery, "9") == (5, 2)
    assert neighbours(gallery, 2) == (9, None)
    assert neighbours(gallery, 4) == (None, None)
    # an array of integer ids (a 10M-row run's slice) is walked as numbers; text that names no integer finds none
    big = np.arange(10**6)[::-1].copy()
    assert neighbours(big, "999998") == (999999, 999997) and neighbours(big, 0) == (1, None)
    assert neighbours(big, "007") == (None, None) and neighbours(big, "-0") == (None, None)
    assert neighbours(np.array(["a", "b", "c"], dtype=object), "b") == ("a", "c")
    assert gallery_place(big, 999999) == 0 and gallery_place(np.array([], dtype=np.int64), 1) is None


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40, unique=True), st.data())
def test_points_select_exactly_the_clicked_ids(ids, draw):
    picked = draw.draw(st.lists(st.sampled_from(ids), unique=True))
    event = _event([{"customdata": i} for i in picked])
    assert selected_ids(event) == picked
    rows = id_positions(np.array(ids), [str(i) for i in selected_ids(event)])
    assert np.array(ids)[rows].tolist() == picked


def test_a_gallery_is_kept_as_one_array_of_the_ids_given():
    """Session state holds a gallery as one array (a 10M-row run's slice: millions of ids); a short list of mixed
    or very large ids keeps its values, and previous / next walk it as given."""
    from dashboard import state

    state.set_gallery(np.arange(5) * 2)
    assert state.gallery_ids().dtype.kind == "i" and neighbours(state.gallery_ids(), "4") == (2, 6)
    state.set_gallery([5, "a", 2**63])
    kept = state.gallery_ids()
    assert kept.tolist() == [5, "a", 2**63] and neighbours(kept, "a") == (5, 2**63)
    state.set_gallery(["x", "y"])
    assert state.gallery_ids().tolist() == ["x", "y"]


def test_the_warm_up_waits_for_a_quiet_moment_between_pages():
    """The explanations' warm-up starts once no page is being drawn and none has been for WARM_UP_QUIET_S (pages
    opened one after another had waited on it), and after WARM_UP_QUIET_LIMIT_S at the latest."""
    import threading
    import time

    from dashboard import data

    data.page_started()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: data.wait_for_quiet(5.0) and done.set())
    waiter.start()
    try:
        time.sleep(0.4)
        assert not done.is_set()  # a page is being drawn
    finally:  # the count is the process's: a failed assert must not leave a page drawing forever
        drawn_at = time.monotonic()
        data.page_drawn()
    waiter.join(3.0)
    assert done.is_set() and time.monotonic() - drawn_at >= data.WARM_UP_QUIET_S * 0.95
    data.page_started()  # a page that never ends: the limit lets the warm-up start
    try:
        started = time.monotonic()
        assert data.wait_for_quiet(0.3) is False and time.monotonic() - started < 1.0
    finally:
        data.page_drawn()


@pytest.mark.parametrize("modality", ["image", "tabular"])
def test_the_warm_up_loads_the_inputs_a_gallery_shows_before_the_pages_tables(monkeypatch, modality):
    """A run whose galleries show its inputs (images, sequences, tokens) has them loaded first, before the pages'
    tables, then the rest once it is quiet: a 1M-row run's Errors page, opened 2 s after the dashboard started, had
    waited 2.35 s behind the tables for torch's import. A table's galleries show its stored rows: no inputs."""
    from types import SimpleNamespace

    from dashboard import data

    calls = []
    for name, label in (("_inputs", "inputs"), ("_warm_pages", "pages"), ("wait_for_quiet", "quiet"),
                        ("_warm_projection", "projection"), ("_warm_explanations", "explanations")):
        monkeypatch.setattr(data, name, lambda *a, label=label, **k: calls.append(label))
    data._warm("key", SimpleNamespace(info={"dataset": {"modality": modality}}), False)
    rest = ["pages", "quiet", "projection", "explanations"]
    assert calls == (["inputs"] if modality != "tabular" else []) + rest
