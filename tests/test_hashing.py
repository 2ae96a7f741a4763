"""analyzers.loading.hashing: a file's SHA-256 against hashlib's, read once while the file stays the same."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest

from analyzers.loading import hashing
from analyzers.loading.hashing import prefetch_sha256_file, sha256_file


def _reads(monkeypatch) -> list:
    calls = []
    real = hashing._hash_stream

    def counted(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(hashing, "_hash_stream", counted)
    return calls


def test_the_digest_is_hashlibs_and_a_file_unchanged_is_read_once(tmp_path, monkeypatch):
    calls = _reads(monkeypatch)
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()  # a str names the same file
    assert len(calls) == 1


def test_a_file_rewritten_is_hashed_again(tmp_path, monkeypatch):
    calls = _reads(monkeypatch)
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 1000)
    first = sha256_file(path)
    path.write_bytes(b"b" * 1000)  # the same size: its mtime moves
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert sha256_file(path) == hashlib.sha256(b"b" * 1000).hexdigest() != first
    assert len(calls) == 2


def test_callers_at_once_share_one_read_and_a_prefetch_is_that_read(tmp_path, monkeypatch):
    calls = _reads(monkeypatch)
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(8 << 20))
    prefetch_sha256_file(path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(sha256_file(path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [hashlib.sha256(path.read_bytes()).hexdigest()] * 4 and len(calls) == 1
    prefetch_sha256_file(tmp_path / "missing.bin")  # not a file: nothing to start, nothing raised


def test_a_missing_file_raises_and_is_not_remembered(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing.bin")
    (tmp_path / "missing.bin").write_bytes(b"now")
    assert sha256_file(tmp_path / "missing.bin") == hashlib.sha256(b"now").hexdigest()
