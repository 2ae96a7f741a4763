"""Data is text, never markup (issue 19): class names, ids, metadata, feature names, run names and query values
from a hostile upload reach every page, and nothing of them becomes a link, an image or HTML.

What Streamlit renders as Markdown is read back from AppTest as the Markdown source it was given, then rendered with
markdown-it (CommonMark, HTML on) as the browser's renderer would; plotly figures are read as the JSON the browser
gets. The browser test (tests/test_e2e_browser.py) checks that no request leaves 127.0.0.1 on the same run."""
from __future__ import annotations

import csv
import html as html_module
import io
import json
import re

import numpy as np
import pytest
from markdown_it import MarkdownIt

from analyzers.evaluation.stage import to_csv
from dashboard.text import WORD_JOINER, md, plotly_text

BEACON = "http://127.0.0.1:9999/beacon"
HOSTILE = [f"![m]({BEACON})", "[Click to re-authenticate](http://evil.example/login)", f"<img src={BEACON}>",
           "**bold** _it_ `code` $x^2$ :red[red] :smile:", f"<a href='{BEACON}'>x</a>", "www.evil.example",
           "https://evil.example/login", "HTTP://EVIL.EXAMPLE", "mail ana@example.org to re-authenticate",
           "=HYPERLINK(\"http://evil.example\",\"x\")", "-2+3+cmd|' /C calc'!A0", "line\nbreak # heading"]
PAGES = ("views/overview.py", "views/confusion.py", "views/errors.py", "views/explain.py", "views/embeddings.py",
         "views/training.py", "views/compare.py", "views/load.py")
RENDER = MarkdownIt("commonmark", {"html": True})
FORBIDDEN_HTML = ("<a", "<img", "<script", "<iframe", "<svg", "<video", "<audio", "<link", "<object")


# What Streamlit's renderer (remark-gfm, mdast-util-gfm-autolink-literal) links in text after escapes are decoded.
GFM_URL = re.compile(r"(https?://|www(?=\.))([-.\w]+)", re.IGNORECASE | re.ASCII)
GFM_EMAIL = re.compile(r"([-.\w+]+)@([-\w]+(?:\.[-\w]+)+)", re.ASCII)


def _rendered_is_text(source: str) -> None:
    html = RENDER.render(source)
    assert not any(tag in html for tag in FORBIDDEN_HTML), (source, html)
    decoded = html_module.unescape(re.sub(r"<[^>]+>", "", html))
    # nothing a GFM autolinker would pick up, in the source or in the decoded text it searches
    assert not GFM_URL.search(source) and not GFM_EMAIL.search(source), source
    assert not GFM_URL.search(decoded) and not GFM_EMAIL.search(decoded), decoded


@pytest.mark.parametrize("value", HOSTILE)
def test_md_renders_exactly_the_value_as_text(value):
    source = md(value)
    _rendered_is_text(source)
    plain = RENDER.render(source).strip()
    assert plain.startswith("<p>") and plain.endswith("</p>")
    # the same characters, as text (bare URLs and emails with an invisible word joiner)
    assert html_module.unescape(plain[3:-4]).replace(WORD_JOINER, "") == " ".join(value.splitlines())


@pytest.mark.parametrize("value", HOSTILE)
def test_plotly_strings_carry_no_tag(value):
    assert "<" not in plotly_text(value) and ">" not in plotly_text(value)


def test_csv_export_neutralises_formula_cells():
    import pandas as pd

    table = pd.DataFrame({"id": ["=1+1", "+2", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx", "ok"],
                          "score": [-1.5, 2.0, -3.0, 0.0, 1.0, 2.0, 3.0], "=name": ["a"] * 7})
    text = to_csv(table)
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert header[-1] == "'=name"
    assert [r[0] for r in rows] == ["'=1+1", "'+2", "'-2+3+cmd|' /C calc'!A0", "'@SUM(A1)", "'\tx", "'\rx", "ok"]
    assert [float(r[1]) for r in rows] == [-1.5, 2.0, -3.0, 0.0, 1.0, 2.0, 3.0]  # numbers stay numbers


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory):
    """A digits run whose class names, ids, metadata column and values are all hostile, and a second run on the same
    data (for Compare) under a hostile-looking but valid name."""
    import analyzers
    from sample_models import get_sample

    if not get_sample("digits").weights_path.exists():
        pytest.skip("the digits sample has no trained weights in this checkout")
    root = tmp_path_factory.mktemp("hostile")
    data = get_sample("digits").load_data("test")
    n = 120
    names = np.array([HOSTILE[i % len(HOSTILE)] + f" {i}" for i in range(10)])
    ids = np.array([HOSTILE[i % len(HOSTILE)] + f"#{i}" for i in range(n)])
    meta = np.array([HOSTILE[i % len(HOSTILE)] for i in range(n)])
    path = root / "hostile.npz"
    np.savez(path, x=np.asarray(data.x[:n], np.float32), y=np.asarray(data.y[:n]), class_names=names, ids=ids,
             **{f"![c]({BEACON})": meta})
    runs = root / "runs"
    for name in ("hostile", "hostile_b"):
        analyzers.run_analysis("sample:digits", str(path), runs / name, batch_size=64)
    return runs


