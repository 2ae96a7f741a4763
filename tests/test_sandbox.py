"""The sandboxed worker: real exports give bit-identical predictions through it, a payload that gets past the archive
policy (switched off for the test) is contained, and a model that crashes, hangs or exhausts memory ends alone."""
from __future__ import annotations

import contextlib
import json
import os
import socket

import numpy as np
import pytest
import torch

from analyzers.errors import AnalyzerError
from analyzers.engines.inference import predict
from analyzers.loading import wire
from analyzers.loading.models import load_model
from analyzers.loading.sandbox import (SandboxLimits, Worker, WorkerError, copy_worker_output, open_sandboxed,
                                       sandbox_support)
from architectures import ARCHITECTURES, build
from conftest import TinyCNN, export_model
from crafted_archives import edit_json

FULL = sandbox_support().level == "full"
needs_full = pytest.mark.skipif(not FULL and os.environ.get("CI") != "true",
                                reason=f"the full sandbox is not available here: {sandbox_support().reason}")


def test_ci_has_the_full_sandbox():
    if os.environ.get("CI") == "true":
        assert FULL, sandbox_support().reason


@pytest.mark.parametrize("name", ["digits", "tabular", "dna", "shapes"])
def test_samples_predict_bit_identically_through_the_worker(name):
    local = load_model(f"sample:{name}")
    remote = load_model(f"sample:{name}", isolation="sandbox")
    try:
        x = np.random.default_rng(0).random((37, *local.input_shape), dtype=np.float32)
        here, there = predict(local, x, batch_size=16), predict(remote, x, batch_size=16)
        assert np.array_equal(here.probs, there.probs)
        assert remote.sha256 == local.sha256 and remote.layers == local.layers
    finally:
        remote.close()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_real_exports_predict_bit_identically_through_the_worker(arch, tmp_path):
    model = build(arch)
    path = export_model(model, torch.randn(2, *model.input_shape), tmp_path / f"{arch}.pt2")
    local = load_model(str(path), isolation="process")
    remote = load_model(str(path))  # a file: the sandbox by default
    try:
        x = np.random.default_rng(1).standard_normal((21, *model.input_shape)).astype(np.float32)
        assert np.array_equal(predict(local, x, batch_size=8).probs, predict(remote, x, batch_size=8).probs)
        with torch.no_grad():
            direct = torch.softmax(model(torch.as_tensor(x)), dim=1).numpy()
        np.testing.assert_allclose(predict(remote, x, batch_size=8).probs, direct, rtol=1e-5, atol=1e-6)
    finally:
        remote.close()


