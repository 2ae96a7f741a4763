"""Served safely wherever it starts (issue 19, item 10): the launcher binds 127.0.0.1 whatever the working directory,
refuses a Host that is not allowed (HTTP and WebSocket: DNS rebinding), and forbids framing on every response."""
from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dashboard.serve import DEFAULT_HOSTS, host_allowed, parse_args, server_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("header, allowed, expected", [
    ("localhost:8501", DEFAULT_HOSTS, True),
    ("127.0.0.1:8501", DEFAULT_HOSTS, True),
    ("[::1]:8501", DEFAULT_HOSTS, True),
    ("LOCALHOST", DEFAULT_HOSTS, True),
    ("evil.example:8501", DEFAULT_HOSTS, False),
    ("localhost.evil.example", DEFAULT_HOSTS, False),
    ("127.0.0.1.nip.io:8501", DEFAULT_HOSTS, False),  # a rebinding name that resolves to 127.0.0.1
    ("", DEFAULT_HOSTS, False),
    ("app.team.example", ("*.team.example",), True),
    ("team.example.evil", ("*.team.example",), False),
])
def test_host_allow_list(header, allowed, expected):
    assert host_allowed(header, allowed) is expected


def test_launcher_settings_do_not_depend_on_the_working_directory():
    config = server_config(parse_args(["--runs-dir", "runs"]))
    assert config["server.address"] == "127.0.0.1" and config["server.enableXsrfProtection"] is True
    assert config["server.allowedHosts"] == list(DEFAULT_HOSTS) and config["server.enableCORS"] is True


def _request(url: str, host: str | None = None):
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The launcher started from a directory with a hostile .streamlit/config.toml (bind 0.0.0.0, XSRF off)."""
    from conftest import launched_dashboard

    cwd = tmp_path_factory.mktemp("elsewhere")
    (cwd / ".streamlit").mkdir()
    (cwd / ".streamlit" / "config.toml").write_text('[server]\naddress = "0.0.0.0"\nenableXsrfProtection = false\n')
    with launched_dashboard(["--runs-dir", str(cwd / "runs")], cwd=cwd) as port:
        yield port


def test_allowed_host_is_served_with_frame_headers(served):
    for path in ("/_stcore/health", "/"):
        status, headers = _request(f"http://127.0.0.1:{served}{path}")
        assert status == 200
        assert headers.get("x-frame-options") == "DENY"
        assert "frame-ancestors 'none'" in headers.get("content-security-policy", "")
    assert "_streamlit_xsrf" in _request(f"http://127.0.0.1:{served}/_stcore/health")[1].get("set-cookie", "")


def test_foreign_host_is_refused_over_http(served):
    status, headers = _request(f"http://127.0.0.1:{served}/", host=f"evil.example:{served}")
    assert status == 400 and "set-cookie" not in {k.lower() for k in headers}  # no XSRF cookie for it either


def _websocket_handshake(port: int, host: str) -> str:
    """The status line a WebSocket upgrade to Streamlit's stream gets, sent by hand so the Host header is ours."""
    request = (f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: streamlit\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(1024)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode("latin-1")


def test_foreign_host_gets_no_websocket(served):
    assert " 101 " in _websocket_handshake(served, f"127.0.0.1:{served}")  # the same request with an allowed Host
    refused = _websocket_handshake(served, f"evil.example:{served}")
    assert " 101 " not in refused, refused


def test_bound_to_loopback_only_despite_the_working_directory_config(served):
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    addresses -= {"127.0.0.1"}
    addresses |= {a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
                  if "." in a and not a.startswith("127.")}
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, served), timeout=2).close()
