"""Uploads: safe names, no overwrites between users, a full workspace refuses and evicts nothing; Streamlit config."""
from __future__ import annotations

import hashlib
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
    for path, content in ((first, b"one"), (second, b"two")):
        assert path.parent == tmp_path / "uploads" and path.name == hashlib.sha256(content).hexdigest() + ".pt2"


def test_the_same_bytes_are_stored_once_under_any_name_and_the_cap_counts_unique_bytes(tmp_path):
    ws = Workspace(tmp_path, max_bytes=300)
    first = ws.store("data.npz", b"x" * 100)
    for name in ("data.npz", "copy of data.NPZ", "../other/data.npz"):  # repeated clicks, renamed copies
        assert ws.store(name, b"x" * 100) == first
    assert ws.used_bytes() == 100 and ws.files() == [first]
    second = ws.store("other.npz", b"y" * 100)  # fits: only unique bytes count against the cap
    assert ws.used_bytes() == 200 and second != first
    assert ws.store("data.csv", b"x" * 100).suffix == ".csv" != first.suffix  # the extension picks the loader


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
