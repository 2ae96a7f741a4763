"""The run: predictions equal a plain forward pass, losses equal cross-entropy, runs are atomic and reusable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from analyzers import AnalyzerError, load_dataset, load_model, open_run, run_analysis
from analyzers.__main__ import main
from analyzers.loading.runs import list_runs
from tests.conftest import ROOT, TinyCNN, export_model

CORE = []  # core run only: later stages have their own tests


def _forward(module, x):
    with torch.no_grad():
        return module(torch.as_tensor(x))


def test_digits_run_matches_a_plain_forward_pass_and_cross_entropy(tmp_path):
    out = run_analysis("sample:digits", "sample:digits", tmp_path / "run", batch_size=37, analyses=CORE)
    run = open_run(out)
    data = load_dataset("sample:digits")
    logits = _forward(load_model("sample:digits").module, data.x)
    samples = run.samples
    assert list(samples.columns[:6]) == ["id", "label", "pred", "confidence", "loss", "correct"]
    np.testing.assert_array_equal(samples["pred"], logits.argmax(1).numpy())
    np.testing.assert_array_equal(samples["id"], data.ids)
    np.testing.assert_allclose(run.probs, logits.softmax(1).numpy(), atol=1e-6)
    reference = F.cross_entropy(logits, torch.as_tensor(data.y), reduction="none").numpy()
    np.testing.assert_allclose(samples["loss"], reference, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(samples["correct"], samples["pred"] == samples["label"])
    np.testing.assert_allclose(samples["confidence"], run.probs.max(1))
    info = run.info
    for key in ("format_version", "model", "dataset", "num_samples", "class_names", "task", "preprocessing",
                "parameters", "seeds", "packages", "created"):
        assert key in info
    assert info["num_samples"] == 450 and info["packages"]["torch"].startswith("2.13")
    assert np.load(out / "embeddings" / "fc2.npy").shape == (450, 64)


def test_export_model_defined_only_here_with_npz_data(tmp_path):
    torch.manual_seed(1)
    net = TinyCNN().eval()
    model_path = export_model(net, torch.rand(2, 1, 8, 8), tmp_path / "tiny.pt2")
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "d.npz", x=x, y=y, ids=np.arange(100, 130), group=np.array(["a", "b"] * 15))
    out = run_analysis(str(model_path), str(tmp_path / "d.npz"), tmp_path / "run", batch_size=8, analyses=CORE)
    samples = open_run(out).samples
    logits = _forward(net, x)
    np.testing.assert_array_equal(samples["pred"], logits.argmax(1).numpy())
    np.testing.assert_allclose(samples["loss"], F.cross_entropy(logits, torch.as_tensor(y), reduction="none"),
                               rtol=1e-4, atol=1e-6)
    assert list(samples["group"][:2]) == ["a", "b"] and samples["id"].iloc[0] == 100


def test_safetensors_state_dict_run_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "digits.safetensors"
    save_file(load_model("sample:digits").module.state_dict(), str(path))
    code = main(["run", "--model", str(path), "--arch", "digits", "--data", "sample:digits",
                 "--out", str(tmp_path / "run"), "--analyses", ""])
    assert code == 0
    summary = capsys.readouterr().out
    assert summary.startswith("450 samples (classification), accuracy 0.9") and str(tmp_path / "run") in summary


def test_same_model_and_data_reuse_the_run_and_a_different_one_is_refused(tmp_path):
    out = run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=CORE)
    stamp = (out / "run.json").stat().st_mtime_ns
    first = (out / "samples.parquet").read_bytes()
    run_analysis("sample:digits", "sample:digits", out, analyses=CORE)
    assert (out / "run.json").stat().st_mtime_ns == stamp
    with pytest.raises(AnalyzerError, match="holds a different run.*--overwrite"):
        run_analysis("sample:digits", "sample:digits", out, batch_size=64, analyses=CORE)
    run_analysis("sample:digits", "sample:digits", out, batch_size=64, analyses=CORE, overwrite=True)
    assert json.loads((out / "run.json").read_text())["parameters"]["batch_size"] == 64
    pd.testing.assert_frame_equal(pd.read_parquet(out / "samples.parquet"),
                                  pd.read_parquet(pd.io.common.BytesIO(first)))
    assert [p.name for p in list_runs(tmp_path)] == ["run"]


def test_failed_run_leaves_the_earlier_run_intact(tmp_path):
    out = run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=CORE)
    before = (out / "samples.parquet").read_bytes()
    np.savez(tmp_path / "bad.npz", x=np.full((3, 1, 8, 8), np.nan, np.float32), y=np.zeros(3, int))
    with pytest.raises(AnalyzerError, match="NaN"):
        run_analysis("sample:digits", str(tmp_path / "bad.npz"), out, overwrite=True, analyses=CORE)
    assert (out / "samples.parquet").read_bytes() == before
    # no staged or replaced run is left behind (the writer lock file `.run.lock` stays, empty, by design)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


def test_command_line_errors_are_one_line_and_exit_1(tmp_path, capsys):
    code = main(["run", "--model", "sample:nope", "--data", "sample:digits", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: unknown sample model") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "run.json").unlink(), "holds no run.json, so it is not a complete run"),
    (lambda p: (p / "probs.npy").unlink(), "damaged: probs.npy missing"),
    (lambda p: (p / "run.json").write_text("{"), "run.json in the run at .* is damaged"),
])
def test_damaged_run_says_what_is_wrong(tmp_path, damage, message):
    out = run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=CORE)
    damage(out)
    with pytest.raises(AnalyzerError, match=message):
        open_run(out)


def test_damaged_samples_table_says_what_is_wrong(tmp_path):
    out = run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=CORE)
    (out / "samples.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(AnalyzerError, match="samples.parquet in the run at .* is damaged"):
        open_run(out).samples


def test_sigkill_mid_run_leaves_earlier_runs_intact_and_no_complete_looking_half_run(tmp_path):
    earlier = run_analysis("sample:digits", "sample:digits", tmp_path / "earlier", analyses=CORE)
    earlier_bytes = (earlier / "samples.parquet").read_bytes()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", x=rng.random((60000, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 60000))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for target in (tmp_path / "new", earlier):
        proc = subprocess.Popen([sys.executable, "-m", "analyzers", "run", "--model", "sample:digits", "--data",
                                 str(tmp_path / "big.npz"), "--out", str(target), "--overwrite"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill it while the run is being written: once its hidden staging directory exists.
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".{target.name}.tmp-*")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed mid-write"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "new" / "run.json").exists()
    assert (earlier / "samples.parquet").read_bytes() == earlier_bytes
    assert open_run(earlier).info["dataset"]["spec"] == "sample:digits"
    assert [p.name for p in list_runs(tmp_path)] == ["earlier"]


def test_the_datasets_hash_and_checksums_wait_while_inference_runs_and_end_before_the_run_is_stored(
        tmp_path, monkeypatch):
    """On 2 cores a hash beside the forward pass slowed it by twice the hash's own time: a new run's file is
    hashed and its CRCs computed (open_dataset) around inference, never during it, and the run.json written
    records the file's true SHA-256. Here the hash is held back until inference has begun (a hash that would
    still be going then), and inference takes a moment."""
    import hashlib
    import threading

    import analyzers.engines.pipeline as pipeline
    import analyzers.loading.datasets as datasets
    from analyzers.loading.hashing import digest_file

    x = np.random.default_rng(0).random((200, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=np.arange(200) % 3)
    reads, inference, begun = [], {}, threading.Event()

    class Gate:  # the run's gate, each chunk's read recorded as it passes
        def __init__(self, gate: threading.Event):
            self.gate = gate

        def wait(self):
            begun.wait(60)
            self.gate.wait()
            reads.append(time.monotonic())

    monkeypatch.setattr(datasets, "digest_file", lambda p, *, crc_ranges, gate, stop: digest_file(
        p, crc_ranges=crc_ranges, gate=Gate(gate), stop=stop, chunk_bytes=512))
    predict = pipeline.write_predictions

    def inferring(*args, **kwargs):
        inference["start"] = time.monotonic()
        begun.set()
        time.sleep(0.3)
        try:
            return predict(*args, **kwargs)
        finally:
            inference["end"] = time.monotonic()

    monkeypatch.setattr(pipeline, "write_predictions", inferring)
    run_analysis(TinyCNN(), str(path), tmp_path / "run", input_shape=(1, 8, 8), analyses=["evaluation"])
    assert len(reads) > 100 and min(reads) > inference["end"]  # every chunk read, none during inference
    assert open_run(tmp_path / "run").info["dataset"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_refused_after_its_dataset_opened_stops_the_datasets_checks(tmp_path, monkeypatch):
    """A server goes on after a refused run: the file's hash, which would take 40 s here, must not go on beside
    the next run's inference. The model takes other shapes than the dataset holds."""
    import threading

    import analyzers.loading.datasets as datasets
    from analyzers.loading.hashing import digest_file

    np.savez(tmp_path / "data.npz", x=np.zeros((200, 1, 8, 8), np.float32), y=np.arange(200) % 3)

    class SlowGate:
        def __init__(self, gate):
            self.gate = gate

        def wait(self):
            self.gate.wait()
            time.sleep(0.05)

    monkeypatch.setattr(datasets, "digest_file", lambda p, *, crc_ranges, gate, stop: digest_file(
        p, crc_ranges=crc_ranges, gate=SlowGate(gate), stop=stop, chunk_bytes=64))
    with pytest.raises(AnalyzerError, match=r"samples have shape \(1, 8, 8\) but the model takes \(1, 4, 4\)"):
        run_analysis(TinyCNN(), str(tmp_path / "data.npz"), tmp_path / "run", input_shape=(1, 4, 4),
                     analyses=["evaluation"])
    checks = [t for t in threading.enumerate() if t.name == "dataset checks"]
    for thread in checks:
        thread.join(5)
    assert not any(t.is_alive() for t in checks) and not (tmp_path / "run").exists()


