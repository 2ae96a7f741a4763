"""Hostile uploads against the live server under a memory limit (issue 19): they cannot take it down.

The launcher (`dashboard/serve.py`) runs under `prlimit --as` on 127.0.0.1, and Playwright uploads through the Load
page, as a person would: a real `.pt2` with an 8 GiB deflate bomb, a `.pt2` whose weight declares 8 GiB with a normal
`.npz`, and a real `.pt2` with an `.npz` whose header declares 4 TiB. Each must end in exactly one st.error that names
the refusal, on one line; meanwhile `/_stcore/health` is polled every 100 ms and must always answer 200 within 1 s;
afterwards a fresh browser context still renders the confusion matrix and the server process is alive. Had the server
allocated what any of these declares, the limit would have turned it into a MemoryError (a traceback, a dead server or
a different message), and the test would fail.

In CI (CI=true) a missing Chromium is a failure, not a skip: `make browser` installs it.
"""
from __future__ import annotations

import contextlib
import shutil
import struct
import threading
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import pytest

from conftest import require_chromium

pytestmark = pytest.mark.e2e

require_chromium()

# The dashboard's own address space, measured on a 2-core machine (torch 2.13, streamlit 1.67): ~2.9 GiB once the
# Load page has run an upload, 3.2 GiB after the Explain page too (torch, its OpenMP threads' stacks and glibc's
# per-thread malloc arenas reserve far more than they touch). Under 3 GiB the Explain page failed to map a shared
# library. 5 GiB leaves ~1.8 GiB for machines with more cores (more threads, more arenas) and stays below the 8 GiB
# that the bomb and the crafted weight declare: a server that allocated either would get a MemoryError.
# Only the soft limit is set ("N:"): the sandboxed worker's own `prlimit --as` (8 GiB, analyzers.loading.sandbox) may
# then raise its soft limit up to the unlimited hard one, which a non-root user could not do above a hard limit.
ADDRESS_SPACE_LIMIT = 5 << 30
HEALTH_INTERVAL_S = 0.1
HEALTH_LATENCY_LIMIT_S = 1.0


# --------------------------------------------------------------------------------------------------------------------
# The hostile files.

def _zip64(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> Path:
    """A zip whose members are `(name, method, stored bytes, crc32, uncompressed size)`, every size in a zip64 extra
    field: written by hand because zipfile would have to deflate all 8 GiB itself (about a minute on 2 cores)."""
    local, central = bytearray(), bytearray()
    dos_date = 0x21  # 1980-01-01, the zip epoch; time 00:00
    for name, method, payload, crc, size in members:
        raw = name.encode()
        extra = struct.pack("<HHQQ", 0x0001, 16, size, len(payload))
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, dos_date, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                             len(raw), len(extra)) + raw + extra + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, dos_date, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(raw), len(extra), 0, 0, 0, 0, offset) + raw + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def deflated_npy(header: bytes, zeros: int) -> tuple[bytes, int, int]:
    """A raw deflate stream of `header` then `zeros` zero bytes, with its CRC-32 and inflated size.

    After a full flush zlib starts afresh, so every further MiB of zeros compresses to the very same bytes: the stream
    is one block repeated, built in a moment however much it inflates to; only the CRC needs every byte (~0.5 s/GiB)."""
    chunk = 1 << 20
    total = len(header) + zeros
    assert total >= chunk
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = header + bytes(chunk - len(header))
    head = compressor.compress(first) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH) == block  # the property relied on
    repeats, rest = divmod(total - chunk, chunk)
    stream = head + block * repeats + compressor.compress(bytes(rest)) + compressor.flush()
    crc, buffer, left = zlib.crc32(first), bytes(64 * chunk), total - chunk
    while left:
        step = min(left, len(buffer))
        crc = zlib.crc32(buffer if step == len(buffer) else buffer[:step], crc)
        left -= step
    return stream, crc, total


def deflate_bomb_8_gib(path: Path) -> Path:
    """x.npy declares 2^31 float32 (8 GiB) and its stream really inflates to all of them; y.npy, 2^25 int64 labels,
    one per row, likewise: a complete dataset, 8 MB on disk."""
    from test_hostile_data import npy_header

    rows = 1 << 25
    x = deflated_npy(npy_header((rows, 64)), rows * 64 * 4)
    y = deflated_npy(npy_header((rows,), "<i8"), rows * 8)
    return _zip64(path, [("x.npy", zipfile.ZIP_DEFLATED, *x), ("y.npy", zipfile.ZIP_DEFLATED, *y)])


def header_declaring_4_tib(path: Path) -> Path:
    """`x.npy`'s header declares 2^40 float32 (4 TiB) and holds nothing after it (as test_hostile_data builds it)."""
    import numpy as np

    from test_hostile_data import npy_header, npz_with_members

    labels = np.zeros(4, np.int64)
    return npz_with_members(path, {"x.npy": (npy_header((1 << 30, 1024)), b"", 0),
                                   "y.npy": (npy_header(labels.shape, "<i8"), labels.tobytes(), 0)}, deflate=False)


