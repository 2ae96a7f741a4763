"""Uploads: safe names, no overwrites between users, a full workspace refuses and evicts nothing; Streamlit config."""
from __future__ import annotations

import threading
import tomllib

import pytest

from analyzers import AnalyzerError
from analyzers.loading.workspace import Workspace, safe_filename
from tests.conftest import ROOT


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\x\\model.pt2", "model.pt2"),
    (".hidden.npz", "hidden.npz"),
    ("my model (final).pt2", "my_model_final_.pt2"),
    ("", "upload"),
    ("..", "upload"),
])
def test_safe_filename(name, expected):
    assert safe_filename(name) == expected


def test_same_name_twice_is_stored_twice_and_inside_the_workspace(tmp_path):
    ws = Workspace(tmp_path)
    first = ws.store("../model.pt2", b"one")
    second = ws.store("../model.pt2", b"two")
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"
    for path in (first, second):
        assert path.parent == tmp_path / "uploads" and path.name.endswith("-model.pt2")


def test_concurrent_uploads_never_overwrite_each_other(tmp_path):
    ws = Workspace(tmp_path)
    stored = []
    threads = [threading.Thread(target=lambda i=i: stored.append((i, ws.store("data.npz", bytes([i]) * 10))))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p for _, p in stored}) == 16
    assert all(p.read_bytes() == bytes([i]) * 10 for i, p in stored)


def test_full_workspace_refuses_new_uploads_and_keeps_the_old(tmp_path):
    ws = Workspace(tmp_path, max_bytes=100)
    kept = ws.store("a.npz", b"x" * 60)
    with pytest.raises(AnalyzerError, match=r"upload workspace is full .*delete old runs or uploads"):
        ws.store("b.npz", b"y" * 60)
    assert kept.read_bytes() == b"x" * 60 and ws.files() == [kept]


def test_empty_upload_is_refused(tmp_path):
    with pytest.raises(AnalyzerError, match="is empty"):
        Workspace(tmp_path).store("a.npz", b"")


def test_streamlit_config_keeps_xsrf_on_and_caps_uploads():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["enableXsrfProtection"] is True
    assert 0 < config["server"]["maxUploadSize"] <= 1024
