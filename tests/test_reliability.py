"""Reliability: every analysis hands the model back untouched; bad models met during a run give one-line errors; a full
upload workspace refuses in the dashboard without losing what it holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analyzers import AnalyzerError, explain, predict, wrap_module
from analyzers.explanations.attributions import METHODS
from analyzers.explanations.completeness import ig_completeness
from analyzers.explanations.faithfulness import randomisation_check
from analyzers.explanations.perturbation import deletion_insertion
from analyzers.training.gradients import gradient_norm_traces, overfit_one_batch
from analyzers.explanations.projections import collect_embeddings

ROOT = Path(__file__).resolve().parents[1]


class BusyNet(nn.Module):
    """Batch norm (buffers that train mode would update), dropout, an in-place ReLU and a reused module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x):
        x = self.relu(self.bn(self.conv1(x)))
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


def _state(module: nn.Module):
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {n: (p.grad.clone() if p.grad is not None else None, p.requires_grad) for n, p in module.named_parameters()},
            [m.training for m in module.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()))


ANALYSES = {
    **{f"explain:{name}": (lambda m, x, y, name=name: explain(
        m, x, None, name, layer="conv2" if name == "gradcam" else None, background=x, n_steps=8, nsamples=8,
        nt_samples=4)) for name in METHODS if name != "attention_rollout"},  # BusyNet has no attention: see
    # tests/test_attention.py for the model handed back untouched by the attention capture rollout reads
    "predict": lambda m, x, y: predict(m, x, y, batch_size=4, layer="fc"),
    "deletion_insertion": lambda m, x, y: deletion_insertion(m, x, np.random.default_rng(0).random(x.shape), steps=4),
    "randomisation_check": lambda m, x, y: randomisation_check(m, x[:2], "saliency"),
    "ig_completeness": lambda m, x, y: ig_completeness(m, x[:2], n_steps=8),
    "gradient_norm_traces": lambda m, x, y: gradient_norm_traces(m, x, y, batch_size=4, num_batches=2),
    "overfit_one_batch": lambda m, x, y: overfit_one_batch(m, x, y, steps=5, batch_size=4),
    "collect_embeddings": lambda m, x, y: collect_embeddings(m, x, "conv2", batch_size=4),
}


@pytest.mark.parametrize("analysis", sorted(ANALYSES))
def test_every_analysis_hands_the_model_back_untouched(analysis):
    torch.manual_seed(0)
    module = BusyNet().train()  # a user's model mid-training: train mode, gradients present
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    nn.functional.cross_entropy(module(torch.as_tensor(x)), torch.as_tensor(y)).backward()
    before = _state(module)
    ANALYSES[analysis](module, x, y)
    after = _state(module)
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), f"{analysis} changed {key}"
    for name, (grad, requires) in before[1].items():
        assert torch.equal(grad, after[1][name][0]) and requires == after[1][name][1], f"{analysis} changed {name}"
    assert before[2] == after[2], f"{analysis} changed train/eval modes"
    assert before[3] == after[3], f"{analysis} left hooks"


class _Flaky(nn.Module):
    """Fine on the random probe at load time; misbehaves on real inputs marked by a value of 5."""

    def __init__(self, failure: str):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.failure = failure

    def forward(self, x):
        out = self.fc(x)
        marked = (x == 5).any()
        if marked and self.failure == "raise":
            raise RuntimeError("index 7 is out of bounds")
        if marked and self.failure == "nan":
            return out * float("nan")
        if marked and self.failure == "shape":
            return out[:, :2].unsqueeze(1)
        return out


@pytest.mark.parametrize("failure, message", [
    ("raise", r"the model's forward failed on samples 4\.\.7 \(index 7 is out of bounds\)"),
    ("nan", r"the model returned NaN or inf on samples 4\.\.7"),
    ("shape", r"the model returned \(4, 1, 2\) for a batch of 4; expected \(N, classes\)"),
])
def test_a_model_that_fails_on_the_data_gives_one_line(failure, message):
    model = wrap_module(_Flaky(failure), (4,))
    x = np.zeros((10, 4), dtype=np.float32)
    x[6, 2] = 5
    with pytest.raises(AnalyzerError, match=message) as info:
        predict(model, x, np.zeros(10, int), batch_size=4)
    assert "\n" not in str(info.value)


def test_full_workspace_refuses_an_upload_in_the_dashboard_and_keeps_working(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs = tmp_path / "runs"
    monkeypatch.setenv("DASHBOARD_RUNS_DIR", str(runs))
    monkeypatch.setenv("DASHBOARD_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("DASHBOARD_MAX_UPLOAD_MB", "1")
    monkeypatch.delenv("DASHBOARD_RUN", raising=False)
    stored = tmp_path / "workspace" / "uploads" / "earlier-model.pt2"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"k" * 900_000)
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.switch_page("views/load.py").run()
    at.segmented_control(key="load-source").set_value("Upload files").run()
    at.file_uploader(key="load-model-file").upload("model.pt2", b"m" * 200_000).run()
    at.file_uploader(key="load-data-file").upload("data.npz", b"d" * 10).run()
    at.button(key="load-run-upload").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "upload workspace is full" in at.error[0].value
    assert stored.read_bytes() == b"k" * 900_000
    assert [p.name for p in stored.parent.iterdir()] == ["earlier-model.pt2"]
    at.switch_page("views/overview.py").run()
    assert not at.exception
