"""A size-limited folder for uploaded files: safe unique names, nothing overwritten, nothing evicted.

Every upload is stored under a fresh name (`<sha256 prefix>-<random>-<sanitised original name>`) with an exclusive
create, so two users uploading `model.pt2` at once never overwrite each other. When the workspace would exceed its
limit the new upload is refused; stored files are never deleted to make room.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path

from ..errors import AnalyzerError

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
        """Write `data` under a new safe name and return its path; refuse if the workspace would be over its limit."""
        if not data:
            raise AnalyzerError(f"{filename!r} is empty: upload the file again")
        digest = hashlib.sha256(data).hexdigest()[:12]
        with self._lock:
            used = self.used_bytes()
            if used + len(data) > self.max_bytes:
                raise AnalyzerError(
                    f"the upload workspace is full ({used / 1e6:.1f} MB of {self.max_bytes / 1e6:.1f} MB used; "
                    f"{filename!r} needs {len(data) / 1e6:.1f} MB): delete old runs or uploads, or raise the limit")
            target = self.uploads / f"{digest}-{uuid.uuid4().hex[:8]}-{safe_filename(filename)}"
            tmp = target.with_name("." + target.name + ".part")
            with open(tmp, "xb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        return target

    def files(self) -> list[Path]:
        return sorted((p for p in self.uploads.iterdir() if p.is_file() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
