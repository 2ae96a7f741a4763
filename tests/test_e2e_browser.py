"""End to end in a real browser: the launcher (`dashboard/serve.py`) on 127.0.0.1, driven by Playwright through Debian's Chromium.

Loads the app on a sample run, clicks a confusion-matrix cell and sees its gallery, then opens a sample's explanation;
uploads a crafted archive; and shows a run full of markup while recording every request the browser makes.
`upload_and_run` is shared with tests/test_live_server_bombs.py.
In CI (CI=true) a missing Chromium is a failure, not a skip: `make browser` installs it.
"""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require_chromium

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

require_chromium()


@pytest.fixture(scope="module")
def app_url(sample_run_dir, tmp_path_factory):
    from conftest import launched_dashboard

    run = Path(sample_run_dir("digits"))
    # the launcher (its own settings), started outside the repo
    with launched_dashboard(["--runs-dir", str(run.parent), "--run", str(run)],
                            cwd=tmp_path_factory.mktemp("streamlit")) as port:
        yield f"http://127.0.0.1:{port}"



def _wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Until Streamlit's "running" indicator is gone: the script has finished its rerun."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()


def upload_and_run(page, app_url: str, model: Path, data: Path):
    """On the Load page of `page`: upload `model` and `data`, press Run, and return the error alerts' locator once
    the press is answered with an error about these files (what the hostile-upload tests expect)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{app_url}/load")
    page.get_by_role("heading", name="Load").wait_for(timeout=60_000)
    page.get_by_role("radio", name="Upload files").click()
    uploaders = page.locator('[data-testid="stFileUploader"]')
    uploaders.nth(1).wait_for(timeout=30_000)
    # one file at a time, each once the rerun its upload causes is over, so no rerun lands between the two
    for uploader, path in ((uploaders.nth(0), model), (uploaders.nth(1), data)):
        # the name shows as soon as the file is chosen; the server holds the file once its upload is answered
        with page.expect_response(lambda r: "/_stcore/upload_file/" in r.url and r.request.method in ("PUT", "POST"),
                                  timeout=60_000):
            uploader.locator('input[type="file"]').set_input_files(str(path))
        page.get_by_text(path.name).first.wait_for(timeout=30_000)
        _wait_until_idle(page)
    alert = page.locator('[data-testid="stAlertContentError"]')
    # an upload finishing reruns the script, and a click that lands during that rerun can be dropped, or can run
    # before the server holds both files ("choose both ..."): click again until the press is answered with them
    for _ in range(4):
        _wait_until_idle(page)
        _current(page, RUN_BUTTON).click()
        try:
            alert.first.wait_for(timeout=30_000)
        except PlaywrightTimeout:
            continue
        if not alert.first.inner_text().strip().startswith("choose both"):
            break
        page.wait_for_timeout(1000)
    alert.first.wait_for(timeout=30_000)
    return alert


RUN_BUTTON = "//button[normalize-space()='Run']"


def _current(page, xpath: str):
    """The element of this rerun matching `xpath`: while a rerun moves the page's layout, Streamlit keeps the last
    run's copy on screen beside the new one (inside a container marked data-stale) until the rerun ends."""
    return page.locator(f"xpath={xpath}[not(ancestor::*[@data-stale='true'])]")


STALE = ("is not in this run yet", "Scores: computing", "No run is open", "Page not found")


