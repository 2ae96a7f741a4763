"""Entry point: `streamlit run dashboard/app.py -- --runs-dir runs --run runs/sample-digits`.

Pages live in `dashboard/views/` (not `pages/`, which Streamlit would also serve as pages of its own); the page is the URL path and the run, sample and selection are query parameters.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import access, components, data, state  # noqa: E402
from dashboard.text import md  # noqa: E402

LOG = logging.getLogger("dashboard")
PAGES = (
    # (name, file, title, icon)
    ("load", "views/load.py", "Load", ":material/upload_file:"),
    ("overview", "views/overview.py", "Overview", ":material/dashboard:"),
    ("confusion", "views/confusion.py", "Confusion matrix", ":material/grid_on:"),
    ("errors", "views/errors.py", "Errors & slices", ":material/troubleshoot:"),
    ("explain", "views/explain.py", "Explain a sample", ":material/visibility:"),
    ("embeddings", "views/embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("network", "views/network.py", "Inside the network", ":material/hub:"),
    ("training", "views/training.py", "Training & gradients", ":material/show_chart:"),
    ("health", "views/health.py", "Data health", ":material/health_and_safety:"),
    ("compare", "views/compare.py", "Compare runs", ":material/compare_arrows:"),
)

# an emoji icon is drawn locally; a :material/...: page icon is fetched from fonts.gstatic.com on every load
st.set_page_config(page_title="Model debugger", page_icon="🐞", layout="wide")
state.load_from_url()
access.require_sign_in()  # with sign-in on, nothing below runs for a person who is not signed in

pages = {}
for name, file, title, icon in PAGES:
    pages[name] = st.Page(str(Path(__file__).parent / file), title=title, icon=icon, url_path=name)
components.PAGES.clear()
components.PAGES.update(pages)

# Streamlit serves its default page at "/" only, so a default Overview made /overview?run=... a "Page not found":
# the default is a hidden second page of the Overview's file, and the Overview keeps its own path like every other
home = st.Page(str(Path(__file__).parent / "views/overview.py"), title="Overview", url_path="home", default=True,
               visibility="hidden")
navigation = st.navigation({"": [home], "Data": [pages["load"]],
                            "Analysis": [pages[n] for n in ("overview", "confusion", "errors", "explain",
                                                             "embeddings", "network", "training", "health",
                                                             "compare")]})
state.write_to_url()

def _run_changed() -> None:
    state.put("run", st.session_state["sidebar-run"])
    state.put("sample", None)
    state.set_selection(None)


with st.sidebar:
    access.sign_out_control()
    runs = data.known_runs()
    if runs:
        names = list(runs)
        current = state.get("run")
        default = data.settings().run
        if current not in runs:
            if current:
                st.warning(f"There is no run called {md(repr(current))} in {md(data.settings().runs_dir)}: showing "
                           f"another one.")
            current = default.name if default is not None and default.name in runs else names[0]
            state.put("run", current)
        st.session_state["sidebar-run"] = current  # follows the URL and the Load page
        damaged = {name for name in names if data.run_status(runs[name])[1] is not None}
        st.selectbox("Run", names, key="sidebar-run", on_change=_run_changed,
                     format_func=lambda name: f"{name} (damaged)" if name in damaged else name,
                     help="Runs stored under the runs directory; manage them on the Load page.")
    else:
        st.caption("No runs yet: create one on the Load page.")

data.page_started()
try:
    navigation.run()
except Exception as exc:  # the last line of defence: one readable line, never Streamlit's redacted traceback page
    LOG.exception("the %s page failed", navigation.url_path or "default")
    st.error(f"This page failed: {md(data.error_message(exc))}. Other pages and runs are not affected; the details "
             f"are in the server's log.")
finally:  # also after st.stop() and a rerun
    data.page_drawn()
