"""Stale staging directories (issue 17): a run killed mid-write leaves its hidden stage `.NAME.tmp-XXXXXXXX` beside
the runs; the next run started there removes it when no writer holds NAME's lock and it is older than the newest
complete run. Complete runs, live writers' stages and hidden things that are not ours are never touched."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from analyzers.loading import runs
from analyzers.loading.runs import RUN_INFO, staged_run, writer_lock
from conftest import ROOT


def _complete_run(path, *, finished_at: float):
    path.mkdir(parents=True)
    (path / "samples.parquet").write_text("stands for the run's tables")
    (path / RUN_INFO).write_text(json.dumps({"name": path.name}))
    os.utime(path / RUN_INFO, (finished_at, finished_at))


def _stage(root, name: str, *, changed_at: float, tag: str = "tmp"):
    """A leftover of a writer of `name` killed mid-write: some files, no run.json."""
    stage = root / f".{name}.{tag}-0123abcd"
    stage.mkdir()
    (stage / "probs.npy").write_bytes(b"half written")
    os.utime(stage, (changed_at, changed_at))
    return stage


def _start_a_run(out):
    with staged_run(out, replace=False) as stage:
        (stage / RUN_INFO).write_text("{}")


def test_a_real_run_removes_a_stage_older_than_the_newest_run_and_keeps_the_rest(tmp_path):
    import analyzers

    root = tmp_path / "runs"
    root.mkdir()
    now = time.time()
    _complete_run(root / "earlier", finished_at=now - 100)
    abandoned = _stage(root, "crashed", changed_at=now - 200)
    abandoned_replacement = _stage(root, "earlier", changed_at=now - 300, tag="old")
    newer = _stage(root, "just-started", changed_at=now - 50)  # changed after the newest run was finished
    not_ours = [root / ".git", root / ".crashed.tmp-notahex1", root / ".cache.tmp-0123abcd.part"]
    for path in not_ours:
        path.mkdir()
        os.utime(path, (now - 500, now - 500))

    analyzers.run_analysis("sample:digits", "sample:digits", root / "digits", analyses=["evaluation"])

    assert not abandoned.exists() and not abandoned_replacement.exists()
    assert newer.exists() and (newer / "probs.npy").exists()
    assert all(path.exists() for path in not_ours)
    assert (root / "earlier" / RUN_INFO).exists() and (root / "earlier" / "samples.parquet").exists()
    assert (root / "digits" / RUN_INFO).exists()


def test_a_locked_stage_survives_however_old(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    now = time.time()
    _complete_run(root / "earlier", finished_at=now - 100)
    busy = _stage(root, "busy", changed_at=now - 10_000)
    with writer_lock(root / "busy", wait=False):  # the writer of "busy" is alive
        _start_a_run(root / "new")
        assert busy.exists()
    _start_a_run(root / "newer")  # its writer is gone now
    assert not busy.exists()


def test_without_a_complete_run_nothing_is_swept(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    stage = _stage(root, "crashed", changed_at=time.time() - 10_000)
    _start_a_run(root / "first")  # no run was finished before it started: nothing is known to be abandoned
    assert stage.exists()


def test_a_sweep_that_fails_does_not_fail_the_run(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    _complete_run(root / "earlier", finished_at=time.time() - 100)
    _stage(root, "crashed", changed_at=time.time() - 200)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runs, "recover_interrupted", refused)
    _start_a_run(root / "new")
    assert (root / "new" / RUN_INFO).exists()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from analyzers.loading.runs import staged_run

    with staged_run(Path(sys.argv[1]), replace=False) as stage:
        (stage / "samples.parquet").write_text("the first of the run's files")
        print(stage, flush=True)
        time.sleep(120)  # killed here, mid-write
        (stage / "run.json").write_text("{}")
""")


def test_a_run_killed_mid_write_leaves_its_stage_until_a_later_run_removes_it(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root / "killed")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stage = root / writer.stdout.readline().strip().rpartition("/")[2]
        assert stage.name.startswith(".killed.tmp-") and stage.is_dir(), writer.stderr.read()
        time.sleep(0.05)  # file times are coarse (a clock tick): "earlier" is finished after the stage changed
        _complete_run(root / "earlier", finished_at=time.time())
        _start_a_run(root / "while-alive")
        assert stage.exists()  # its writer is alive and holds the lock
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert stage.exists() and not (root / "killed").exists()  # the kill leaves the stage behind
    with writer_lock(root / "killed", wait=False):  # the dead writer's lock was released with it
        pass

    _start_a_run(root / "later")
    assert not stage.exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["earlier", "later",
                                                                                    "while-alive"]

