"""The dashboard's launcher: `python -m dashboard.serve --runs-dir runs [--run RUN] [--port 8501] [--address ADDR]
[--allowed-host NAME ...] [--secrets FILE] [--view-policy owner|signed-in]`.

It serves `dashboard/app.py` with its own settings, so how the server is exposed never depends on the directory it
starts in (`streamlit run` reads `.streamlit/config.toml` from the working directory only):
- it binds 127.0.0.1 unless told otherwise;
- a request whose Host header is not on the allow-list is refused with 400 (DNS rebinding: a web page on another
  name that resolves to this machine could otherwise drive the UI), for HTTP and WebSocket alike;
- every response forbids embedding the page in a frame (clickjacking);
- XSRF protection stays on, CORS is restricted, uploads are capped;
- sign-in (OIDC, `st.login`) is on when the `--secrets` file has an `[auth]` section (dashboard.access).
For a team, put it behind a reverse proxy with TLS and authentication (README: Deployment for a team).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
FRAME_HEADERS = ((b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"))


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names an allowed host (its port ignored; `*.example.com` allows subdomains)."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8501
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class GuardMiddleware:
    """ASGI middleware: refuse a Host that is not allowed (HTTP 400, or a closed WebSocket), and add the frame
    headers to every HTTP response."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed_hosts = app, tuple(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"Host not allowed: add it with --allowed-host\n"
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                                    *FRAME_HEADERS]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *FRAME_HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dashboard.serve", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--address", default="127.0.0.1", help="the address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name the browser uses to reach the dashboard (repeatable; default: localhost, "
                             "127.0.0.1, ::1; '*.example.com' allows subdomains)")
    parser.add_argument("--max-upload-mb-per-file", type=int, default=200)
    # the dashboard's own settings (dashboard.settings) are read from the same command line
    parser.add_argument("--runs-dir")
    parser.add_argument("--run")
    parser.add_argument("--workspace")
    parser.add_argument("--max-upload-mb", type=int)
    parser.add_argument("--view-policy", choices=("owner", "signed-in"),
                        help="with sign-in on: who sees a run (default owner: its owner; signed-in: everyone)")
    parser.add_argument("--secrets", default=str(Path.home() / ".streamlit" / "secrets.toml"),
                        help="the secrets.toml whose [auth] section turns on sign-in (default ~/.streamlit/"
                             "secrets.toml; never one in the working directory)")
    return parser.parse_args(argv)


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.allowed_host) or DEFAULT_HOSTS


def server_config(args: argparse.Namespace) -> dict:
    hosts = allowed_hosts(args)
    return {"server.address": args.address, "server.port": args.port, "server.headless": True,
            "server.fileWatcherType": "none",
            "server.enableXsrfProtection": True, "server.enableCORS": True, "server.allowedHosts": list(hosts),
            "server.maxUploadSize": args.max_upload_mb_per_file, "server.maxMessageSize": 200,
            "secrets.files": [args.secrets],
            "browser.gatherUsageStats": False, "client.showErrorDetails": "none", "client.toolbarMode": "minimal"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from starlette.middleware import Middleware
    from streamlit.web.server.starlette.starlette_app import App

    App(str(APP), middleware=[Middleware(GuardMiddleware, allowed_hosts=allowed_hosts(args))]).run(
        config=server_config(args))


if __name__ == "__main__":
    main()
