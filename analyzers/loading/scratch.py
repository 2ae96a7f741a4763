"""Private temporary directories of one process, and the sweep of those whose process has died.

A sandboxed worker's home, a Ray actor's copy of the model file and its explanation cache live in the system's
temporary directory while their process runs, and each is removed when that process closes it. A process that is
killed (a Ray actor at `ray.shutdown()`, a server stopped with SIGKILL) removes nothing, and on a shared server
these add up. So each such directory is named after the process that made it, `<prefix><pid>-<random>`, and making
one removes its prefix's directories whose process no longer exists.

Only directories are swept that this user owns, that are not symbolic links, and whose pid is gone; a pid that was
reused keeps its old directory until that process is gone too (a leak, never a removal of something in use).
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path


def process_scratch(prefix: str) -> Path:
    """A new private (0700) directory `<tmp>/<prefix><pid>-<random>`, after removing the directories of `prefix`
    left by processes that have died."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+-", prefix):
        raise ValueError(f"internal error: a scratch prefix is letters, digits, '_' or '-', ending in '-': {prefix!r}")
    sweep_dead(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def sweep_dead(prefix: str, root: str | Path | None = None) -> list[Path]:
    """Remove `<root>/<prefix><pid>-*` directories of this user whose process `pid` no longer exists; returns them."""
    root = Path(root if root is not None else tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]+")
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # another sweeper may be removing it too
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # a number no pid can be
        return False
    return True
