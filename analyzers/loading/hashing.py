"""Content hashes that identify an uploaded or stored file (models, datasets, uploads); torch-free."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import zlib
from pathlib import Path

# Digests of files hashed in this process, by what stat says of the file (device, inode, size, modification time
# in ns): the dashboard reopens a run's 1.2 GB dataset once per model load, 0.8 s of hashing each time. A file
# rewritten in place changes its size or mtime, and is hashed again. Pending hashes are shared: a second caller
# waits for the first instead of reading the file again (`prefetch_sha256_file` starts one early).
_DIGESTS: dict = {}
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_KEPT = 64


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_fingerprint(path: str | Path) -> tuple:
    """What says a file is unchanged: its resolved path, device, inode, size and modification time (ns)."""
    info = os.stat(path)
    return (str(Path(path).resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _hash_stream(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _keep_few_locked() -> None:
    """Drop the oldest digests beyond `_DIGESTS_KEPT` (dicts keep insertion order); the caller holds the lock."""
    while len(_DIGESTS) > _DIGESTS_KEPT:
        _DIGESTS.pop(next(iter(_DIGESTS)))


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex), read once per process while the file stays as stat last saw it."""
    key = file_fingerprint(path)
    with _DIGESTS_LOCK:
        pending = _DIGESTS.get(key)
        mine = pending is None
        if mine:
            pending = _DIGESTS[key] = concurrent.futures.Future()
            _keep_few_locked()
    if not mine:
        return pending.result()
    try:
        digest = _hash_stream(path)
        if file_fingerprint(path) != key:  # written while it was read: this digest names no stable content
            raise OSError(f"{Path(path).name} changed while it was hashed")
    except BaseException as exc:
        with _DIGESTS_LOCK:
            _DIGESTS.pop(key, None)
        pending.set_exception(exc)
        raise
    pending.set_result(digest)
    return digest


def digest_file(path: str | Path, *, crc_ranges=(), gate: threading.Event | None = None,
                stop: threading.Event | None = None, chunk_bytes: int = 4 << 20) -> tuple[str, tuple]:
    """The SHA-256 (hex) of the file at `path` and the CRC-32 of each `(start, length)` byte range of it, in one
    read. `gate` is waited on before each chunk: a run closes it while its inference uses every core, so that
    the hash goes on only beside the rest (on 2 cores a hash beside the forward pass slowed it by twice the hash's
    own time). `stop`, once set, ends the read with InterruptedError (a run that failed no longer needs it). The
    digest is then remembered as `sha256_file`'s is; a file that changed while it was read raises OSError, as
    there."""
    key = file_fingerprint(path)
    digest = hashlib.sha256()
    crcs = [0] * len(crc_ranges)
    at = 0
    with open(path, "rb") as fh:
        while True:
            if gate is not None:
                gate.wait()
            if stop is not None and stop.is_set():
                raise InterruptedError(f"the hash of {Path(path).name} was stopped")
            chunk = fh.read(chunk_bytes)
            if not chunk:
                break
            digest.update(chunk)
            view = memoryview(chunk)
            for i, (start, length) in enumerate(crc_ranges):
                lo, hi = max(start, at), min(start + length, at + len(chunk))
                if lo < hi:
                    crcs[i] = zlib.crc32(view[lo - at:hi - at], crcs[i])
            at += len(chunk)
    if file_fingerprint(path) != key:
        raise OSError(f"{Path(path).name} changed while it was hashed")
    done = concurrent.futures.Future()
    done.set_result(digest.hexdigest())
    with _DIGESTS_LOCK:
        _DIGESTS.setdefault(key, done)
        _keep_few_locked()
    return digest.hexdigest(), tuple(crcs)


def forget_digests() -> None:
    """Forget every digest computed so far (the next `sha256_file` of a file reads it again): what a benchmark
    calls to count a run's hashing, as a fresh process would pay it."""
    with _DIGESTS_LOCK:
        _DIGESTS.clear()


def prefetch_sha256_file(path: str | Path) -> None:
    """Start hashing `path` in a background thread (nothing if it is not a file), so that a later `sha256_file` of
    it finds the digest ready or under way: hashlib releases the GIL, so it overlaps imports and model loading."""
    try:
        if not Path(path).is_file():
            return
    except (OSError, ValueError):
        return

    def run():
        try:
            sha256_file(path)
        except Exception:  # noqa: BLE001 - the caller's own sha256_file raises it again, where it is reported
            pass

    threading.Thread(target=run, name="prefetch-hash", daemon=True).start()