def _payload_archive(tmp_path, code: str) -> str:
    """A real export whose first symbolic size runs `code` when torch deserialises it (the policy would refuse it)."""
    torch.manual_seed(0)
    data = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), tmp_path / "base.pt2").read_bytes()

    def change(program):
        for meta in program["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = f"0*__import__('builtins').exec({code!r}) + s77"
                    return
    path = tmp_path / "payload.pt2"
    path.write_bytes(edit_json(data, "models/model.json", change))
    return str(path)


@needs_full
def test_the_sandbox_alone_contains_a_payload(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "planted-secret.txt"
    planted.write_text("the server's secret")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = f"""
import json, os, socket
report = {{}}
try:
    open({str(outside / 'written')!r}, 'w').write('x'); report['write'] = 'written'
except Exception as e:
    report['write'] = type(e).__name__
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2); report['connect'] = 'connected'
except Exception as e:
    report['connect'] = type(e).__name__
try:
    report['read'] = open({str(planted)!r}).read()
except Exception as e:
    report['read'] = type(e).__name__
report['spawn'] = os.system('touch /scratch/spawned')
open('/scratch/report.json', 'w').write(json.dumps(report))
"""
    model_path = _payload_archive(tmp_path, code)
    worker = Worker(name="payload.pt2")
    try:
        fd = worker.hand_over("model", model_path)
        worker.start()
        with contextlib.suppress(AnalyzerError):  # the payload runs during the load; the load may then fail
            worker.request({"op": "load_model", "fd": fd, "name": "payload.pt2", "spec": model_path,
                            "check_archive": False})
        report = json.loads((worker.scratch / "report.json").read_text())
        assert report["write"] in ("FileNotFoundError", "PermissionError", "OSError")
        assert report["connect"] in ("ConnectionRefusedError", "OSError", "TimeoutError")
        assert report["read"] == "FileNotFoundError"
        assert report["spawn"] != 0 and not (worker.scratch / "spawned").exists()  # no new processes (seccomp)
        assert not (outside / "written").exists()
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
        worker.close()


@pytest.mark.parametrize("code, expected", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed (SIGSEGV)"),
    ("import time; time.sleep(60)", "did not answer within 3 s"),
    ("x = bytearray(64 << 30)", "ran out of memory"),
])
def test_a_model_that_crashes_hangs_or_exhausts_memory_ends_only_its_worker(tmp_path, code, expected):
    model_path = _payload_archive(tmp_path, code)
    # only the hang waits for the short timeout: a crash or a full memory must be told apart from it even when a
    # busy machine (the suite's other process) makes the worker's start slow
    limits = SandboxLimits(memory_bytes=4 << 30, request_timeout_s=3.0 if "sleep" in code else 120.0)
    with pytest.raises(AnalyzerError) as caught:
        model, _ = open_sandboxed(model_path, limits=limits, unchecked_archive_for_tests=True)
        model.close()
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    # this process carries on, and a new worker serves the next request
    healthy = load_model("sample:digits", isolation="sandbox")
    try:
        assert predict(healthy, np.zeros((2, 1, 8, 8), np.float32)).probs.shape == (2, 10)
    finally:
        healthy.close()


def test_explanations_through_the_worker_equal_in_process_ones(tmp_path):
    from analyzers.explanations.attributions import explain

    local = load_model("sample:digits")
    remote = load_model("sample:digits", isolation="sandbox")
    try:
        x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
        for method in ("saliency", "gradcam"):
            assert np.array_equal(explain(local, x, None, method), explain(remote, x, None, method))
    finally:
        remote.close()


def test_worker_output_with_a_link_or_fifo_is_refused(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    (source / "samples.parquet").write_bytes(b"x")
    (source / "probs.npy").symlink_to("/etc/passwd")
    with pytest.raises(WorkerError, match="not a regular file"):
        copy_worker_output(source, target)
    (source / "probs.npy").unlink()
    os.mkfifo(source / "probs.npy")
    with pytest.raises(WorkerError, match="not a regular file"):
        copy_worker_output(source, tmp_path / "target2")


def test_wire_round_trips_results_and_refuses_code():
    import pandas as pd

    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "t": pd.DataFrame({"id": ["x", "y"], "v": [1.5, 2]}),
             "n": [1, 2.5, None, True, "s"]}
    header, blobs = wire.encode(value)
    back = wire.decode(header, blobs)
    assert np.array_equal(back["a"], value["a"]) and back["t"].equals(value["t"]) and back["n"] == value["n"]
    with pytest.raises(wire.WireError, match="objects"):
        wire.encode(np.array([object()], dtype=object))
    forged = json.dumps({"c": "os:system", "v": {}}).encode()
    with pytest.raises(wire.WireError, match="not an allowed result type"):
        wire.decode(forged, [])
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(wire.WireError):
        wire.decode(json.dumps({"a": 0}).encode(), [buffer.getvalue()])


# --- a run's inputs, reloaded for the dashboard ---------------------------------------------------------------------

def _tabular_export_run(tmp_path):
    """A run of a .pt2 export on a CSV with text ids, a metadata column and a chosen feature order."""
    import pandas as pd

    from analyzers.engines.pipeline import run_analysis

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model_path = export_model(net, torch.zeros(2, 3), tmp_path / "mlp.pt2")
    rng = np.random.default_rng(3)
    table = pd.DataFrame({"a": rng.normal(size=30), "b": rng.normal(size=30), "c": rng.normal(size=30),
                          "name": [f"row-{i}" for i in range(30)], "site": rng.choice(["x", "y"], 30),
                          "target": rng.integers(0, 2, 30)})
    data_path = tmp_path / "table.csv"
    table.to_csv(data_path, index=False)
    out = run_analysis(str(model_path), str(data_path), tmp_path / "run", label_column="target", id_column="name",
                       features=["c", "b", "a"], analyses=[])
    return out, model_path, data_path


def test_a_runs_dataset_is_decoded_only_in_the_worker_and_arrives_equal(tmp_path, monkeypatch):
    """load_run_inputs (the Explain, Embeddings and Training pages) decodes an uploaded file in the worker: with this
    process's decoder broken, the dataset still arrives, equal field by field to an in-process load."""
    from analyzers.engines.pipeline import load_run_inputs
    from analyzers.loading import datasets
    from analyzers.loading.runs import open_run
    from analyzers.loading.sandbox import SandboxedModel

    out, model_path, data_path = _tabular_export_run(tmp_path)
    local = load_model(str(model_path), isolation="process")
    expected = datasets.load_dataset(str(data_path), model=local, label_column="target", id_column="name",
                                     features=["c", "b", "a"])

    def never(*args, **kwargs):
        raise AssertionError("the dashboard process decoded an uploaded dataset")

    monkeypatch.setattr(datasets, "_load_source", never)
    model, dataset = load_run_inputs(open_run(out))
    try:
        assert isinstance(model, SandboxedModel)
        assert np.array_equal(dataset.x, expected.x) and dataset.x.dtype == np.float32
        assert np.array_equal(dataset.y, expected.y) and list(dataset.ids) == list(expected.ids)
        assert dataset.feature_names == ("c", "b", "a") == expected.feature_names
        assert list(dataset.metadata["site"]) == list(expected.metadata["site"])
        assert dataset.sha256 == expected.sha256 and dataset.class_names == expected.class_names
        # the model in the worker still answers (the worker dropped only its copy of the data)
        assert np.array_equal(predict(model, dataset.x[:5]).probs, predict(local, expected.x[:5]).probs)
    finally:
        model.close()


def test_a_worker_announcing_more_than_the_reply_cap_is_stopped_before_allocation(tmp_path):
    out, model_path, data_path = _tabular_export_run(tmp_path)
    model, _ = open_sandboxed(model_path, data_path=data_path,
                              data_options=dict(label_column="target", id_column="name"))
    try:
        with pytest.raises(WorkerError, match="over the 100-byte limit"):
            model.worker.request({"op": "dataset"}, max_reply_bytes=100)
        assert not model.worker.alive
    finally:
        model.close()


@pytest.mark.parametrize("change, problem", [
    (lambda f: f.update(x=f["x"].astype(np.float64)), "inputs are not a float32"),
    (lambda f: f.update(y=f["y"][:-1]), "labels are not one int64 per sample"),
    (lambda f: f.update(ids=np.ones(len(f["y"]), bool)), "ids are not one integer or text"),
    (lambda f: f.update(ids=["a"] * (len(f["y"]) + 1)), "ids are not one integer or text"),
    (lambda f: f.update(metadata=f["metadata"].iloc[:2]), "metadata is not one row per sample"),
    (lambda f: f.update(extras={"mask": np.zeros(1)}), "extra arrays are not one entry per sample"),
    (lambda f: f.update(class_names=[1, 2]), "class names are not text"),
    (lambda f: f.pop("sha256"), "description is incomplete"),
])
def test_a_dataset_from_a_worker_is_checked_field_by_field(change, problem):
    from analyzers.loading.datasets import dataset_fields, dataset_from_fields, load_dataset

    fields = dataset_fields(load_dataset("sample:shapes"))
    assert np.array_equal(dataset_from_fields(dict(fields)).x, fields["x"])  # the unchanged fields are accepted
    change(fields)
    with pytest.raises(AnalyzerError, match=problem):
        dataset_from_fields(fields)


def test_a_worker_outlives_the_thread_that_started_it():
    """A Streamlit script run is a thread: the model it loads stays cached for the next run, so its worker must not
    die with that thread (bubblewrap's --die-with-parent follows the forking thread)."""
    import threading
    import time

    started = {}
    thread = threading.Thread(target=lambda: started.update(model=load_model("sample:digits", isolation="sandbox")))
    thread.start()
    thread.join()
    model = started["model"]
    try:
        time.sleep(2.0)  # the worker was SIGKILLed about a second after its thread ended
        assert model.worker.alive
        assert predict(model, np.zeros((2, 1, 8, 8), np.float32)).probs.shape == (2, 10)
    finally:
        model.close()