def _settled(page) -> str:
    """The page's text once its script is idle, checked for exceptions and for messages that should be gone: a
    transient one ("Scores: computing…") may show while the script runs, but never stays."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # up to 3 minutes: the Explain page's scores (with the randomisation check) took over 60 s with the suite's
    # two processes and other work on 2 cores (the fresh-clone suite of fc37f7c). Idle and free of stale messages
    # at once: between a script run stopped by a rerun and the next one, the status widget is briefly gone while
    # the stopped run's "Scores: computing…" still shows (the fresh-clone suite of 81dbb16)
    deadline = time.monotonic() + 180
    while True:
        _wait_until_idle(page)
        try:
            page.wait_for_function("(stale) => !stale.some(s => document.body.innerText.includes(s))",
                                   arg=list(STALE), timeout=max(1, int((deadline - time.monotonic()) * 1000)))
        except PlaywrightTimeout:
            pass  # reported below, with the text
        _wait_until_idle(page)
        _no_exception(page)
        text = page.locator("body").inner_text()
        stale = [s for s in STALE if s in text]
        if not stale or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    assert not stale, (stale, text[-1500:])
    return text


def test_walk_load_a_sample_overview_a_confusion_cell_explain_and_next(app_url, browser, sample_run_dir):
    """issue 18: Load -> sample -> Overview -> confusion cell -> Explain -> Next, as a person goes; no run is
    replaced on the way (a name that exists is reused or refused, never silently overwritten), and no page shows a
    stale message once it is idle."""
    from analyzers.loading.runs import open_run

    existing = Path(sample_run_dir("digits"))
    info_before = (existing / "run.json").read_bytes()
    stamp_before = (existing / "run.json").stat().st_mtime_ns

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    walk = existing.parent / "digits-walk"
    for name in (existing.name, walk.name):  # the existing run's name first: it must survive the press
        page.goto(f"{app_url}/load")  # a fresh page each time: a rerun keeps the last press's elements, stale
        page.get_by_role("heading", name="Load").wait_for(timeout=60_000)
        _settled(page)
        name_field = page.get_by_label("Run name")
        name_field.fill(name)
        name_field.press("Enter")
        _wait_until_idle(page)
        _current(page, RUN_BUTTON).click()
        # the press is answered when this rerun's page says the run is ready, or that the name is taken
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=\"stElementContainer\"]:not([data-stale=\"true\"])')]"
            ".some(e => e.innerText.includes('is ready') || e.innerText.includes('already exists'))",
            timeout=180_000)
        _wait_until_idle(page, timeout_ms=180_000)
        assert (existing / "run.json").read_bytes() == info_before
        assert (existing / "run.json").stat().st_mtime_ns == stamp_before
    assert (walk / "run.json").exists()

    run = open_run(walk)
    samples = run.samples
    wrong = samples[~samples["correct"]]
    cell = wrong.groupby(["label", "pred"]).size().idxmax()
    true, pred = int(cell[0]), int(cell[1])
    k, names = len(run.class_names), run.class_names
    expected = samples[(samples["label"] == true) & (samples["pred"] == pred)]

    page.goto(f"{app_url}/overview?run=digits-walk")
    page.get_by_role("heading", name="Top findings").wait_for(timeout=60_000)
    assert "digits-walk" in _settled(page)

    page.goto(f"{app_url}/confusion?run=digits-walk")
    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=60_000)
    # the matrix is the page's first chart (the threshold section's curves below it have markers too)
    markers = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace.scatter .points path")
    markers.nth(k * k - 1).wait_for(state="attached", timeout=30_000)
    assert markers.count() == k * k
    marker = markers.nth(true * k + pred)  # markers are laid out row by row (true class), then by prediction
    box = marker.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_role("heading", name=f"True {names[true]}, predicted {names[pred]}").wait_for(timeout=30_000)
    assert f"{len(expected)} samples" in _settled(page)
    assert f"cell:{true}-{pred}" in page.url.replace("%3A", ":")

    ordered = [str(i) for i in expected.sort_values("id")["id"]]
    page.get_by_role("button", name="Explain").first.click()
    page.get_by_role("heading", name="Explain a sample").wait_for(timeout=60_000)
    page.get_by_text(f"Sample {ordered[0]} — true {names[true]}").wait_for(timeout=60_000)
    assert f"sample={ordered[0]}" in page.url
    page.get_by_text("deletion AUC").first.wait_for(timeout=120_000)  # the maps, then their scores
    _settled(page)
    if len(ordered) > 1:
        page.get_by_role("button", name="Next ▶").click()
        page.get_by_text(f"Sample 2 of {len(ordered)} in the current selection").wait_for(timeout=60_000)
        page.get_by_text("deletion AUC").first.wait_for(timeout=120_000)
        text = _settled(page)
        assert f"Sample {ordered[0]} —" not in text and any(f"Sample {i} — true" in text for i in ordered[1:])
    assert (existing / "run.json").read_bytes() == info_before  # still: nothing on the way replaced it
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


def _threshold_matrix(page) -> list[int]:
    """The counts the threshold section's 2x2 matrix shows, row by row (true class), as the heat map's cell labels."""
    cells = page.locator(".st-key-threshold-confusion .js-plotly-plot .heatmaplayer text")
    cells.nth(3).wait_for(state="attached", timeout=30_000)
    return [int(text.replace(",", "")) for text in cells.all_text_contents()]


def test_dragging_the_threshold_slider_on_the_fraud_sample_changes_the_matrix(app_url, browser, sample_run_dir):
    """Issue 12: on the imbalanced fraud sample, dragging the threshold slider with the mouse from 0.5 down to about
    0.2 moves frauds from the missed cell to the caught one. Before and after, the matrix shown is scikit-learn's
    confusion matrix of the run's p(fraud) >= the slider's value."""
    from sklearn.metrics import confusion_matrix

    from analyzers.loading.runs import open_run

    run = open_run(sample_run_dir("fraud"))  # in the runs directory the app serves
    fraud = run.class_names.index("fraud")
    labels, p_fraud = run.samples["label"].to_numpy(), run.probs[:, fraud]

    def expected(threshold: float) -> list[int]:  # tn, fp, fn, tp: "not fraud" first, as the page lays it out
        return confusion_matrix(labels == fraud, p_fraud >= threshold, labels=[False, True]).ravel().tolist()

    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(f"{app_url}/confusion?run=fraud")
    page.get_by_role("heading", name="Decision threshold: one class against the rest").wait_for(timeout=60_000)
    slider = page.locator(".st-key-threshold-value input[type=range]")
    slider.wait_for(state="attached", timeout=60_000)
    _settled(page)
    assert float(slider.input_value()) == 0.5  # no threshold stored in the run: the default
    before = _threshold_matrix(page)
    assert before == expected(0.5)

    # a real drag: press on the thumb (the visible knob around the hidden range input's clipped wrapper), move along
    # the track (the knob's parent), release
    thumb = slider.locator("xpath=../..")
    track = thumb.locator("xpath=..").bounding_box()
    start = thumb.bounding_box()
    page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + 0.2 * track["width"], start["y"] + start["height"] / 2, steps=12)
    page.mouse.up()
    page.wait_for_function("(input) => input.value !== '0.5'", arg=slider.element_handle(), timeout=30_000)
    _settled(page)
    threshold = float(slider.input_value())
    assert 0.1 < threshold < 0.3, threshold  # where the mouse let go, about a fifth of the way along
    # the new matrix alone: while Streamlit redraws, the old chart can linger beside the new one (8 cells)
    page.wait_for_function("(before) => { const cells = [...document.querySelectorAll("
                           "'.st-key-threshold-confusion .js-plotly-plot .heatmaplayer text')]"
                           ".map(t => t.textContent); return cells.length === 4 && cells.join() !== before.join(); }",
                           arg=[str(v) for v in before], timeout=30_000)
    after = _threshold_matrix(page)
    assert after == expected(threshold)
    tn, fp, fn, tp = after
    assert tp > before[3] and fn < before[2] and fp > before[1]  # more frauds caught, at the price of false alarms
    assert tp + fn == before[3] + before[2] == int((labels == fraud).sum())
    _no_exception(page)
    page.close()


def test_the_audio_sample_explain_page_shows_its_spectrogram_and_an_audio_player(app_url, browser, sample_run_dir):
    """Issue 13: a clip of the audio sample on the Explain page is drawn as a spectrogram (time and frequency axes)
    beside an <audio> player holding its waveform; nothing is played."""
    from analyzers.loading.runs import open_run

    run = open_run(sample_run_dir("audio"))  # in the runs directory the app serves
    sample_id = str(run.samples["id"].iloc[0])
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(f"{app_url}/explain?run=audio&sample={sample_id}")
        page.get_by_role("heading", name="Explain a sample").wait_for(timeout=60_000)
        player = page.locator('[data-testid="stAudio"] audio, audio[data-testid="stAudio"]').first
        player.wait_for(state="attached", timeout=60_000)
        assert player.get_attribute("src")  # the clip, served by the app
        # the browser reads the clip's header (its length), and nothing plays
        page.wait_for_function("(a) => a.readyState >= 1", arg=player.element_handle(), timeout=30_000)
        assert player.evaluate("(a) => a.duration") == pytest.approx(0.768, abs=0.01)
        assert player.evaluate("(a) => a.paused")
        spectrogram = page.locator(".js-plotly-plot").first
        spectrogram.locator(".xtitle").wait_for(state="attached", timeout=60_000)
        assert spectrogram.locator(".xtitle").text_content() == "time (s)"  # SVG text
        assert spectrogram.locator(".ytitle").text_content() == "frequency (Hz)"
        assert spectrogram.locator(".heatmaplayer").count() == 1
        _no_exception(page)
    finally:
        page.close()


def test_crafted_archive_upload_shows_one_error_and_the_server_stays_healthy(app_url, browser, tmp_path):
    """The first reported vector uploaded in a real browser: one st.error naming the refusal, the payload never runs,
    and a second session (a fresh browser context) still gets the dashboard."""
    import numpy as np
    import torch

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
    alert = upload_and_run(page, app_url, crafted, data)
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


# Markup an upload could carry in its class names, ids and metadata: an image that would call a local port, an HTML
# image and a Markdown link to another host. Each must show as the text it is and never become a request or a link.
HOSTILE = ("![m](http://127.0.0.1:9999/beacon)", "<img src=http://evil.example/x>", "[Click](http://evil.example)")


@pytest.fixture(scope="module")
def hostile_app(tmp_path_factory):
    """The launcher on a run (of a model defined in the tests) whose class names, ids and metadata column `note` are
    HOSTILE strings; yields the app's URL."""
    import numpy as np
    import torch

    from analyzers.engines.pipeline import run_analysis
    from conftest import TinyCNN, export_model, launched_dashboard

    root = tmp_path_factory.mktemp("hostile-run")
    torch.manual_seed(0)
    model = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), root / "model.pt2")
    n = 60
    data = root / "data.npz"
    np.savez(data, x=np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32), y=np.arange(n) % 3,
             ids=np.array([f"{HOSTILE[i % 3]} {i}" for i in range(n)]), class_names=np.array(HOSTILE),
             note=np.array([HOSTILE[(i // 2) % 3] for i in range(n)]))  # metadata: Errors & slices › Groups names it
    run = run_analysis(str(model), str(data), root / "runs" / "hostile")
    with launched_dashboard(["--runs-dir", str(run.parent), "--run", str(run)], cwd=root) as port:
        yield f"http://127.0.0.1:{port}"


def _shown_text(page) -> str:
    """The page's visible text as a person reads it: without the invisible word joiners that keep bare URLs from
    becoming links (dashboard.text.md)."""
    return page.locator("body").inner_text().replace("\u2060", "")


def test_hostile_markup_in_a_run_makes_no_request_beyond_the_server(hostile_app, browser):
    """Every request the browser makes while it shows Overview, Confusion matrix, Errors & slices and Explain of a run
    full of markup (and with markup in ?run= and ?sample=) goes to the dashboard itself; the markup shows as text."""
    from urllib.parse import quote, urlsplit

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    origin = urlsplit(hostile_app)
    requested, outside = [], []

    def is_outside(url: str) -> bool:
        # only the dashboard's own origin: not localhost, not another port of 127.0.0.1 (the beacon's); data: and
        # blob: URLs never leave the page
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob"):
            return False
        return parts.scheme not in ("http", "ws") or parts.netloc != origin.netloc

    def intercept(route) -> None:
        url = route.request.url
        requested.append(url)
        if is_outside(url):
            outside.append(url)
            route.abort()
        else:
            route.continue_()

    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    context.route("**/*", intercept)
    # what routing does not see is still recorded: every request event, and the WebSocket (never routed)
    context.on("request", lambda request: is_outside(request.url) and outside.append(request.url))
    page = context.new_page()
    page.on("websocket", lambda ws: requested.append(ws.url) or (is_outside(ws.url) and outside.append(ws.url)))
    # a link is no request until it is clicked: none may point away from the dashboard either
    away = page.locator('a[href*="evil.example"], a[href*=":9999"], img[src*="evil.example"], img[src*=":9999"]')

    def shown() -> str:
        _no_exception(page)
        assert away.count() == 0, away.first.evaluate("e => e.outerHTML")
        return _shown_text(page)

    def visit(path: str, heading: str) -> str:
        page.goto(f"{hostile_app}/{path}")
        page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
        _wait_until_idle(page)
        return shown()

    # Overview, reached with a run name that is markup: the warning quotes it as text
    text = visit(f"?run={quote(HOSTILE[0])}", "Overview")
    assert f"There is no run called '{HOSTILE[0]}'" in text, text[:3000]

    visit("confusion?run=hostile", "Confusion matrix")
    page.locator(".js-plotly-plot .xtick").nth(2).wait_for(state="attached", timeout=30_000)
    try:  # the axes' labels, once plotly has drawn them all (under load a rerun can redraw the figure after this)
        page.wait_for_function("names => names.every(n => document.body.innerText.replaceAll('\u2060', '')"
                               ".includes(n))", arg=list(HOSTILE), timeout=30_000)
    except PlaywrightTimeout:
        pass  # the assertion below says what is missing
    text = shown()
    assert all(name in text for name in HOSTILE), text[:3000]  # the class names on the axes

    # Explain, on a sample whose id is markup, then on a ?sample= that no sample has. Explain comes before Errors &
    # slices so that its maps are computed afresh in this session, behind spinners that name the classes; after the
    # gallery had loaded the model in another session, the shared worker was found dead here (SIGKILL: bubblewrap's
    # --die-with-parent follows the thread that started it, and each script run is a thread)
    visit(f"explain?run=hostile&sample={quote(HOSTILE[1] + ' 1')}", "Explain a sample")
    errors = page.locator('[data-testid="stAlertContentError"]')
    page.get_by_text("deletion AUC").or_(errors).first.wait_for(timeout=120_000)  # the maps are drawn, or failed
    _wait_until_idle(page)
    assert errors.count() == 0, errors.all_inner_texts()
    text = shown()
    assert f"Sample {HOSTILE[1]} 1 — true {HOSTILE[1]}" in text, text[:3000]
    text = visit(f"explain?run=hostile&sample={quote(HOSTILE[2])}", "Explain a sample")
    assert f"This run has no sample with id '{HOSTILE[2]}'" in text, text[:3000]

    visit("errors?run=hostile", "Errors & slices")
    page.get_by_text("Loading the model and data").wait_for(state="detached", timeout=120_000)
    page.locator('[data-testid="stImage"]').first.wait_for(timeout=60_000)  # the gallery's thumbnails
    text = shown()
    assert any(f"id {name} " in text for name in HOSTILE), text[:3000]  # the gallery's captions name the ids
    page.get_by_role("radio", name="Groups").click()
    page.get_by_text("Largest accuracy gap").wait_for(timeout=60_000)
    _wait_until_idle(page)
    text = shown()
    assert sum(name in text for name in HOSTILE) >= 2, text[:3000]  # the groups of the metadata column `note`
    context.close()
    assert requested, "the interception saw no request at all"
    assert outside == [], f"requests that left the dashboard: {sorted(set(outside))}"


def test_every_page_has_its_own_address(app_url, browser):
    """Issue 18, item 10: /overview?run=... opened a "Page not found" modal (the Overview was Streamlit's default
    page, served at / only). Each page's path opens that page, and / still opens the Overview."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    try:
        for path, title in (("/overview?run=digits", "Overview"), ("/", "Overview"),
                            ("/confusion?run=digits", "Confusion matrix"), ("/load", "Load")):
            page.goto(app_url + path)
            page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
            _wait_until_idle(page)
            assert page.get_by_text("Page not found").count() == 0, path
    finally:
        page.close()


SCREENSHOT = ROOT / "docs" / "overview.png"  # the README's first picture, kept current by the test below


def test_the_overview_downloads_its_report_and_is_the_readmes_picture(app_url, browser, tmp_path):
    """The Overview's "Download report" button hands over the run's report (every section, opening with no request
    at all), and the page as a person sees it is the README's screenshot: replaced when it has changed."""
    import numpy as np
    from PIL import Image

    from dashboard.report import SECTIONS

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{app_url}/overview?run=digits")
        page.get_by_role("heading", name="Top findings").wait_for(timeout=60_000)
        _settled(page)
        # every element drawn (metrics and page links show grey placeholders until their frontend code is in)
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=30_000)
        page.wait_for_timeout(1000)
        shot = tmp_path / "overview.png"
        page.screenshot(path=str(shot))
        with page.expect_download(timeout=180_000) as download:
            page.get_by_role("button", name="Download report").click()
        saved = tmp_path / "report.html"
        download.value.save_as(saved)
        assert download.value.suggested_filename.endswith("-report.html")
    finally:
        page.close()
    text = saved.read_text(encoding="utf-8")
    assert all(f'<section id="{key}">' in text for key in SECTIONS) and saved.stat().st_size < 15e6
    offline = browser.new_page()
    refused = []
    offline.route("**/*", lambda r: r.continue_() if r.request.url == saved.as_uri() else (
        refused.append(r.request.url), r.abort()))
    try:
        offline.goto(saved.as_uri())
        offline.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length > 0", timeout=30_000)
        assert refused == []
        assert offline.locator("section#confusion .js-plotly-plot").count() == 1
        assert offline.locator("section#slices img").count() > 0  # the slices' worst samples, as thumbnails
    finally:
        offline.close()
    new = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    old = np.asarray(Image.open(SCREENSHOT).convert("RGB"), dtype=np.int16) if SCREENSHOT.exists() else None
    if old is None or old.shape != new.shape or np.abs(old - new).mean() > 1.0:  # more than anti-aliasing moved
        SCREENSHOT.parent.mkdir(exist_ok=True)
        Image.open(shot).save(SCREENSHOT, optimize=True)
