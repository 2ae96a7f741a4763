"""Scratch directories of killed processes are swept by the next one (analyzers.loading.scratch)."""
from __future__ import annotations

import os
import subprocess
import sys

from analyzers.loading.scratch import process_scratch, sweep_dead


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid now (reuse within the test is vanishingly unlikely)


def test_only_dead_processes_directories_of_the_prefix_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    gone = tmp_path / f"analyzers-actor-{dead}-abc"
    (gone / "sub").mkdir(parents=True)
    (gone / "sub" / "model.pt2").write_bytes(b"x")
    kept = {
        "alive": tmp_path / f"analyzers-actor-{alive}-abc",
        "other prefix": tmp_path / f"analyzers-worker-{dead}-abc",
        "no pid": tmp_path / "analyzers-actor-abc",
        "a file": tmp_path / f"analyzers-actor-{dead}-file",
    }
    for name, path in kept.items():
        path.write_text("x") if name == "a file" else path.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    link = tmp_path / f"analyzers-actor-{dead}-link"
    link.symlink_to(outside, target_is_directory=True)

    assert sweep_dead("analyzers-actor-", tmp_path) == [gone]
    assert not gone.exists()
    assert all(path.exists() for path in kept.values())
    assert link.is_symlink() and (outside / "keep").exists()  # a link is never followed or removed


def test_a_new_scratch_is_private_named_by_its_process_and_sweeps_the_dead(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = tmp_path / f"analyzers-explain-{_dead_pid()}-xyz"
    left.mkdir()
    made = process_scratch("analyzers-explain-")
    assert made.parent == tmp_path and made.name.startswith(f"analyzers-explain-{os.getpid()}-")
    assert (made.stat().st_mode & 0o777) == 0o700
    assert not left.exists()
    # a second one keeps the first: its process is alive
    second = process_scratch("analyzers-explain-")
    assert made.exists() and second.exists() and second != made


def test_a_killed_workers_parent_leaves_a_home_that_the_next_worker_removes(tmp_path, monkeypatch):
    """A process that made a sandboxed worker's home and was killed (SIGKILL: no finalizer ran) leaves it behind;
    the next worker made removes it, and its own home goes with close()."""
    import signal
    import tempfile

    from analyzers.loading.sandbox import Worker

    code = ("import os, signal, tempfile; tempfile.tempdir = os.environ['T']; "
            "from analyzers.loading.scratch import process_scratch; print(process_scratch('analyzers-worker-'), "
            "flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "T": str(tmp_path), "PYTHONPATH": str(os.getcwd())}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    home = tmp_path / os.path.basename(killed.stdout.strip())
    assert home.is_dir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    worker = Worker()
    try:
        assert not home.exists()
        assert [p.name for p in tmp_path.iterdir()] == [f"analyzers-worker-{os.getpid()}-" + worker._home.name.rsplit(
            "-", 1)[1]]
    finally:
        worker.close()
    assert list(tmp_path.iterdir()) == []
