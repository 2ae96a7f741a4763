"""Sign-in for a team server (issue 19, item 12): with `[auth]` in the secrets, a person sees only the runs the view
policy gives them, and only a run's owner replaces or deletes it. `st.user` is faked through AppTest.user."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_dashboard_app import _app, _ok, _plain

AUTH = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "not-a-real-secret-0123456789",
        "client_id": "dashboard", "client_secret": "not-a-real-secret",
        "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
ISSUER = "http://127.0.0.1:9"
ANA = {"is_logged_in": True, "iss": ISSUER, "sub": "ana-1", "email": "ana@example.org", "name": "Ana"}
BEN = {"is_logged_in": True, "iss": ISSUER, "sub": "ben-2", "email": "ben@example.org", "name": "Ben"}


def _owner(user: dict) -> dict:
    return {"id": f"{user['iss']}|{user['sub']}", "name": user["email"]}


@pytest.fixture
def team_runs(sample_run_dir, tmp_path) -> Path:
    """ana-run (Ana's), ben-run (Ben's) and shared-run (made by the operator: no owner)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, owner in (("ana-run", _owner(ANA)), ("ben-run", _owner(BEN)), ("shared-run", None)):
        shutil.copytree(sample_run_dir("digits"), runs / name)
        info = json.loads((runs / name / "run.json").read_text())
        info["owner"] = owner
        (runs / name / "run.json").write_text(json.dumps(info))
    return runs


def _signed_in(monkeypatch, runs: Path, user: dict | None, *, policy: str = "owner", page: str | None = None,
               **query):
    monkeypatch.setenv("DASHBOARD_VIEW_POLICY", policy)
    at = _app(monkeypatch, runs, **query)
    at.secrets["auth"] = dict(AUTH)
    at.user = dict(user) if user is not None else {"is_logged_in": False}
    if page is not None:
        at.switch_page(f"views/{page}.py")
    return at


def _everything(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "title", "subheader", "info", "warning", "error",
                                  "success") for e in getattr(at, kind)]
    parts += [str(o) for box in at.selectbox for o in box.options]
    parts += [b.label for b in at.button]
    return _plain("\n".join(str(p) for p in parts))


def _sidebar_runs(at) -> list:
    return list(at.selectbox(key="sidebar-run").options)


def test_without_auth_settings_everyone_sees_every_run(monkeypatch, team_runs):
    at = _app(monkeypatch, team_runs)
    at.run()
    _ok(at)
    assert sorted(_sidebar_runs(at)) == ["ana-run", "ben-run", "shared-run"]


def test_a_person_not_signed_in_sees_only_the_sign_in(monkeypatch, team_runs):
    for page in (None, "load", "explain"):
        at = _signed_in(monkeypatch, team_runs, None, page=page, run="ana-run")
        at.run()
        _ok(at)
        text = _everything(at)
        assert [b.label for b in at.button] == ["Sign in"], text
        assert "ana-run" not in text and "ben-run" not in text and "shared-run" not in text
        assert not at.selectbox and not at.dataframe


def test_named_providers_each_get_a_button(monkeypatch, team_runs):
    at = _signed_in(monkeypatch, team_runs, None)
    at.secrets["auth"] = {**AUTH, "google": {"client_id": "g"}, "okta": {"client_id": "o"}}
    at.run()
    assert sorted(b.label for b in at.button) == ["Sign in with google", "Sign in with okta"]


def test_owner_policy_shows_each_person_their_runs_and_the_operators(monkeypatch, team_runs):
    at = _signed_in(monkeypatch, team_runs, ANA)
    at.run()
    _ok(at)
    assert sorted(_sidebar_runs(at)) == ["ana-run", "shared-run"]
    assert "Signed in as ana@example.org" in _everything(at)
    # a link to Ben's run says there is no such run and shows none of it
    at = _signed_in(monkeypatch, team_runs, ANA, page="confusion", run="ben-run")
    at.run()
    _ok(at)
    assert "There is no run called 'ben-run'" in _plain(at.warning[0].value)
    assert at.selectbox(key="sidebar-run").value != "ben-run"
    # the Load page lists the same two, with their owners
    at = _signed_in(monkeypatch, team_runs, BEN, page="load")
    at.run()
    listing = at.dataframe(key="runs-table").value
    assert sorted(listing["run"]) == ["ben-run", "shared-run"]
    assert dict(zip(listing["run"], listing["owner"])) == {"ben-run": "ben@example.org",
                                                           "shared-run": "operator (command line)"}


def test_signed_in_policy_shows_everyone_every_run(monkeypatch, team_runs):
    at = _signed_in(monkeypatch, team_runs, BEN, policy="signed-in")
    at.run()
    _ok(at)
    assert sorted(_sidebar_runs(at)) == ["ana-run", "ben-run", "shared-run"]


