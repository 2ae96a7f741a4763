"""A size-limited folder for uploaded files, stored once per content: nothing overwritten, nothing evicted.

An upload is stored as `<sha256 of its bytes><its extension>` (the extension picks the loader). A repeated Run click,
or the same file under another name, reuses the stored copy, so the workspace's cap counts unique bytes; two users
uploading different files called `model.pt2` get two names, and two uploading the same bytes share one read-only
copy. Each copy is written to a private temporary name and renamed into place, so a reader never sees half a file.
When the workspace would exceed its limit a new upload is refused; stored files are never deleted to make room.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path

from ..errors import AnalyzerError
from .runs import disk_errors_as_one_line

DEFAULT_MAX_BYTES = 2 << 30
MAX_NAME_CHARS = 80
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """The last path component of `name`, reduced to letters, digits, '.', '_' and '-', never hidden or empty."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = _SAFE.sub("_", base).lstrip(".")
    if not base:
        base = "upload"
    stem, dot, suffix = base.rpartition(".")
    if dot and len(suffix) <= 12:
        return stem[: MAX_NAME_CHARS - len(suffix) - 1] + "." + suffix
    return base[:MAX_NAME_CHARS]


class Workspace:
    """Uploads stored under `root`, at most `max_bytes` in total."""

    def __init__(self, root: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise AnalyzerError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.uploads = self.root / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.uploads.iterdir() if p.is_file())

    def store(self, filename: str, data: bytes) -> Path:
        """The path of `data` in the workspace: the stored copy if these bytes (with this extension) are there
        already, else a new one; a new one is refused if the workspace would be over its limit."""
        if not data:
            raise AnalyzerError(f"{filename!r} is empty: upload the file again")
        stem, dot, suffix = safe_filename(filename).rpartition(".")
        target = self.uploads / (hashlib.sha256(data).hexdigest() + (f".{suffix.lower()}" if dot and stem else ""))
        with self._lock:
            if target.is_file() and target.stat().st_size == len(data):
                return target  # the same bytes: stored once (written whole by the rename below, so complete)
            used = self.used_bytes()
            if used + len(data) > self.max_bytes:
                raise AnalyzerError(
                    f"the upload workspace is full ({used / 1e6:.1f} MB of {self.max_bytes / 1e6:.1f} MB used; "
                    f"{filename!r} needs {len(data) / 1e6:.1f} MB): delete old runs or uploads, or raise the limit")
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                with disk_errors_as_one_line(self.uploads, f"{filename!r} was not stored: free some space or set "
                                                           f"another --workspace"):
                    with open(tmp, "xb") as fh:
                        fh.write(data)
                    os.chmod(tmp, 0o444)  # a stored upload is never changed: runs name it by its hash
                    os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)  # only left when the write failed
        return target

    def files(self) -> list[Path]:
        return sorted((p for p in self.uploads.iterdir() if p.is_file() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