def _sources(at) -> list:
    """Every string AppTest saw that Streamlit renders as Markdown."""
    out = []
    for kind in ("markdown", "caption", "subheader", "title", "header", "error", "warning", "info", "success"):
        out += [str(e.value) for e in getattr(at, kind)]
    out += [str(m.label) for m in at.metric] + [str(s.label) for s in at.selectbox]
    out += [str(b.label) for b in at.button] + [str(e.label) for e in at.expander]
    return out


def _drawn(value):
    """A figure without its `customdata` (ids kept for selections; drawn only through escaped `text`)."""
    if isinstance(value, dict):
        return {k: _drawn(v) for k, v in value.items() if k != "customdata"}
    if isinstance(value, list):
        return [_drawn(v) for v in value]
    return value


def _figures(at) -> list:
    return [_drawn(json.loads(chart.proto.spec)) for chart in at.get("plotly_chart")]


def test_no_page_renders_data_as_markup(hostile_runs, monkeypatch):
    from test_dashboard_app import _app, _ok

    run = hostile_runs / "hostile"
    from analyzers.loading.runs import open_run

    first_id = str(open_run(run).samples["id"].iloc[0])
    at = _app(monkeypatch, hostile_runs, run, sample=first_id, sel="cell:0-0").run()
    _ok(at)
    seen_hostile = 0
    for page in PAGES:
        at.switch_page(page).run()
        _ok(at)
        for source in _sources(at):
            _rendered_is_text(source)
            seen_hostile += "beacon" in source or "evil" in source
        for figure in _figures(at):
            text = json.dumps(figure)
            assert "<a " not in text and "<img" not in text and "\\u003ca" not in text.lower(), page
    assert seen_hostile >= 5  # the hostile strings were shown (as text), not dropped


@pytest.mark.parametrize("query", [{"run": "[Click to re-authenticate](http://evil.example/)"},
                                   {"sample": f"![m]({BEACON})"}, {"sel": f"ids:![m]({BEACON})"}])
def test_query_values_in_a_link_are_text(query, hostile_runs, monkeypatch):
    from test_dashboard_app import _app, _ok

    at = _app(monkeypatch, hostile_runs, hostile_runs / "hostile", **query).run()
    _ok(at)
    for page in ("views/overview.py", "views/explain.py"):
        at.switch_page(page).run()
        _ok(at)
        for source in _sources(at):
            _rendered_is_text(source)


def test_the_html_report_of_a_hostile_run_holds_its_values_as_text(hostile_runs):
    """The report (dashboard/report.py) of the hostile run and its comparison with the second: outside plotly.js,
    every tag in the file is one the report writes itself, every image a PNG data URI, and no value of the run
    becomes a link or an element; inside each figure's script, no value can close the script."""
    from plotly.offline import get_plotlyjs

    from dashboard.report import build_report

    text = build_report(hostile_runs / "hostile", compare=hostile_runs / "hostile_b").to_html()
    ours = text.replace(get_plotlyjs(), "")
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", ours, flags=re.S)
    assert scripts and all("<" not in body.replace("<\\/", "") for body in scripts[1:])  # figures' JSON escapes "<"
    markup = re.sub(r"<script[^>]*>.*?</script>", "", ours, flags=re.S)
    from html.parser import HTMLParser

    seen = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            seen.append((tag, dict(attrs)))

    Tags().feed(markup)
    assert {tag for tag, _ in seen} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "section", "p", "table", "thead",
        "tbody", "tr", "th", "td", "div", "figure", "img", "figcaption", "ul", "ol", "li", "small", "strong", "em",
        "b", "br", "span"}, {tag for tag, _ in seen}
    # no attribute that can fetch, link or run anything; an image's source is a PNG inside the file
    assert {name for _, attrs in seen for name in attrs} <= {"id", "class", "style", "src", "alt", "lang", "charset",
                                                            "http-equiv", "content"}
    assert all(attrs["src"].startswith("data:image/png;base64,") for tag, attrs in seen if "src" in attrs)
    assert all(tag == "img" for tag, attrs in seen if "src" in attrs)
    # each hostile class name is there, as the text it is
    assert html_module.escape(HOSTILE[2] + " 2") in markup
