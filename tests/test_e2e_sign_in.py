"""Sign-in end to end (issue 19, item 12): the launcher with an `[auth]` secrets file, a local OpenID provider
(oidc-provider-mock), and Chromium. Ben signs in through the provider, makes a run, and it records him as its owner;
Ana, in another browser, signs in and does not see it, even from a link.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import require_chromium
from test_e2e_browser import RUN_BUTTON, _current, _no_exception, _wait_until_idle

pytestmark = pytest.mark.e2e

require_chromium()


@pytest.fixture(scope="module")
def provider():
    from oidc_provider_mock import User, run_server_in_thread

    users = [User(sub="ana-1", claims={"email": "ana@example.org"}),
             User(sub="ben-2", claims={"email": "ben@example.org"})]
    with run_server_in_thread(user_claims=users) as server:
        yield f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def signed_in_app(provider, sample_run_dir, tmp_path_factory):
    from conftest import free_port, launched_dashboard

    home = tmp_path_factory.mktemp("team")
    runs = home / "runs"
    runs.mkdir()
    shutil.copytree(sample_run_dir("digits"), runs / "shared-run")  # the operator's run: no owner
    port = free_port()
    secrets = home / "secrets.toml"
    secrets.write_text(f"""[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "a-test-cookie-secret-that-is-long-enough"
client_id = "dashboard"
client_secret = "any"
server_metadata_url = "{provider}/.well-known/openid-configuration"
""")
    with launched_dashboard(["--runs-dir", str(runs), "--secrets", str(secrets)], cwd=home, port=port) as port:
        yield f"http://127.0.0.1:{port}", runs



def _sign_in(browser, url: str, subject: str):
    """A fresh browser (its own cookies) signed in as `subject` through the provider's form."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.get_by_role("button", name="Sign in").click(timeout=60_000)
    page.get_by_role("button", name=subject, exact=True).click(timeout=30_000)  # the provider's one-click user
    page.get_by_text("Signed in as").wait_for(timeout=60_000)
    _wait_until_idle(page)
    return page


def test_sign_in_owner_and_view_policy_end_to_end(signed_in_app, browser):
    url, runs = signed_in_app
    page = browser.new_context().new_page()
    page.goto(url)
    page.get_by_role("button", name="Sign in").wait_for(timeout=60_000)
    assert "shared-run" not in page.content()  # nothing of any run before sign-in
    page.close()

    ben = _sign_in(browser, url, "ben-2")
    assert ben.get_by_text(re.compile("Signed in as ben\u2060?@example.org")).count() == 1
    ben.goto(f"{url}/load")
    ben.get_by_role("heading", name="Load").wait_for(timeout=60_000)
    _wait_until_idle(ben)
    # the name is filled in once the page has chosen its sample: waited for, not read at once (a busy machine
    # read it empty in CI)
    from playwright.sync_api import expect

    expect(ben.get_by_label("Run name").first).to_have_value("sample-digits-ben", timeout=60_000)
    _current(ben, RUN_BUTTON).click()
    ben.get_by_text("is ready").wait_for(timeout=180_000)
    _no_exception(ben)
    owner = json.loads((runs / "sample-digits-ben" / "run.json").read_text())["owner"]
    assert owner["id"].endswith("|ben-2") and owner["name"] == "ben@example.org", owner

    ana = _sign_in(browser, url, "ana-1")
    # the email is text, not a mailto link (Streamlit's renderer links bare emails; dashboard.text.md stops it)
    assert ana.get_by_text("Signed in as").count() == 1 and ana.locator('a[href^="mailto"]').count() == 0
    ana.goto(f"{url}/?run=sample-digits-ben")
    ana.get_by_text("There is no run called").wait_for(timeout=60_000)
    _wait_until_idle(ana)
    picker = ana.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]')
    assert ana.url.endswith("?run=shared-run")  # shown instead: the link named a run Ana may not see
    picker.click()  # the run picker offers the operator's run, and not Ben's
    options = ana.get_by_role("option")
    options.first.wait_for(timeout=30_000)
    assert sorted(options.all_inner_texts()) == ["shared-run"]
    _no_exception(ana)
