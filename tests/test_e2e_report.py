"""Each sample's HTML report opened in a real browser (Debian's Chromium through Playwright) with every request
intercepted: nothing is asked of any host, not even 127.0.0.1 (the file holds everything), every section is shown,
plotly draws every figure, and the file keeps under the size bound. The Overview's "Download report" button is
tested in tests/test_e2e_browser.py on the live server."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require_chromium
from sample_models import SAMPLE_NAMES

pytestmark = pytest.mark.e2e

require_chromium()

MAX_REPORT_BYTES = 15e6


def open_offline(browser, path: Path):
    """The report at `path` in a new page whose every request other than the file itself is refused and recorded;
    returns (page, the requests refused)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = []

    def route(request_route):
        url = request_route.request.url
        if url == path.resolve().as_uri() or url.startswith("data:"):
            request_route.continue_()
        else:
            refused.append(url)
            request_route.abort()

    page.route("**/*", route)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(path.resolve().as_uri())
    page.wait_for_function("() => window.Plotly !== undefined", timeout=30_000)
    page.wait_for_timeout(500)
    return page, refused, errors


def check_report_page(page, report) -> None:
    for panel in report.panels:
        section = page.locator(f"section#{panel.key}")
        assert section.count() == 1, panel.key
        assert section.locator("h2").inner_text().strip() == panel.title
    figures = sum(len(getattr(part, "figures", ())) or (not hasattr(part, "text")) for panel in report.panels
                  for part in panel.parts)
    # plotly drew every figure: each becomes one .js-plotly-plot with its SVG
    assert page.locator(".js-plotly-plot").count() == figures
    images = page.locator("section img")
    assert images.count() == report.thumbnails
    if report.thumbnails:  # decoded and drawn: a broken data URI has no natural width
        assert page.evaluate("() => [...document.querySelectorAll('section img')].every(i => i.naturalWidth > 0)")


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_each_samples_report_opens_offline_whole(name, sample_run_dir, browser, tmp_path):
    from dashboard.report import build_report

    report = build_report(sample_run_dir(name))
    out = report.write(tmp_path / f"{name}.html")
    assert out.stat().st_size < MAX_REPORT_BYTES
    page, refused, errors = open_offline(browser, out)
    try:
        assert refused == [] and errors == []
        check_report_page(page, report)
    finally:
        page.close()
