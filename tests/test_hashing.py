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


def test_digest_file_gives_hashlibs_digest_and_zlibs_crcs_of_its_ranges_in_one_read(tmp_path, monkeypatch):
    """Ranges that start and end inside chunks, span several, touch the file's ends, and are empty; the digest is
    then remembered, so sha256_file does not read the file again."""
    import random
    import zlib

    from analyzers.loading.hashing import digest_file

    calls = _reads(monkeypatch)
    data = os.urandom(1_000_003)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    rng = random.Random(0)
    ranges = [(0, len(data)), (0, 1), (len(data) - 5, 5), (4095, 2), (12_345, 0), (99_999, 500_000)]
    ranges += [(a, rng.randrange(0, len(data) - a)) for a in (rng.randrange(len(data)) for _ in range(20))]
    for chunk in (4096, 65_536, 1 << 22):
        digest, crcs = digest_file(path, crc_ranges=ranges, chunk_bytes=chunk)
        assert digest == hashlib.sha256(data).hexdigest()
        assert list(crcs) == [zlib.crc32(data[a:a + n]) for a, n in ranges]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest() and calls == []


def test_digest_file_reads_nothing_while_its_gate_is_closed(tmp_path):
    """A run closes the gate during inference: the hash waits, and ends once it is opened again."""
    from analyzers.loading.hashing import digest_file

    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 20))
    gate, results = threading.Event(), []
    thread = threading.Thread(target=lambda: results.append(digest_file(path, gate=gate, chunk_bytes=4096)))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and results == []
    gate.set()
    thread.join(30)
    assert results and results[0][0] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_file_refuses_a_file_changed_while_it_was_read_and_stops_when_asked(tmp_path):
    """The file is written in place once the read has begun (it waits at its gate); and a read asked to stop
    ends at its next chunk."""
    from analyzers.loading.hashing import digest_file

    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 16))

    class Gate:  # says when the read has reached it, then holds it until opened
        def __init__(self):
            self.reached, self.opened = threading.Event(), threading.Event()

        def wait(self):
            self.reached.set()
            self.opened.wait()

    for stop in (None, threading.Event()):
        gate, failures = Gate(), []

        def read():
            try:
                digest_file(path, gate=gate, stop=stop, chunk_bytes=4096)
            except OSError as exc:
                failures.append(str(exc))

        thread = threading.Thread(target=read)
        thread.start()
        assert gate.reached.wait(30)
        if stop is None:
            with open(path, "r+b") as fh:  # in place, while the read waits at its gate
                fh.write(os.urandom(10))
            os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
        else:
            stop.set()
        gate.opened.set()
        thread.join(30)
        assert failures == (["data.bin changed while it was hashed"] if stop is None
                            else ["the hash of data.bin was stopped"])
