"""`TrainingRecorder`: a few lines in a training loop log what the dashboard's training panel shows.

    recorder = TrainingRecorder("train.log.jsonl", model)
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y)
        optimizer.zero_grad(); loss.backward()
        recorder.log_step(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])  # after backward
        optimizer.step()
    recorder.log_validation(step, val_loss=..., val_accuracy=...)
    recorder.close()

Each line of the file is one JSON record: `{"step", "loss", "lr", "grad_norms": {layer: norm}}` for training steps,
`{"step", "val_loss", "val_accuracy"}` for validation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..errors import AnalyzerError


def layer_of_parameter(name: str) -> str:
    """The module a parameter belongs to: `features.0.weight` -> `features.0` (a top-level parameter names itself)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def layer_grad_norms(model: nn.Module) -> dict:
    """L2 norm of the gradient of each module's own parameters, keyed by module name."""
    squares: dict = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        layer = layer_of_parameter(name)
        squares[layer] = squares.get(layer, 0.0) + float(param.grad.detach().double().pow(2).sum())
    return {layer: math.sqrt(total) for layer, total in squares.items()}


class TrainingRecorder:
    """Appends one JSON line per training step (loss, learning rate, per-layer gradient norms) to `path`."""

    def __init__(self, path: str | Path, model: nn.Module | None = None, *, every: int = 1):
        if every < 1:
            raise AnalyzerError(f"every must be at least 1, got {every}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.every = every
        self._file = open(self.path, "w", encoding="utf-8")

    def log_step(self, step: int, *, loss: float, lr: float | None = None, **extra) -> None:
        """Call after `loss.backward()` and before `optimizer.step()`, so the gradients are this step's."""
        if step % self.every:
            return
        record = {"step": int(step), "loss": float(loss)}
        if lr is not None:
            record["lr"] = float(lr)
        if self.model is not None:
            record["grad_norms"] = layer_grad_norms(self.model)
        record.update({k: float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in extra.items()})
        self._write(record)

    def log_validation(self, step: int, *, val_loss: float, val_accuracy: float | None = None) -> None:
        record = {"step": int(step), "val_loss": float(val_loss)}
        if val_accuracy is not None:
            record["val_accuracy"] = float(val_accuracy)
        self._write(record)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_training_log(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(steps, validation, grad_norms) tables from a recorder's file; grad_norms has one column per layer."""
    path = Path(path)
    if not path.is_file():
        raise AnalyzerError(f"training log {path} does not exist: write one with TrainingRecorder")
    steps, validation, norms = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise AnalyzerError(f"line {number} of {path} is not JSON: the log is damaged") from exc
        if "val_loss" in record:
            validation.append(record)
        else:
            grad = record.pop("grad_norms", None)
            steps.append(record)
            if grad:
                norms.append({"step": record["step"], **grad})
    return pd.DataFrame(steps), pd.DataFrame(validation), pd.DataFrame(norms)
