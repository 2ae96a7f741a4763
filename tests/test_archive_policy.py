"""The archive policy refuses every crafted `.pt2` before torch parses it, and lets real exports through unchanged."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from analyzers.loading.archive_policy import ArchivePolicyError, parse_size_expression, sanitize_export_archive
from architectures import ARCHITECTURES, build
from conftest import ROOT, TinyCNN, export_model
from crafted_archives import CRAFTED, EXPECTED, HOP_CRAFTED


@pytest.fixture(scope="module")
def base_export(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    path = export_model(TinyCNN(), torch.zeros(2, 1, 8, 8), tmp_path_factory.mktemp("base") / "model.pt2")
    return path.read_bytes()


@pytest.fixture(scope="module")
def cond_export(tmp_path_factory) -> bytes:
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda v: self.fc(v).relu(), lambda v: self.fc(v).sigmoid(), (x,))

    path = export_model(Branchy(), torch.randn(2, 4), tmp_path_factory.mktemp("cond") / "cond.pt2")
    return path.read_bytes()


def _assert_refused(data: bytes, name: str, tmp_path):
    with pytest.raises(ArchivePolicyError) as caught:
        sanitize_export_archive(data, "crafted.pt2")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("'crafted.pt2' is refused: ")
    assert EXPECTED[name] in message, message
    return message


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_archive_is_refused_with_one_line_naming_it(name, base_export, tmp_path):
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_bytes(b"precious")
    data = CRAFTED[name](base_export, marker, victim)
    _assert_refused(data, name, tmp_path)
    assert not marker.exists() and victim.read_bytes() == b"precious"


def test_subgraph_of_a_higher_order_op_is_checked(cond_export, tmp_path):
    sanitize_export_archive(cond_export, "cond.pt2")  # the real export passes
    for name, make in HOP_CRAFTED.items():
        _assert_refused(make(cond_export, tmp_path / "m", tmp_path / "v"), name, tmp_path)


@pytest.mark.parametrize("name", ["expr_str in a size", "opaque object constant", "from_file then fill_"])
def test_the_three_reported_vectors_fail_through_the_cli_and_nothing_happens(name, base_export, tmp_path):
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_bytes(b"precious")
    model = tmp_path / "crafted.pt2"
    model.write_bytes(CRAFTED[name](base_export, marker, victim))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    done = subprocess.run([sys.executable, "-m", "analyzers", "run", "--model", str(model), "--data", str(data),
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line
             and "return cls.__new__" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: 'crafted.pt2' is refused"), done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists() and victim.read_bytes() == b"precious"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_real_exports_pass_and_load_to_the_same_outputs(arch, tmp_path):
    model = build(arch)
    path = export_model(model, torch.randn(2, *model.input_shape), tmp_path / f"{arch}.pt2")
    checked = sanitize_export_archive(path.read_bytes(), path.name)
    x = torch.randn(3, *model.input_shape)
    original = torch.export.load(str(path)).module()(x)
    rebuilt = torch.export.load(io.BytesIO(checked.data)).module()(x)
    assert torch.equal(original, rebuilt)
    assert any("aten" in op for op in checked.operators)


def test_every_sample_model_export_passes(tmp_path):
    from sample_models import SAMPLE_NAMES, get_sample

    for name in SAMPLE_NAMES:
        sample = get_sample(name)
        path = export_model(sample.build_model(), torch.rand(2, *sample.input_shape), tmp_path / f"{name}.pt2")
        sanitize_export_archive(path.read_bytes(), path.name)


@pytest.mark.parametrize("text", ["Symbol('s77', positive=True, integer=True)", "Mul(Integer(16), Symbol('s77'))",
                                  "FloorDiv(s0 + 2, 3)", "Max(Mod(s1, 4), Min(s2, -1))", "16*s77 - s3//2"])
def test_size_grammar_accepts_what_torch_writes(text):
    parse_size_expression(text)


@pytest.mark.parametrize("text", ["__import__('os')", "s77.__class__", "Symbol('s77', evil=True)", "lambda: 1",
                                  "s0 ** 2", "Integer(" + "9" * 40 + ")", "Mod(s0)", "'abc'", "s0; s1",
                                  "Function('f')(s0)", "(" * 100 + "s0" + ")" * 100])
def test_size_grammar_refuses_everything_else(text):
    with pytest.raises(ValueError):
        parse_size_expression(text)
