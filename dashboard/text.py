"""Text from files and URLs shown as text, never as markup (issue 19).

Streamlit renders Markdown (links, images, HTML-like colour directives, LaTeX) in titles, captions, alerts, button and
expander labels; plotly renders pseudo-HTML (`<a href>`, `<b>`) in titles, tick labels and hover text. Class names,
ids, metadata values, feature and layer names, run names and query values come from uploads and links, so each goes
through `md` (Markdown) or `plotly_text` before it is interpolated into either. (CSV exports are neutralised for
spreadsheets where they are written: `analyzers.evaluation.stage.to_csv`.)
"""
from __future__ import annotations

import html
import re
import string

# CommonMark lets every ASCII punctuation character be escaped with a backslash, which then renders as itself.
_MARKDOWN_ESCAPES = {ord(c): "\\" + c for c in string.punctuation}
# Streamlit's renderer (remark-gfm) also turns bare URLs and emails into links, and it finds them in the text
# *after* escapes are decoded, so escaping cannot stop it. An invisible WORD JOINER (U+2060) where its patterns need
# two characters side by side does: "http" + "://", "www" + ".", and a name character + "@".
WORD_JOINER = "\u2060"
_AUTOLINK_SEAMS = re.compile(r"(?i)(?<=https)(?=\\:)|(?<=http)(?=\\:)|(?<=www)(?=\\\.)|(?=\\@)")


def md(value) -> str:
    """`value` as literal text inside Streamlit Markdown: no link (written or bare), image, emphasis, HTML, LaTeX or
    directive, and on one line. It reads as `value`; bare URLs and emails carry an invisible WORD_JOINER."""
    text = " ".join(str(value).splitlines())
    return _AUTOLINK_SEAMS.sub(WORD_JOINER, text.translate(_MARKDOWN_ESCAPES))


def in_page_words(message: str, controls: dict) -> str:
    """An analyzer's message with each command-line flag it names (`--arch`) replaced by the label of the control
    that sets the same thing on this page (`controls`: flag -> label); flags the page has no control for stay."""
    def label(match: re.Match) -> str:
        flag = match.group(0)
        return f"the “{controls[flag]}” field" if flag in controls else flag

    return re.sub(r"--[a-z][a-z-]*", label, str(message))


def plotly_text(value) -> str:
    """`value` as literal text inside a plotly string (titles, tick labels, hover text): no tag is interpreted."""
    return html.escape(str(value), quote=False)