def test_the_stages_imports_run_while_the_data_loads_and_end_before_inference(tmp_path, monkeypatch):
    """A thread importing beside the forward pass took the GIL from it (100k images: inference 6.8 s beside it,
    6.3 s after): the stages' modules are imported from the start of the run, while the data is read, and the
    forward pass starts once they are in. A module that takes 0.5 s to import shows both."""
    import analyzers.engines.pipeline as pipeline
    import analyzers.loading.datasets as datasets

    seen = {}
    (tmp_path / "slow_stage_module.py").write_text(
        "import time\nSTARTED = time.monotonic()\ntime.sleep(0.5)\nDONE = time.monotonic()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_stage_module", raising=False)
    monkeypatch.setitem(pipeline.STAGE_IMPORTS, "evaluation", ("slow_stage_module",))
    load, predict = datasets.open_dataset, pipeline.write_predictions

    def loading(*args, **kwargs):
        time.sleep(0.3)  # a dataset that takes a moment to read: the thread has begun by its end
        pending = load(*args, **kwargs)
        seen.setdefault("loaded", time.monotonic())
        return pending

    def inferring(*args, **kwargs):
        seen["inference"] = time.monotonic()
        seen["imported"] = "slow_stage_module" in sys.modules and hasattr(sys.modules["slow_stage_module"], "DONE")
        return predict(*args, **kwargs)

    monkeypatch.setattr(pipeline, "open_dataset", loading)
    monkeypatch.setattr(pipeline, "write_predictions", inferring)
    run_analysis("sample:digits", "sample:digits", tmp_path / "run", analyses=["evaluation"])
    module = sys.modules["slow_stage_module"]
    assert module.STARTED < seen["loaded"]  # begun before the data was in
    assert seen["imported"] and module.DONE <= seen["inference"]  # done before the forward pass
