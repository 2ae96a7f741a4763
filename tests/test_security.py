"""No code from an uploaded file ever runs: planted pickle payloads must be refused and must never execute."""
from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from analyzers import AnalyzerError, load_dataset_bytes, load_model, load_model_bytes
from tests.conftest import export_model


class Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle payload was executed"


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.ckpt", "model.bin", "model.pt2",
                                  "model.safetensors", "model.pkl", "model.onnx"])
def test_pickled_payload_is_refused_under_every_extension(marker, name):
    data = _torch_saved(Payload(marker))
    with pytest.raises(AnalyzerError, match="pickle|not a supported model file|not a readable safetensors|torch.export"):
        load_model_bytes(data, name=name, arch="digits")


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.ckpt"])
def test_plain_pickle_of_arbitrary_object_is_refused(marker, name):
    data = pickle.dumps(Payload(marker))
    with pytest.raises(AnalyzerError):
        load_model_bytes(data, name=name, arch="digits")


def test_whole_pickled_module_is_refused_with_how_to_save_it(marker, tiny_cnn):
    data = _torch_saved(tiny_cnn)
    with pytest.raises(AnalyzerError, match=r"pickled Python objects.*state_dict\(\)"):
        load_model_bytes(data, name="model.pt", arch="digits")
    with pytest.raises(AnalyzerError, match="written by torch.save, not torch.export.save"):
        load_model_bytes(data, name="model.pt2")


def test_checkpoint_with_a_payload_beside_the_state_dict_is_refused(marker, tiny_cnn):
    data = _torch_saved({"state_dict": tiny_cnn.state_dict(), "hparams": Payload(marker)})
    with pytest.raises(AnalyzerError, match="pickled Python objects"):
        load_model_bytes(data, name="last.ckpt", arch="digits")


def _rewrite_archive(data: bytes, replace) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            target.writestr(item, replace(item.filename, source.read(item.filename)))
    return out.getvalue()


def test_export_marking_a_weight_use_pickle_is_refused_before_loading(marker, tmp_path, tiny_cnn):
    data = export_model(tiny_cnn, torch.rand(2, 1, 8, 8), tmp_path / "m.pt2").read_bytes()

    def plant(name, content):
        if name.endswith("model_weights_config.json"):
            config = json.loads(content)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("weights/weight_0"):
            return pickle.dumps(Payload(marker))
        return content

    crafted = _rewrite_archive(data, plant)
    with pytest.raises(AnalyzerError, match=r"entry .conv\.weight. is stored as a pickle, which would run code on load"):
        load_model_bytes(crafted, name="crafted.pt2")


def test_export_with_a_payload_in_its_sample_inputs_does_not_run_it(marker, tmp_path, tiny_cnn):
    # torch.export.load unpickles sample inputs; the archive policy hands torch an empty record instead, so the
    # model loads and the payload never runs.
    data = export_model(tiny_cnn, torch.rand(2, 1, 8, 8), tmp_path / "m.pt2").read_bytes()
    payload = _torch_saved(Payload(marker))
    crafted = _rewrite_archive(data, lambda name, content: payload if name.endswith("sample_inputs/model.pt")
                               else content)
    model = load_model_bytes(crafted, name="crafted.pt2")
    assert model.num_classes == 3 and not marker.exists()


def test_npz_with_pickled_objects_is_refused(marker):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 3), np.float32), y=np.array([0, 1]),
             meta=np.array([Payload(marker), Payload(marker)], dtype=object))
    with pytest.raises(AnalyzerError, match="holds Python objects, which are never unpickled"):
        load_dataset_bytes(buffer.getvalue(), name="data.npz")


def test_environment_is_restored_after_loading(tmp_path, tiny_cnn):
    import os

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    load_model(str(export_model(tiny_cnn, torch.rand(2, 1, 8, 8), tmp_path / "m.pt2")))
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
