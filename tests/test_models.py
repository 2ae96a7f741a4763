"""Model loading: samples, torch.export programs, state dicts; every refusal with its message."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from analyzers import AnalyzerError, load_model, load_model_bytes, wrap_module
from sample_models import get_sample
from tests.conftest import TinyCNN, export_model


def test_sample_model_loads_in_eval_mode_with_its_description():
    model = load_model("sample:digits")
    assert not model.module.training
    assert model.input_shape == (1, 8, 8)
    assert model.num_classes == 10
    assert model.class_names == tuple(str(d) for d in range(10))
    assert model.output_kind == "logits"
    assert {"conv1", "conv2", "fc1", "fc2"} <= set(model.layers)
    assert model.conv_layers == ("conv1", "conv2")
    assert len(model.sha256) == 64


def test_unknown_sample_is_refused():
    with pytest.raises(AnalyzerError, match="unknown sample model 'nope': choose one of digits"):
        load_model("sample:nope")


def test_export_program_gives_the_original_outputs_hooks_and_input_gradients(tmp_path, tiny_cnn):
    x = torch.rand(5, 1, 8, 8)
    path = export_model(tiny_cnn, x[:2], tmp_path / "tiny.pt2")
    model = load_model(str(path), isolation="process")
    assert model.source == "export" and model.input_shape == (1, 8, 8) and model.num_classes == 3
    assert model.layer_kinds["conv"] == "conv2d" and model.layer_kinds["fc"] == "linear"
    torch.testing.assert_close(model.module(x), tiny_cnn(x))
    seen = []
    handle = dict(model.module.named_modules())["conv"].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    xg = x.clone().requires_grad_(True)
    out = model.module(xg)
    handle.remove()
    assert seen == [torch.Size([5, 4, 8, 8])]
    (grad,) = torch.autograd.grad(out[:, 0].sum(), xg)
    xr = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(tiny_cnn(xr)[:, 0].sum(), xr)
    torch.testing.assert_close(grad, reference)


def test_export_copy_is_independent(tmp_path, tiny_cnn):
    model = load_model(str(export_model(tiny_cnn, torch.rand(2, 1, 8, 8), tmp_path / "m.pt2")), isolation="process")
    copy = model.copy_module()
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.module(x), tiny_cnn(x))


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))


def test_export_in_train_mode_is_refused_with_how_to_reexport(tmp_path):
    net = DropoutNet().train()
    program = torch.export.export(net, (torch.rand(3, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "train.pt2"))
    with pytest.raises(AnalyzerError, match=r"train mode.*model\.eval\(\) before torch\.export\.export"):
        load_model(str(tmp_path / "train.pt2"))


def test_export_with_fixed_batch_is_refused_with_how_to_reexport(tmp_path, tiny_cnn):
    torch.export.save(torch.export.export(tiny_cnn, (torch.rand(2, 1, 8, 8),)), str(tmp_path / "fixed.pt2"))
    with pytest.raises(AnalyzerError, match=r"fixed batch size of 2.*dynamic_shapes"):
        load_model(str(tmp_path / "fixed.pt2"))


def test_safetensors_state_dict_with_sample_arch_equals_the_sample(tmp_path):
    sample = load_model("sample:digits")
    path = tmp_path / "digits.safetensors"
    save_file(sample.module.state_dict(), str(path))
    model = load_model(str(path), arch="digits", isolation="process")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model.module(x), sample.module(x))
    assert model.source == "state_dict"


def test_lightning_checkpoint_with_prefixed_keys_loads(tmp_path):
    sample = load_model("sample:digits")
    state = {f"model.{k}": v for k, v in sample.module.state_dict().items()}
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = load_model(str(path), arch="digits", isolation="process")
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.module(x), sample.module(x))


def test_state_dict_that_does_not_fit_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    state = get_sample("digits").build_model().state_dict()
    del state["fc2.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["fc1.weight"] = torch.zeros(5, 5)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(AnalyzerError, match=r"missing: fc2\.bias; unexpected: extra\.weight; mis-shaped: fc1\.weight "
                                            r"\(5, 5\) vs \(64, 512\)"):
        load_model(str(path), arch="digits")


def test_state_dict_without_arch_says_to_pass_arch(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(AnalyzerError, match="pass --arch"):
        load_model(str(path))


def test_import_path_arch_only_from_the_command_line(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TinyCNN().state_dict(), str(path))
    with pytest.raises(AnalyzerError, match="only the command line accepts"):
        load_model(str(path), arch="tests.conftest:TinyCNN", input_shape=(1, 8, 8))
    model = load_model(str(path), arch="tests.conftest:TinyCNN", input_shape=(1, 8, 8), allow_import=True)
    assert model.num_classes == 3


@pytest.mark.parametrize("arch, message", [
    ("os:system", "builtin_function_or_method, not an nn.Module class"),  # refused before it is called
    ("collections:OrderedDict", "is a type, not an nn.Module class"),
    (":", "is not package.module:ClassOrFunction"),
    ("os.:x", "is not package.module:ClassOrFunction"),
    ("os.path:join", r"building the architecture 'os.path:join' with no arguments failed \(TypeError"),
    ("torch.nn:Linear", "missing 2 required positional arguments"),
])
def test_import_path_arch_that_is_not_a_model_is_one_line(tmp_path, arch, message):
    path = tmp_path / "w.safetensors"
    save_file(TinyCNN().state_dict(), str(path))
    with pytest.raises(AnalyzerError, match=message) as info:
        load_model(str(path), arch=arch, input_shape=(1, 8, 8), allow_import=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, data, message", [
    ("model.onnx", b"\x08\x01", "not a supported model file"),
    ("model.pt2", b"", "is empty"),
    ("model.pt2", b"PK\x03\x04garbage", "not a readable zip archive"),
    ("model.safetensors", b"\x00" * 16, "not a readable safetensors file"),
    ("model.pt", b"not a zip at all", "not a file written by torch.save"),
])
def test_broken_or_unknown_files_are_refused_with_one_line(name, data, message):
    with pytest.raises(AnalyzerError, match=message) as info:
        load_model_bytes(data, name=name, arch="digits")
    assert "\n" not in str(info.value)


def test_truncated_export_is_refused_without_a_traceback_in_the_log(tmp_path, tiny_cnn, caplog):
    path = export_model(tiny_cnn, torch.rand(2, 1, 8, 8), tmp_path / "m.pt2")
    data = path.read_bytes()
    with pytest.raises(AnalyzerError, match="torch.export"):
        load_model_bytes(data[: len(data) // 2], name="m.pt2")
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("outputs, message", [
    (lambda x: torch.full((x.shape[0], 3), float("nan")), "NaN"),
    (lambda x: torch.zeros(x.shape[0], 3, 2), "regression and multi-label outputs are not supported"),
])
def test_models_with_unusable_outputs_are_refused(outputs, message):
    class Odd(nn.Module):
        def forward(self, x):
            return outputs(x)

    with pytest.raises(AnalyzerError, match=message):
        wrap_module(Odd(), (4,))


def test_model_whose_forward_raises_is_refused():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(AnalyzerError, match="the model failed on an input of shape \\(3, 4\\) \\(mat1 and mat2"):
        wrap_module(Broken(), (4,))


def test_output_kinds_are_recognised():
    class Probs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).softmax(1)

    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)
            nn.init.constant_(self.fc.weight, 2.0)

        def forward(self, x):
            return self.fc(x)

    assert wrap_module(Probs(), (4,)).output_kind == "probabilities"
    binary = wrap_module(OneLogit(), (4,))
    assert (binary.output_kind, binary.num_classes) == ("binary_logit", 2)


def test_wrap_module_hands_a_train_mode_module_back_in_train_mode():
    """issue 19, item 11: wrap_module put a train-mode module into eval mode, though the README promises it comes
    back as it came; analyses still see it in eval mode (dropout off: two predictions agree exactly)."""
    import analyzers

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 3))
    module.train()
    module[2].eval()  # a mixed mode, as after freezing one layer: every flag must come back as it was
    modes = [m.training for m in module.modules()]
    wrapped = analyzers.wrap_module(module, input_shape=(1, 8, 8))
    assert [m.training for m in module.modules()] == modes
    x = torch.rand(16, 1, 8, 8).numpy()
    first = analyzers.predict(wrapped, x, np.zeros(16, dtype=np.int64), batch_size=8)
    second = analyzers.predict(wrapped, x, np.zeros(16, dtype=np.int64), batch_size=8)
    assert np.array_equal(first.probs, second.probs)
    assert [m.training for m in module.modules()] == modes
