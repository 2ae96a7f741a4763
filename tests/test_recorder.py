"""TrainingRecorder: what a training loop logs comes back from read_training_log, gradient norms included."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from analyzers.errors import AnalyzerError
from analyzers.training.recorder import TrainingRecorder, layer_of_parameter, read_training_log


def test_a_training_loop_log_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    expected = []
    path = tmp_path / "logs" / "train.log.jsonl"
    with TrainingRecorder(path, model) as recorder:
        for step in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            # independent reference: the norm of each layer's weight and bias gradients together
            expected.append({name: math.sqrt(float(layer.weight.grad.pow(2).sum() + layer.bias.grad.pow(2).sum()))
                             for name, layer in (("0", model[0]), ("2", model[2]))})
            recorder.log_step(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"], accuracy=torch.tensor(0.5))
            optimizer.step()
        recorder.log_validation(3, val_loss=0.7, val_accuracy=0.5)
    steps, validation, norms = read_training_log(path)
    assert list(steps["step"]) == [0, 1, 2, 3] and list(steps["lr"]) == [0.1] * 4
    assert steps["loss"].is_monotonic_decreasing and steps["accuracy"].tolist() == [0.5] * 4
    assert validation.to_dict("records") == [{"step": 3, "val_loss": 0.7, "val_accuracy": 0.5}]
    np.testing.assert_allclose(norms[["0", "2"]].to_numpy(), [[e["0"], e["2"]] for e in expected], rtol=1e-6)


def test_every_n_steps_and_damaged_logs(tmp_path):
    path = tmp_path / "log.jsonl"
    with TrainingRecorder(path, every=2) as recorder:
        for step in range(5):
            recorder.log_step(step, loss=1.0 / (step + 1))
    steps, validation, norms = read_training_log(path)
    assert list(steps["step"]) == [0, 2, 4] and validation.empty and norms.empty
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(AnalyzerError, match="line 4 .* is not JSON"):
        read_training_log(path)
    with pytest.raises(AnalyzerError, match="does not exist"):
        read_training_log(tmp_path / "missing.jsonl")
    with pytest.raises(AnalyzerError, match="every must be at least 1"):
        TrainingRecorder(tmp_path / "x.jsonl", every=0)


def test_layer_of_parameter():
    assert layer_of_parameter("features.0.weight") == "features.0"
    assert layer_of_parameter("scale") == "scale"


def test_sample_logs_were_written_by_the_recorder():
    from sample_models import get_sample

    steps, validation, norms = read_training_log(get_sample("digits").log_path)
    assert len(steps) > 10 and len(validation) > 0
    assert {"conv1", "conv2", "fc1", "fc2"} <= set(norms.columns)
