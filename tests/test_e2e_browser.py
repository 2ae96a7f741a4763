"""End to end in a real browser: the launcher (`dashboard/serve.py`) on 127.0.0.1, driven by Playwright through Debian's Chromium.

Loads the app on a sample run, clicks a confusion-matrix cell and sees its gallery, then opens a sample's explanation.
In CI (CI=true) a missing Chromium is a failure, not a skip: `make browser` installs it.
"""
from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.e2e

if not Path(CHROMIUM).exists() and os.environ.get("CI") != "true":
    pytest.skip(f"{CHROMIUM} is missing (install it with `make browser`); the browser test runs in CI",
                allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(sample_run_dir, tmp_path_factory):
    from conftest import launched_dashboard

    run = Path(sample_run_dir("digits"))
    # the launcher (its own settings), started outside the repo
    with launched_dashboard(["--runs-dir", str(run.parent), "--run", str(run)],
                            cwd=tmp_path_factory.mktemp("streamlit")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Until Streamlit's "running" indicator is gone: the script has finished its rerun."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()


def test_click_confusion_cell_then_explain(app_url, browser, sample_run_dir):
    from analyzers.loading.runs import open_run

    run = open_run(sample_run_dir("digits"))
    samples = run.samples
    wrong = samples[~samples["correct"]]
    # the most populated off-diagonal cell, else a diagonal one
    cell = (wrong.groupby(["label", "pred"]).size().idxmax() if len(wrong)
            else (int(samples["label"].iloc[0]), int(samples["label"].iloc[0])))
    true, pred = int(cell[0]), int(cell[1])
    k = len(run.class_names)
    expected = samples[(samples["label"] == true) & (samples["pred"] == pred)]

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{app_url}/confusion")
    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=60_000)
    markers = page.locator(".js-plotly-plot .scatterlayer .trace.scatter .points path")
    markers.nth(k * k - 1).wait_for(state="attached", timeout=30_000)
    assert markers.count() == k * k
    marker = markers.nth(true * k + pred)  # markers are laid out row by row (true class), then by prediction
    box = marker.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    names = run.class_names
    heading = page.get_by_role("heading", name=f"True {names[true]}, predicted {names[pred]}")
    heading.wait_for(timeout=30_000)
    assert f"{len(expected)} samples" in page.locator("body").inner_text()
    assert f"cell:{true}-{pred}" in page.url.replace("%3A", ":")
    _no_exception(page)

    first_id = str(expected.sort_values("id")["id"].iloc[0])
    page.get_by_role("button", name="Explain").first.click()
    page.get_by_role("heading", name="Explain a sample").wait_for(timeout=60_000)
    page.get_by_text(f"Sample {first_id} — true {names[true]}").wait_for(timeout=60_000)
    assert f"sample={first_id}" in page.url
    # an attribution map with its faithfulness scores appears
    page.get_by_text("deletion AUC").first.wait_for(timeout=120_000)
    _no_exception(page)
    page.close()


def test_box_selection_on_the_embedding_shows_the_samples(app_url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(f"{app_url}/embeddings")
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for(timeout=60_000)
    area = page.locator(".js-plotly-plot .nsewdrag").first
    area.wait_for(timeout=30_000)
    box = area.bounding_box()
    # a box over the left half of the plot: some samples fall inside
    x0, y0 = box["x"] + 2, box["y"] + 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + box["width"] * 0.25, y0 + box["height"] * 0.5, steps=5)
    page.mouse.move(x0 + box["width"] * 0.5, y0 + box["height"] - 4, steps=5)
    page.mouse.up()
    heading = page.get_by_role("heading", name=re.compile(r"^\d[\d,]* selected samples$"))
    heading.wait_for(timeout=30_000)
    assert "sel=ids" in page.evaluate("window.location.href")
    _no_exception(page)
    page.close()


def test_crafted_archive_upload_shows_one_error_and_the_server_stays_healthy(app_url, browser, tmp_path):
    """The first reported vector uploaded in a real browser: one st.error naming the refusal, the payload never runs,
    and a second session (a fresh browser context) still gets the dashboard."""
    import numpy as np
    import torch
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from conftest import TinyCNN, export_model
    from crafted_archives import CRAFTED

    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_bytes(b"precious")
    torch.manual_seed(0)
    base = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), tmp_path / "base.pt2").read_bytes()
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(CRAFTED["expr_str in a size"](base, marker, victim))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((8, 1, 8, 8), np.float32), y=np.zeros(8, np.int64))

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{app_url}/load")
    page.get_by_role("heading", name="Load").wait_for(timeout=60_000)
    page.get_by_role("radio", name="Upload files").click()
    uploaders = page.locator('[data-testid="stFileUploader"]')
    uploaders.nth(1).wait_for(timeout=30_000)
    uploaders.nth(0).locator('input[type="file"]').set_input_files(str(crafted))
    uploaders.nth(1).locator('input[type="file"]').set_input_files(str(data))
    page.get_by_text("crafted.pt2").first.wait_for(timeout=30_000)
    page.get_by_text("data.npz").first.wait_for(timeout=30_000)
    alert = page.locator('[data-testid="stAlertContentError"]')
    # an upload finishing reruns the script, and a click that lands during that rerun can be dropped, or can run
    # before the server holds both files ("choose both ..."): click again until the press is answered with them
    for _ in range(4):
        _wait_until_idle(page)
        page.get_by_role("button", name="Run", exact=True).click()
        try:
            alert.first.wait_for(timeout=30_000)
        except PlaywrightTimeout:
            continue
        if not alert.first.inner_text().strip().startswith("choose both"):
            break
        page.wait_for_timeout(1000)
    alert.first.wait_for(timeout=30_000)
    assert alert.count() == 1
    text = alert.first.inner_text().strip()
    assert text.startswith("'crafted.pt2' is refused: ") and "outside the size grammar" in text, text
    assert "\n" not in text and "Traceback" not in text
    _no_exception(page)
    assert not marker.exists() and victim.read_bytes() == b"precious"
    page.close()

    with urllib.request.urlopen(f"{app_url}/_stcore/health", timeout=5) as response:
        assert response.status == 200
    second = browser.new_context().new_page()
    second.goto(f"{app_url}/confusion")
    second.get_by_role("heading", name="Confusion matrix").wait_for(timeout=60_000)
    _no_exception(second)
    second.close()
