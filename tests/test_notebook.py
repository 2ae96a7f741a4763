"""The shipped notebook (examples/notebook.ipynb) executed by nbclient on a real kernel, as Jupyter runs it: its
report shows inline through plotly's own renderer (plotly's JSON MIME output, no custom widget), the report file is
written, and the dashboard that `analyzers.serve` starts answers and then stops."""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    # a copy of the repository's code beside a copy of the notebook: the run and its report go under that copy's
    # runs/, not the checkout's
    root = tmp_path_factory.mktemp("notebook") / "repo"
    for name in ("analyzers", "dashboard", "sample_models"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "examples").mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "examples")}}).execute()
    return notebook, root


def _outputs(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")]


def test_the_notebook_runs_and_shows_the_report_inline(executed):
    notebook, root = executed
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    report_cell = next(c for c in notebook.cells if c.cell_type == "code" and "analyzers.show(" in c.source)
    shown = _outputs(report_cell)
    figures = [o for o in shown if PLOTLY_MIME in o["data"]]
    texts = "".join(o["data"].get("text/html", "") for o in shown)
    # every section's title, and figures as plotly's own JSON output (the confusion matrix among them)
    for title in ("Provenance", "Headline metrics", "Top findings", "Confusion matrix", "Calibration",
                  "Gradient health", "Training curves"):
        assert f"<h3>{title}</h3>" in texts, title
    assert len(figures) >= 5
    assert any(t.get("type") == "heatmap" for f in figures for t in f["data"][PLOTLY_MIME]["data"])
    assert "data:image/png;base64," in texts  # the slices' worst samples as thumbnails
    run = root / "runs" / "notebook-digits"
    assert json.loads((run / "run.json").read_text())["num_samples"] == 450
    assert (root / "runs" / "notebook-digits-report.html").stat().st_size > 1e6


def test_serve_started_the_dashboard_and_stop_stopped_it(executed):
    notebook, _ = executed
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    started = next(c for c in cells if "analyzers.serve(" in c.source)
    stopped = next(c for c in cells if ".stop()" in c.source)
    printed = "".join(o.get("text", "") for o in started["outputs"] if o.get("output_type") == "stream")
    assert "The dashboard is at http://127.0.0.1:" in printed
    url = printed.split("The dashboard is at ")[1].split()[0]
    assert "running" in _outputs(started)[0]["data"]["text/html"]
    assert "stopped" in _outputs(stopped)[0]["data"]["text/html"]
    with pytest.raises(OSError):  # nothing answers there any more
        urllib.request.urlopen(url.split("/overview")[0] + "/_stcore/health", timeout=3)


def test_serve_answers_in_the_test_process_and_stops_with_its_block(sample_run_dir):
    import analyzers

    with analyzers.serve(sample_run_dir("digits"), quiet=True) as dashboard:
        base = dashboard.url.split("/overview")[0]
        with urllib.request.urlopen(base + "/_stcore/health", timeout=5) as response:
            assert response.status == 200
        pid = dashboard.process.pid
    assert not dashboard.running and dashboard.process.pid == pid
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/_stcore/health", timeout=3)


def test_show_refuses_what_it_cannot_show(tmp_path):
    import analyzers
    from analyzers.errors import AnalyzerError

    with pytest.raises(AnalyzerError, match="not a run directory"):
        analyzers.show(tmp_path)
    with pytest.raises(AnalyzerError, match="tuple of 3"):
        analyzers.show("sample:digits", data=(1, 2, 3), out=tmp_path / "run")
