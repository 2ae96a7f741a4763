"""Shared fixtures: small models defined here (never loaded from the samples) and stored sample runs."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
# Many short dashboard sessions: a background warm-up in each would compete for the two cores (the tests that are
# about the warm-up turn it on)
os.environ.setdefault("DASHBOARD_WARM_UP", "0")
# Under `make test` the tests run in TEST_WORKERS processes (pytest-xdist): one torch thread each, so the workers share
# the cores rather than oversubscribe them; a single process (a test run by hand) takes two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


class TinyCNN(nn.Module):
    """A model defined only in the tests: conv -> relu -> pool -> linear, 3 classes on 1x8x8 inputs."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests, restored afterwards: small models on two cores shared with other
    work wait on each other with two threads (a log_softmax of 171 x 2 took 23 ms with two, 0.01 ms with one), and
    timings then measure the waiting, not the forward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    return rng.random((40, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 40)


def export_model(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="session")
def sample_run_dir(tmp_path_factory):
    """Complete runs of the sample models, made once per test session: sample_run_dir(name) -> Path."""
    from analyzers.engines.pipeline import run_analysis

    made = {}
    root = tmp_path_factory.mktemp("sample-runs")

    def _get(name: str) -> Path:
        if name not in made:
            made[name] = run_analysis(f"sample:{name}", f"sample:{name}", root / name)
        return made[name]

    return _get


def perturbed_digits_run(root: Path, *, scale: float) -> Path:
    """A run of the digits sample's model with its last layer perturbed (noise of std `scale`, seed 0) on the
    digits data, evaluation only: a second run to compare with the sample's."""
    from safetensors.torch import load_file, save_file

    from analyzers.engines.pipeline import run_analysis
    from sample_models import get_sample

    sample = get_sample("digits")
    model = sample.build_model()
    model.load_state_dict(load_file(str(sample.weights_path)))
    torch.manual_seed(0)
    with torch.no_grad():
        model.fc2.weight.add_(torch.randn_like(model.fc2.weight) * scale)
    weights = Path(root) / "perturbed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return run_analysis(str(weights), "sample:digits", Path(root) / "b", arch="digits", analyses=["evaluation"])


def mapped_rss_kib(path) -> int:
    """The resident KiB of this process's memory maps of the file `path` (Linux's /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and head and head[0] == "Rss:":
                total += int(head[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_dashboard(args: list[str], *, cwd: Path, timeout_s: float = 90, port: int | None = None,
                       prefix_argv: list[str] | None = None, env: dict | None = None, with_process: bool = False):
    """The dashboard's launcher (dashboard/serve.py) started from `cwd` with `args` on `port` (a free one if None);
    yields its port once it answers its health check, and stops it afterwards.

    `prefix_argv` goes before the Python command (e.g. `["prlimit", "--as=N:", "--"]`: a wrapper that execs it, so
    the process keeps its id); `env` adds to the environment; with `with_process` it yields `(port, Popen)`."""
    port = port or free_port()
    log = Path(cwd) / "server.log"
    command = [*(prefix_argv or []), sys.executable, str(ROOT / "dashboard" / "serve.py"), "--port", str(port), *args]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        from analyzers.notebook import wait_until_answering

        if not wait_until_answering(f"http://127.0.0.1:{port}", server, timeout_s):
            pytest.fail(f"the dashboard did not start:\n{log.read_text()[-3000:]}")
        yield (port, server) if with_process else port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


# --- the browser of the end-to-end tests ----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright's own browser download cannot work offline
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    """Skip the calling test module without Chromium, except in CI (CI=true), where that is a failure: `make
    browser` installs it."""
    if not Path(CHROMIUM).exists() and os.environ.get("CI") != "true":
        pytest.skip(f"{CHROMIUM} is missing (install it with `make browser`); the browser test runs in CI",
                    allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright, one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
