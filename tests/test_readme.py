"""The README's commands stay exact: every ```bash block is run, in order, from one scratch directory (a `make`
target as a dry run, `make -n`: `make test` is this suite and `make run` a server that never exits), and the
command-line synopsis (the ```text block) names only options the parser has, while every option the parser has is
named somewhere in the README."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def _commands(body: str) -> list:
    """Each command of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def _subparsers() -> dict:
    from analyzers.__main__ import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_synopsis_names_only_options_the_command_line_has():
    parsers = _subparsers()
    synopsis = "\n".join(_blocks("text"))
    entries = re.split(r"\n(?=python -m analyzers )", synopsis.strip())
    named = set()
    for entry in entries:
        command = entry.split()[3]
        assert command in parsers, command
        named.add(command)
        options = {o for a in parsers[command]._actions for o in a.option_strings}
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", entry.split("#")[0]))
        assert flags <= options, (command, flags - options)
    assert named == set(parsers)  # every subcommand is in the synopsis
    for command, parser in parsers.items():  # and every option is documented somewhere
        missing = [o for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help" and o not in README]
        assert missing == [], (command, missing)


def _digit_shards(folder: Path) -> None:
    """What the Ray example reads: the digits sample as two .npz shards."""
    from analyzers.loading.datasets import load_dataset

    data = load_dataset("sample:digits")
    folder.mkdir(exist_ok=True)
    half = len(data.y) // 2
    for part, rows in enumerate((slice(0, half), slice(half, None))):
        np.savez(folder / f"part-{part}.npz", x=np.asarray(data.x[rows]), y=np.asarray(data.y[rows]))


def _serve(argv: list, scratch: Path, env: dict) -> None:
    """A launcher command: started on a free port (the README's may be taken), answered, stopped. A runs
    directory the README names on a server (/srv/runs) is one in the scratch directory."""
    argv = list(argv)
    from conftest import free_port

    argv[argv.index("--port") + 1] = str(port := free_port())
    if "--runs-dir" in argv and argv[argv.index("--runs-dir") + 1].startswith("/srv/"):
        argv[argv.index("--runs-dir") + 1] = str(scratch / "srv-runs")
    from analyzers.notebook import wait_until_answering

    # the Host the browser would send: a server told its name refuses any other (DNS rebinding)
    host = argv[argv.index("--allowed-host") + 1] if "--allowed-host" in argv else None
    server = subprocess.Popen(argv, cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        assert wait_until_answering(f"http://127.0.0.1:{port}", server, 120, host=host), f"{argv} did not start"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_every_command_block_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ran = []
    for body in _blocks("bash"):
        for argv in _commands(body):
            if argv[0] == "make":
                done = subprocess.run(["make", "-n", "-C", str(ROOT), *argv[1:]], capture_output=True, text=True)
                assert done.returncode == 0, (argv, done.stderr)
            elif argv[0] in ("python", ".venv/bin/python"):
                argv = [sys.executable, *argv[1:]]
                if argv[1].startswith("dashboard/"):
                    argv[1] = str(ROOT / argv[1])
                    _serve(argv, tmp_path, env)
                else:
                    if any("shards/" in a for a in argv):
                        _digit_shards(tmp_path / "shards")
                        argv = [str(tmp_path / "shards" / "*.npz") if a == "shards/*.npz" else a for a in argv]
                    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
                    assert done.returncode == 0, (argv, done.stderr[-2000:])
            else:
                pytest.fail(f"the README shows a command this test cannot run: {shlex.join(argv)}")
            ran.append(argv)
    assert len(ran) >= 8
    assert (tmp_path / "report.html").stat().st_size > 1e6  # the report example wrote its file
    assert (tmp_path / "runs" / "big" / "run.json").exists()  # and the Ray example its run
