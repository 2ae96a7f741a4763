"""The notebook entry point: `analyzers.show(run_or_model, data=None)` and `analyzers.serve(run)`.

`show` returns the run's report (`dashboard.report.Report`): in Jupyter or VS Code it displays as its panels, the
figures through plotly's own renderers, with no custom widget to break with the next Jupyter. `serve` starts the
dashboard on a free port in a background process, prints its address, and stops it with `.stop()`, on leaving a
`with` block, or when the kernel exits.

The report's figures are the dashboard's (`dashboard/figures.py`, plain plotly with no Streamlit), so this module
imports `dashboard.report` when called: the one place `analyzers` reaches into the dashboard, kept out of
`import analyzers`.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .errors import AnalyzerError

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "dashboard" / "serve.py"
START_TIMEOUT_S = 120.0


def _is_run(value) -> bool:
    from .loading.runs import RUN_INFO, Run

    return isinstance(value, Run) or (isinstance(value, (str, Path)) and (Path(value) / RUN_INFO).is_file())


def show(run_or_model, data=None, *, out: str | Path | None = None, compare=None, max_thumbnails: int = 200,
         allow_import: bool = False, **run_options):
    """The report of a run, shown inline in a notebook (its panels; `Report.to_html()` or `.write(path)` for the
    file). `run_or_model` is a run directory or an opened `Run`; or a model (`sample:NAME`, a model file, an
    `nn.Module` with `input_shape=`, or `analyzers.wrap_module(...)`) with `data` (a dataset spec, or an `(x, y)`
    pair of arrays), which is analysed first into `out` (default: a new temporary directory) with `run_options`
    (`run_analysis`'s keywords). `compare`, a second run on the same dataset, adds the deltas. `allow_import`
    rebuilds a state dict's import-path architecture (code you trust), as the command line does."""
    from dashboard.report import build_report

    if _is_run(run_or_model):
        if data is not None:
            raise AnalyzerError("show() was given a run and data: a run holds its own data; pass a model with data "
                                "to analyse it, or the run alone")
        return build_report(run_or_model, compare=compare, max_thumbnails=max_thumbnails, allow_import=allow_import)
    if data is None:
        raise AnalyzerError(f"{str(run_or_model)[:80]!r} is not a run directory (no run.json): pass a run, or a "
                            "model with data=, e.g. show('sample:digits', data='sample:digits')")
    from .engines.pipeline import run_analysis

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="analyzers-show-")) / "run"
    if isinstance(data, tuple):  # arrays in the notebook: stored beside the run as the .npz the loaders read
        import numpy as np

        if len(data) != 2:
            raise AnalyzerError(f"data is a tuple of {len(data)}: pass (x, y), or a dataset spec")
        path = out.parent / f"{out.name}-data.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=np.asarray(data[0]), y=np.asarray(data[1]))
        data = str(path)
    run_analysis(run_or_model, data, out, allow_import=allow_import, **run_options)
    return build_report(out, compare=compare, max_thumbnails=max_thumbnails, allow_import=allow_import)


def wait_until_answering(base_url: str, process: subprocess.Popen, timeout_s: float, *,
                         host: str | None = None) -> bool:
    """Poll a dashboard's health endpoint (`base_url`/_stcore/health, with `host` as the Host header: a launcher
    told its name refuses any other) until it answers 200 (True), or until `process` exits or `timeout_s` passes
    (False). The launcher's tests and benchmarks wait for it the same way."""
    request = urllib.request.Request(f"{base_url}/_stcore/health", headers={"Host": host} if host else {})
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """A dashboard started by `serve`, in its own process group (its sandboxed workers stop with it)."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and every process it started; safe to call twice."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        atexit.unregister(self.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Dashboard({self.url!r}, {'running' if self.running else 'stopped'})"

    def _repr_html_(self) -> str:
        import html

        url = html.escape(self.url, quote=True)
        return (f'<p>The dashboard is at <a href="{url}" target="_blank">{url}</a> '
                f'({"running" if self.running else "stopped"}; <code>.stop()</code> stops it).</p>')


def serve(run, *, port: int | None = None, timeout_s: float = START_TIMEOUT_S, quiet: bool = False) -> Dashboard:
    """Start the dashboard on `run` (a run directory or an opened `Run`) in the background, bound to 127.0.0.1 on
    `port` (default: a free one); returns once it answers, having printed its URL. The other runs beside it are
    listed too. `.stop()` stops it; so do leaving a `with` block and the end of the kernel."""
    from .loading.runs import Run, open_run

    path = Path(run.path if isinstance(run, Run) else run).resolve()
    open_run(path)  # a damaged or missing run is refused here, in one line, before anything starts
    port = port or _free_port()
    log = Path(tempfile.mkdtemp(prefix="analyzers-serve-")) / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, str(SERVE), "--port", str(port), "--runs-dir", str(path.parent),
                                    "--run", str(path)], cwd=log.parent, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                       p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
                                   start_new_session=True)  # its own group: stop() ends its workers too
    dashboard = Dashboard(process, f"http://127.0.0.1:{port}/overview?run={path.name}", log)
    atexit.register(dashboard.stop)
    if not wait_until_answering(f"http://127.0.0.1:{port}", process, timeout_s):
        dashboard.stop()
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise AnalyzerError(f"the dashboard did not start within {timeout_s:.0f} s ({tail[0][:200]}): see {log}")
    if not quiet:
        print(f"The dashboard is at {dashboard.url} (stop it with .stop())")
    return dashboard