def weight_declaring_8_gib(base: bytes, path: Path) -> Path:
    """A real export whose first weight's metadata declares 2^31 float32 (8 GiB); its stored bytes stay 144."""
    from crafted_archives import edit_json

    def declare(config):
        entry = next(iter(config["config"].values()))
        entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 31}]
        entry["tensor_meta"]["strides"] = [{"as_int": 1}]

    path.write_bytes(edit_json(base, "data/weights/model_weights_config.json", declare))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import numpy as np
    import torch

    from conftest import TinyCNN, export_model

    root = tmp_path_factory.mktemp("hostile-uploads")
    torch.manual_seed(0)
    model = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), root / "model.pt2")
    data = root / "data.npz"
    np.savez(data, x=np.zeros((8, 1, 8, 8), np.float32), y=np.zeros(8, np.int64))
    return {"model": model, "data": data, "bomb": deflate_bomb_8_gib(root / "bomb.npz"),
            "huge": header_declaring_4_tib(root / "huge.npz"),
            "heavy": weight_declaring_8_gib(model.read_bytes(), root / "heavy.pt2")}


# (model file, data file, what the one error must say)
CASES = {
    "8 GiB deflate bomb": ("model", "bomb", ("'bomb.npz' declares 8,589,934,592 bytes", "refused before reading")),
    "weight declaring 8 GiB": ("heavy", "data", ("'heavy.pt2' is refused: ",
                                                 "declares 2147483648 elements (8589934592 bytes)")),
    "header declaring 4 TiB": ("model", "huge", ("'huge.npz' declares 4,398,046,511,104 bytes",
                                                 "refused before reading")),
}


# --------------------------------------------------------------------------------------------------------------------
# The server, the browser, the health poll.

@pytest.fixture(scope="module")
def server(sample_run_dir, tmp_path_factory, browser):
    """The launcher under the address-space limit, on the stored digits run, once it has shown the Load and
    Confusion pages (its first pages import torch, pandas and plotly, and loading their libraries held the GIL for up
    to 0.9 s at a time here: a cold start, not what the uploads do to it); yields (url, process, log path)."""
    from conftest import launched_dashboard

    if not shutil.which("prlimit"):
        pytest.fail("prlimit (util-linux) is missing: this test needs it to run the server under a memory limit")
    run = Path(sample_run_dir("digits"))
    cwd = tmp_path_factory.mktemp("bomb-server")
    with launched_dashboard(["--runs-dir", str(run.parent), "--run", str(run), "--workspace", str(cwd / "uploads")],
                            cwd=cwd, prefix_argv=["prlimit", f"--as={ADDRESS_SPACE_LIMIT}:", "--"],
                            with_process=True) as (port, process):
        # prlimit execs the launcher: the limit is on the very process that serves (and it is the one we watch)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
        assert line.split()[3] == str(ADDRESS_SPACE_LIMIT), line
        url = f"http://127.0.0.1:{port}"
        page = browser.new_context().new_page()
        for path, heading in (("load", "Load"), ("confusion", "Confusion matrix")):
            page.goto(f"{url}/{path}")
            page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
        page.context.close()
        yield url, process, cwd / "server.log"



@contextlib.contextmanager
def polled_health(url: str):
    """Polls `url`/_stcore/health every HEALTH_INTERVAL_S in a thread; yields the list of (status, seconds) it fills
    (status is the HTTP status, or the error's text when no answer came within 5 s)."""
    answers: list = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
                    response.read()
                    status = response.status
            except OSError as exc:
                status = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - t0
            answers.append((status, elapsed))
            stop.wait(max(0.0, HEALTH_INTERVAL_S - elapsed))

    thread = threading.Thread(target=poll, name="health-poll", daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_upload_is_one_refusal_and_the_live_server_stays_healthy(case, files, server, browser):
    from test_e2e_browser import _no_exception, upload_and_run

    url, process, log = server
    model_key, data_key, expected = CASES[case]
    log_before = log.stat().st_size
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    with polled_health(url) as answers:
        alert = upload_and_run(page, url, files[model_key], files[data_key])
        assert alert.count() == 1, alert.all_inner_texts()
        text = alert.first.inner_text().strip()
    assert all(part in text for part in expected), text
    assert "\n" not in text and "Traceback" not in text and "MemoryError" not in text, text
    _no_exception(page)
    page.context.close()

    statuses = [status for status, _ in answers]
    slowest = max(seconds for _, seconds in answers)
    summary = f"{case}: {len(answers)} health polls, max latency {slowest * 1000:.0f} ms"
    print(summary)
    # the poll ran through the whole upload (a few seconds at 10 a second), not once
    assert len(answers) >= 10, summary
    assert all(status == 200 for status in statuses), f"{summary}; answers other than 200: " \
                                                      f"{[s for s in statuses if s != 200][:5]}"
    # Measured here (2 cores, Chromium beside the server): 0.25-0.53 s. Most of it is Streamlit's gc.collect(2) after
    # every script run (runner.postScriptGC), which holds the GIL for ~0.3 s once torch is loaded (0.15-0.24 s with
    # it off); each upload and the press of Run rerun the script.
    assert slowest < HEALTH_LATENCY_LIMIT_S, summary

    # a second session (a fresh browser context) still gets the dashboard, and it is the same server process
    second = browser.new_context().new_page()
    second.goto(f"{url}/confusion")
    second.get_by_role("heading", name="Confusion matrix").wait_for(timeout=60_000)
    _no_exception(second)
    second.context.close()
    assert process.poll() is None, f"the server exited with {process.returncode}"
    with open(log, "rb") as fh:
        fh.seek(log_before)
        logged = fh.read().decode(errors="replace")
    assert "MemoryError" not in logged and "Traceback" not in logged, logged[-3000:]
