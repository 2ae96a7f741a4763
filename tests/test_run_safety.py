"""No run is ever lost (issue 19): a replacement killed (SIGKILL) between any two of its steps is finished or undone
at the next start, concurrent writers of one run are serialised, and a folder that is not a run is never replaced."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from analyzers.errors import AnalyzerError
from analyzers.loading.runs import RUN_INFO, list_runs, recover_interrupted, staged_run, writer_lock
from conftest import ROOT

STEPS = ("staged", "old moved aside", "new moved in", "done")
# What must be at the run's name after recovery when the writer died right after each step.
EXPECTED = {"staged": "old", "old moved aside": "new", "new moved in": "new", "done": "new"}

WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from analyzers.loading import runs

    out, kill_at = Path(sys.argv[1]), sys.argv[2]

    def step(name):
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    runs._swap_step = step
    with runs.staged_run(out, replace=True) as stage:
        (stage / "which").write_text("new")
        (stage / "run.json").write_text("{}")
""")


def _fake_run(path, which: str):
    path.mkdir(parents=True)
    (path / "which").write_text(which)
    (path / RUN_INFO).write_text(json.dumps({"which": which}))


def _hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


@pytest.mark.parametrize("step, previous", [(step, True) for step in STEPS] + [("staged", False), ("done", False)],
                         ids=[f"replacing, killed after {s}" for s in STEPS] + ["fresh, killed after staged",
                                                                              "fresh, killed after done"])
