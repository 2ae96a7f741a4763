"""What is on screen lives in the URL, so a link shows a colleague the same view.

The page is the URL path (`/confusion`, `/explain`, ...); the run, the selected sample and the selection are query
parameters `run`, `sample` and `sel` (see `dashboard.selection` for the `sel` strings). Session state holds the same
values: Streamlit drops query parameters when the page changes, so they are written back on every rerun.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from .selection import Selection, decode_selection

KEYS = ("run", "sample", "sel")
_PREFIX = "url_"
_LOADED = "url_loaded"


def load_from_url() -> None:
    """Take the values the URL holds: on a session's first run, and after a link that carries them (the session's
    own values are always mirrored into the URL, so a value there that differs came from outside). A value missing
    from the URL was dropped by a page change, so the session's value stays."""
    for key in KEYS:
        if key in st.query_params:
            st.session_state[_PREFIX + key] = st.query_params[key]
    st.session_state[_LOADED] = True


def write_to_url() -> None:
    """Mirror the session's values into the query string (kept through page changes)."""
    for key in KEYS:
        value = st.session_state.get(_PREFIX + key)
        if key == "sel" and value and not (decode_selection(value) or Selection("ids", [])).fits_url():
            value = None  # too long for a link: kept in the session only
        if value in (None, ""):
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != value:
            st.query_params[key] = value


def get(key: str) -> str | None:
    return st.session_state.get(_PREFIX + key)


def put(key: str, value) -> None:
    value = None if value is None else str(value)
    st.session_state[_PREFIX + key] = value
    if value is None:
        if key in st.query_params:
            del st.query_params[key]
    else:
        st.query_params[key] = value


def selection() -> Selection | None:
    return decode_selection(get("sel"))


def set_selection(sel: Selection | None, ids: list | None = None) -> None:
    """Keep `sel` (and the ids it stands for, the gallery that previous / next walk through)."""
    if sel is None:
        put("sel", None)
        st.session_state.pop("gallery_ids", None)
        return
    st.session_state["url_sel"] = sel.encode()
    if sel.fits_url():
        st.query_params["sel"] = sel.encode()
    elif "sel" in st.query_params:
        del st.query_params["sel"]
    if ids is not None:
        set_gallery(ids)


def gallery_ids() -> np.ndarray:
    """The ids the Explain page's previous / next walk through: an array, empty when there is none."""
    ids = st.session_state.get("gallery_ids")
    return np.asarray([] if ids is None else ids)


def set_gallery(ids) -> None:
    # kept as one array: a 10M-row run's slice has millions of ids, a list of them millions of objects. A short
    # list of ids of mixed types stays as it is given (numpy would make text of every id, or floats of big ones).
    if not isinstance(ids, np.ndarray):
        ids = list(ids)
        plain = np.asarray(ids)
        ids = plain if plain.dtype.kind in "iu" or all(isinstance(i, str) for i in ids) else np.array(ids, dtype=object)
    st.session_state["gallery_ids"] = ids
