"""Content hashes that identify an uploaded or stored file (models, datasets, uploads); torch-free."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
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


def _fingerprint(path: str | Path) -> tuple:
    info = os.stat(path)
    return (str(Path(path).resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _hash_stream(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex), read once per process while the file stays as stat last saw it."""
    key = _fingerprint(path)
    with _DIGESTS_LOCK:
        pending = _DIGESTS.get(key)
        mine = pending is None
        if mine:
            pending = _DIGESTS[key] = concurrent.futures.Future()
            while len(_DIGESTS) > _DIGESTS_KEPT:  # the oldest first (dicts keep insertion order)
                _DIGESTS.pop(next(iter(_DIGESTS)))
    if not mine:
        return pending.result()
    try:
        digest = _hash_stream(path)
        if _fingerprint(path) != key:  # written while it was read: this digest names no stable content
            raise OSError(f"{Path(path).name} changed while it was hashed")
    except BaseException as exc:
        with _DIGESTS_LOCK:
            _DIGESTS.pop(key, None)
        pending.set_exception(exc)
        raise
    pending.set_result(digest)
    return digest


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