def test_sigkill_at_every_step_of_a_swap_is_recovered(step, previous, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    out = root / "run"
    if previous:
        _fake_run(out, "old")
    done = subprocess.run([sys.executable, "-c", WRITER, str(out), step], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    recover_interrupted(root)
    assert (out / RUN_INFO).exists(), _hidden(root)
    expected = EXPECTED[step] if previous else "new"
    assert (out / "which").read_text() == expected
    assert _hidden(root) == []  # nothing left in hidden directories
    assert list_runs(root) == [out]


def test_a_writer_still_running_is_not_recovered_under_it(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    out = root / "run"
    _fake_run(out, "old")
    with writer_lock(out, wait=False):
        stage = root / ".run.tmp-0123abcd"  # a stage the lock holder is still writing
        stage.mkdir()
        assert recover_interrupted(root) == []
        assert stage.exists()


def test_a_second_writer_without_overwrite_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    with writer_lock(out, wait=False):
        with pytest.raises(AnalyzerError, match="another analysis is writing .* right now"):
            with staged_run(out, replace=False):
                pass


def test_two_cli_runs_into_one_fresh_out_cannot_both_succeed(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "analyzers", "run", "--model", "sample:digits", "--data", "sample:digits",
               "--out", str(out), "--analyses", "evaluation"]
    first = subprocess.Popen([*command, "--seed", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    second = subprocess.Popen([*command, "--seed", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another analysis is writing" in loser or "holds a different run" in loser or "meanwhile" in loser
    assert "Traceback" not in loser


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    import analyzers

    folder = tmp_path / "my-notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(AnalyzerError, match="exists and is not a run, so it is never replaced"):
            analyzers.run_analysis("sample:digits", "sample:digits", folder, overwrite=overwrite,
                                   analyses=["evaluation"])
    assert (folder / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("out_kind", ["file", "dot"])
def test_bad_out_is_one_line_on_the_cli(out_kind, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    out = str(target) if out_kind == "file" else "."
    done = subprocess.run([sys.executable, "-m", "analyzers", "run", "--model", "sample:digits", "--data",
                           "sample:digits", "--out", out, "--analyses", "evaluation"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert ("is a file, not a run directory" if out_kind == "file" else "exists and is not a run") in lines[0]
    assert target.read_text() == "x"


class _Linear3(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_cached_inputs_are_keyed_by_every_parameter_that_shapes_them(tmp_path):
    """Two runs of one CSV and one model that differ only in the feature order or the label column get their own
    inputs from the dashboard's cache (issue 19: the second run's Explain page used the first run's columns)."""
    import numpy as np
    import pandas as pd
    import torch

    import analyzers
    from analyzers.loading.runs import open_run
    from conftest import export_model
    from dashboard import data

    torch.manual_seed(0)
    model = export_model(_Linear3(), torch.zeros(2, 3), tmp_path / "linear.pt2")
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"a": rng.normal(size=40), "b": rng.normal(size=40) + 10, "c": rng.normal(size=40) + 100,
                          "label": rng.integers(0, 2, 40), "other": rng.integers(0, 2, 40)})
    csv = tmp_path / "table.csv"
    table.to_csv(csv, index=False)
    variants = {"abc": dict(features=["a", "b", "c"]), "cba": dict(features=["c", "b", "a"]),
                "other-label": dict(features=["a", "b", "c"], label_column="other")}
    keys = set()
    for name, options in variants.items():
        out = analyzers.run_analysis(str(model), str(csv), tmp_path / "runs" / name, analyses=["evaluation"],
                                     **options)
        run = open_run(out)
        keys.add(data.inputs_key(run.info))
        _, dataset = data.run_inputs(run)
        np.testing.assert_array_equal(dataset.x, table[options["features"]].to_numpy(np.float32))
        np.testing.assert_array_equal(dataset.y, table[options.get("label_column", "label")].to_numpy())
    assert len(keys) == len(variants)


def _in_private_mount(mount: str, script: str, tmp_path):
    """Run `script` (sh) in a private mount namespace after `mount` (sh) set up tmp_path/runs: a real full disk or
    read-only file system, visible to nothing else. Skipped where mount namespaces are not allowed."""
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {runs}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not available here ({probe.stderr.decode().strip()[:80]})")
    cli = f"{sys.executable} -m analyzers run --model sample:digits --data sample:digits --analyses evaluation"
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mount.format(runs=runs)} && {script.format(runs=runs, cli=cli)}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_full_disk_is_one_line_and_the_earlier_run_survives(tmp_path):
    """issue 19, item 6: a full disk ended in `OSError: [Errno 28]`. Here a 2 MB file system holds one run; the rest
    is filled; replacing the run must say so in one line and leave the earlier run whole."""
    done = _in_private_mount(
        "mount -t tmpfs -o size=2m tmpfs {runs}",
        "{cli} --out {runs}/kept >/dev/null && sha256sum {runs}/kept/samples.parquet > {runs}/../before.txt && "
        "(dd if=/dev/zero of={runs}/filler bs=4k 2>/dev/null; true) && "
        "{cli} --out {runs}/kept --overwrite --seed 2; echo rc=$?; sha256sum -c {runs}/../before.txt && ls -a {runs}",
        tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line
             and "return cls.__new__" not in line]
    assert "rc=1" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert any(line.startswith("error: cannot write into") and "the disk is full" in line for line in lines), lines
    assert "Traceback" not in done.stderr
    assert "samples.parquet: OK" in done.stdout  # the earlier run is whole
    assert not [name for name in done.stdout.split() if name.startswith(".kept.") and not name.endswith(".lock")]


def test_a_read_only_runs_directory_is_one_line(tmp_path):
    done = _in_private_mount("mount --bind {runs} {runs} && mount -o remount,bind,ro {runs}",
                             "{cli} --out {runs}/new; echo rc=$?", tmp_path)
    assert "rc=1" in done.stdout and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot write into" in done.stderr and "Read-only file system" in done.stderr


def test_a_run_is_replaced_only_when_asked_and_keeps_what_was_derived_from_the_same_files(tmp_path, sample_run_dir):
    """Issue 18, item 1: replacing a run of the same model and data keeps its explanations and on-demand
    projections (they depend on nothing else); another dataset's run keeps none; without overwrite nothing moves."""
    import shutil

    import numpy as np

    from analyzers.engines.pipeline import run_analysis
    from analyzers.errors import RunExists
    from analyzers.explanations.explain_run import explain_run
    from analyzers.loading.runs import open_run

    out = tmp_path / "runs" / "digits"
    shutil.copytree(sample_run_dir("digits"), out)
    first = open_run(out)
    explain_run(out, [str(first.samples["id"][0])], ["saliency"], sanity=False)
    on_demand = out / "projections" / "fc1-tsne-2d.parquet"  # stands for a t-SNE the Embeddings page computed
    shutil.copy(next((out / "projections").glob("*-pca-2d.parquet")), on_demand)
    derived = {p.relative_to(out): p.read_bytes() for p in (out / "explanations").rglob("*") if p.is_file()}
    derived[on_demand.relative_to(out)] = on_demand.read_bytes()
    before = (out / RUN_INFO).read_bytes()

    with pytest.raises(RunExists, match="--overwrite"):
        run_analysis("sample:digits", "sample:digits", out, seed=1, analyses=["evaluation"])
    assert (out / RUN_INFO).read_bytes() == before

    run_analysis("sample:digits", "sample:digits", out, seed=1, analyses=["evaluation"], overwrite=True)
    assert open_run(out).info["parameters"]["seed"] == 1
    assert {path: (out / path).read_bytes() for path in derived} == derived

    data = first.samples.index.to_numpy()[:200]
    from analyzers.loading.datasets import load_dataset

    digits = load_dataset("sample:digits")
    np.savez(tmp_path / "part.npz", x=digits.x[data], y=digits.y[data])
    run_analysis("sample:digits", str(tmp_path / "part.npz"), out, analyses=["evaluation"], overwrite=True)
    assert not (out / "explanations").exists() and not on_demand.exists()  # another dataset: nothing carried


def test_a_link_planted_in_a_run_takes_no_write_out_of_it(tmp_path, sample_run_dir):
    """A run folder whose `projections/` links elsewhere: storing a projection there (the dashboard's warm-up does as
    soon as the run opens) is refused in one line naming the file, and nothing is written where the link leads."""
    import shutil

    from analyzers.explanations.projections import ensure_projection
    from analyzers.loading.run_checks import RunDamaged
    from analyzers.loading.runs import open_run
    from dashboard import data

    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(sample_run_dir("digits"), run_dir, ignore=shutil.ignore_patterns("projections"))
    outside.mkdir()
    (run_dir / "projections").symlink_to(outside, target_is_directory=True)
    run = open_run(run_dir)
    with pytest.raises(RunDamaged, match=r"^projections/fc2-pca-2d.parquet in the run at .* is damaged \(a link "
                                         r"in the run leads it out of the run folder\)"):
        ensure_projection(run, "fc2", "pca", 2)
    data._warm_projection(run)
    assert list(outside.iterdir()) == []
    assert run.file("embeddings/fc2.npy") == run_dir / "embeddings" / "fc2.npy"  # the run's own files as before