def _select_stored_run(at, name: str):
    listing = at.dataframe(key="runs-table").value
    at.session_state["runs-table"] = {"selection": {"rows": [list(listing["run"]).index(name)], "columns": []}}
    return at.run()


@pytest.mark.parametrize("target, refusal", [("ben-run", "belongs to someone else"),
                                             ("shared-run", "made by the operator on the command line")])
def test_only_the_owner_may_delete_a_run(monkeypatch, team_runs, target, refusal):
    before = (team_runs / target / "run.json").read_bytes()
    at = _signed_in(monkeypatch, team_runs, ANA, policy="signed-in", page="load")
    at.run()
    _select_stored_run(at, target)
    _ok(at)
    assert at.button(key="runs-delete").disabled
    assert refusal in _everything(at)
    assert not [c for c in at.checkbox if c.key == f"runs-confirm-{target}"]
    # a crafted client that presses the disabled button anyway deletes nothing (Streamlit drops the press, and the
    # page checks the owner again before it deletes)
    pressed = at.button(key="runs-delete")
    pressed.proto.disabled = False
    pressed.click().run()
    assert not at.success and (team_runs / target / "run.json").read_bytes() == before
    # the owner may delete her own
    _select_stored_run(at, "ana-run")
    assert not [e for e in at.error]
    at.checkbox(key="runs-confirm-ana-run").check().run()
    at.button(key="runs-delete").click().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert not (team_runs / "ana-run").exists() and (team_runs / target).exists()


@pytest.mark.parametrize("target, refusal", [("ben-run", "belongs to someone else"),
                                             ("shared-run", "made by the operator on the command line")])
def test_no_one_replaces_a_run_they_do_not_own(monkeypatch, team_runs, target, refusal):
    """The built-in sample's Run, with Replace ticked, replaces a run of its name: refused for a name another
    person's run holds, which is left exactly as it was."""
    before = {p.name: p.read_bytes() for p in (team_runs / target).iterdir() if p.is_file()}
    at = _signed_in(monkeypatch, team_runs, ANA, page="load")
    at.run()
    at.text_input(key="load-sample-name-digits").set_value(target)
    at.checkbox(key="load-sample-overwrite").check()
    at.button(key="load-run-sample").click().run()
    _ok(at)
    assert len(at.error) == 1 and refusal in _plain(at.error[0].value), [e.value for e in at.error]
    assert {p.name: p.read_bytes() for p in (team_runs / target).iterdir() if p.is_file()} == before


def test_a_run_made_from_the_dashboard_records_its_owner(monkeypatch, team_runs):
    at = _signed_in(monkeypatch, team_runs, BEN, page="load")
    at.run()
    assert at.text_input(key="load-sample-name-digits").value == "sample-digits-ben"  # no clash with the operator's runs
    at.button(key="load-run-sample").click().run()
    _ok(at)
    info = json.loads((team_runs / "sample-digits-ben" / "run.json").read_text())
    assert info["owner"] == _owner(BEN)
    # Ana (owner policy) does not see it; Ben does
    at = _signed_in(monkeypatch, team_runs, ANA)
    at.run()
    assert "sample-digits-ben" not in _sidebar_runs(at)
    at = _signed_in(monkeypatch, team_runs, BEN)
    at.run()
    assert "sample-digits-ben" in _sidebar_runs(at)


def test_an_identity_without_subject_or_email_is_refused(monkeypatch, team_runs):
    at = _signed_in(monkeypatch, team_runs, {"is_logged_in": True, "name": "Nobody"})
    at.run()
    _ok(at)
    assert "did not say who you are" in _plain(at.error[0].value)
    assert not at.selectbox


def test_an_owner_record_that_is_not_text_marks_the_run_damaged(tmp_path, sample_run_dir):
    from analyzers.errors import AnalyzerError
    from analyzers.loading.runs import open_run

    run = tmp_path / "run"
    shutil.copytree(sample_run_dir("digits"), run)
    info = json.loads((run / "run.json").read_text())
    info["owner"] = {"id": 7}
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(AnalyzerError, match="owner.'id' is not a string"):
        open_run(run)


def test_the_launcher_reads_secrets_from_its_own_setting_only(tmp_path):
    from dashboard.serve import parse_args, server_config

    secrets = tmp_path / "secrets.toml"
    assert server_config(parse_args(["--secrets", str(secrets)]))["secrets.files"] == [str(secrets)]
    assert server_config(parse_args([]))["secrets.files"] == [str(Path.home() / ".streamlit" / "secrets.toml")]
    with pytest.raises(SystemExit):
        parse_args(["--view-policy", "everyone"])
