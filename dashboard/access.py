"""Who may see and change which runs: Streamlit's OIDC sign-in (`st.login`), on when secrets.toml has `[auth]`.

With sign-in off (no `[auth]`, the default on one's own machine) everyone who reaches the server may do everything,
as before. With it on:
- every page asks for sign-in first, and names the person signed in;
- a run made from the dashboard records its owner in run.json (`owner`: the provider's issuer and subject, which
  stay the same for one account, and the email or name to show);
- deleting a run, and replacing one (the Load page's "Replace a run of this name", and a built-in sample's Run,
  which replaces its earlier run), are for its owner only;
- viewing follows `--view-policy` (dashboard.settings): "owner", the default, shows each person their own runs;
  "signed-in" shows every run to everyone signed in;
- runs without an owner were made by the operator on the command line (`make run`, `python -m analyzers run`):
  everyone signed in sees them, and only the operator changes them, on the command line.
A run someone may see, they may also add cached analyses to (explanations, projections, layers): those are computed
from the run and never replace what it holds.
"""
from __future__ import annotations

import re

import streamlit as st

from .text import md


def _auth_section() -> dict | None:
    try:
        section = st.secrets.get("auth")
    except Exception:  # no secrets file, or one that does not parse: sign-in stays off, as Streamlit itself does
        return None
    return section if hasattr(section, "keys") else None


def enabled() -> bool:
    """Whether sign-in is configured (an `[auth]` section in the secrets)."""
    return _auth_section() is not None


def providers() -> list[str | None]:
    """The providers to offer: the named `[auth.NAME]` sections, else the unnamed `[auth]` provider (None)."""
    section = _auth_section() or {}
    named = [name for name in section.keys() if hasattr(section[name], "keys")]
    return named or [None]


def current_user() -> dict | None:
    """The signed-in person as an owner record (`{"id", "name"}`), or None when no one is signed in or sign-in is off.

    The id is the issuer and subject of the identity token: an email can be renamed or reused, a subject cannot."""
    if not enabled() or not st.user.get("is_logged_in"):
        return None
    subject, issuer = st.user.get("sub"), st.user.get("iss")
    if subject:
        identity = f"{issuer or ''}|{subject}"
    elif st.user.get("email"):
        identity = f"email|{st.user.get('email')}"
    else:
        return None
    return {"id": identity, "name": str(st.user.get("email") or st.user.get("name") or subject)}


def require_sign_in() -> None:
    """With sign-in on, a person who is not signed in sees only the sign-in buttons (nothing of any run)."""
    if not enabled():
        return
    if current_user() is None:
        st.title("Model debugger")
        if st.user.get("is_logged_in"):
            st.error("Your sign-in did not say who you are (no subject or email in the identity token): ask the "
                     "operator to check the provider's scopes.")
            st.button("Sign out", on_click=st.logout, key="access-sign-out")
        else:
            st.info("This dashboard is shared: sign in to see your runs.")
            for provider in providers():
                label = "Sign in" if provider is None else f"Sign in with {md(provider)}"
                st.button(label, type="primary", key=f"access-sign-in-{provider}",
                          on_click=st.login, args=() if provider is None else (provider,))
        st.stop()


def sign_out_control() -> None:
    """In the sidebar: who is signed in, and a way out."""
    user = current_user()
    if user is not None:
        st.caption(f"Signed in as {md(user['name'])}")
        st.button("Sign out", on_click=st.logout, key="access-sidebar-sign-out")


def _owner_id(owner) -> str | None:
    return owner.get("id") if isinstance(owner, dict) and isinstance(owner.get("id"), str) else None


def may_view(owner, view_policy: str) -> bool:
    """Whether the current person may see a run owned by `owner` (run.json's `owner`; None: the operator's)."""
    if not enabled():
        return True
    user = current_user()
    if user is None:
        return False
    return view_policy == "signed-in" or _owner_id(owner) in (None, user["id"])


def may_change(owner) -> bool:
    """Whether the current person may replace or delete a run owned by `owner`. With sign-in off, anyone may."""
    if not enabled():
        return True
    user = current_user()
    return user is not None and _owner_id(owner) == user["id"]


def change_refusal(name: str, owner) -> str:
    """The one line (plain text: the page escapes it) that says why a run cannot be replaced or deleted here, and
    what to do instead."""
    if _owner_id(owner) is None:
        return (f"the run {name} was made by the operator on the command line: only they can replace or delete "
                f"it; choose another run name")
    return f"the run {name} belongs to someone else: only they can replace or delete it; choose another run name"


def name_suffix() -> str:
    """A short, URL-safe tag of the person signed in ("ana" for ana@example.org), for default run names that do not
    collide with the operator's or a colleague's; "" with sign-in off."""
    user = current_user()
    if user is None:
        return ""
    tag = re.sub(r"[^A-Za-z0-9]+", "-", user["name"].split("@", 1)[0]).strip("-")[:24]
    return f"-{tag}" if tag else ""
