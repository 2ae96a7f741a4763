"""The one training loop every sample uses: deterministic, logged with `analyzers.TrainingRecorder`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from analyzers.training.recorder import TrainingRecorder


def _task(task: str, model_outputs: int):
    """The task object (`analyzers.evaluation.tasks`) and the output kind its model's raw output is read as."""
    from analyzers.evaluation.tasks import task_named

    task_obj = task_named(task, model_outputs)
    return task_obj, task_obj.output_kind or "logits"  # the samples' classifiers return logits


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 512, *,
             task: str = "classification") -> tuple[float, float]:
    """(mean loss, headline score) of `model` on arrays: the task's loss (cross-entropy, squared error, the sum of
    the labels' binary cross-entropies) and accuracy, or for a regression the mean absolute error (for multi-label,
    subset accuracy: every label right)."""
    model.eval()
    losses, score = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[start:start + batch_size], dtype=torch.float32)
            out = model(xb)
            if task == "regression":
                yb = torch.as_tensor(y[start:start + batch_size], dtype=torch.float32)
                losses += float(((out[:, 0] - yb) ** 2).sum())
                score += float((out[:, 0] - yb).abs().sum())
            elif task == "multilabel":
                task_obj, kind = _task(task, out.shape[1])
                yb = torch.as_tensor(y[start:start + batch_size])
                losses += float(task_obj.loss_from_raw(out, yb, kind).sum())
                score += int((~task_obj.wrong(yb.numpy(), task_obj.outputs_from_raw(out, kind).numpy())).sum())
            else:
                yb = torch.as_tensor(y[start:start + batch_size], dtype=torch.long)
                losses += float(F.cross_entropy(out, yb, reduction="sum"))
                score += int((out.argmax(1) == yb).sum())
    return losses / len(x), score / len(x)


def fit(name: str, build_model: Callable[[], nn.Module], train, test, *, out_dir: str | Path, epochs: int,
        lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0, log_every: int = 1,
        task: str = "classification", threads: int | None = None) -> dict:
    """`_fit` with torch on `threads` threads while it trains (restored afterwards; None leaves them as they are):
    a small model trains faster on one thread than on two busy cores, and gives the same numbers on any machine."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(name, build_model, train, test, out_dir=out_dir, epochs=epochs, lr=lr, batch_size=batch_size,
                    weight_decay=weight_decay, seed=seed, log_every=log_every, task=task)
    finally:
        torch.set_num_threads(previous)


def _fit(name: str, build_model: Callable[[], nn.Module], train, test, *, out_dir: str | Path, epochs: int,
         lr: float, batch_size: int, weight_decay: float, seed: int, log_every: int, task: str) -> dict:
    """Build a model (seeded, so its initial weights do not depend on what ran before), train it on `train` (a
    SampleData), log every step, save weights and a summary; returns the summary.

    Writes `<name>.safetensors`, `<name>.log.jsonl` and `<name>.json` (test accuracy, or a regression's test MAE,
    seed, epochs) into `out_dir`. A regression (`task`) is trained on the squared error, a multi-label model on its
    labels' binary cross-entropies (its test accuracy is subset accuracy).
    """
    regression = task == "regression"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model()
    torch.manual_seed(seed)  # dropout and the rest of training draw the same numbers whatever the architecture drew
    rng = np.random.default_rng(seed)
    x = np.asarray(train.x, dtype=np.float32)
    y = np.asarray(train.y, dtype=np.float32 if regression else np.int64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = int(np.ceil(len(x) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    step = 0
    with TrainingRecorder(out_dir / f"{name}.log.jsonl", model, every=log_every) as recorder:
        for _ in range(epochs):
            model.train()
            order = rng.permutation(len(x))
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                xb, yb = torch.as_tensor(x[idx]), torch.as_tensor(y[idx])
                out = model(xb)
                if task == "multilabel":  # the sum of the labels' binary cross-entropies, as the dashboard reads it
                    task_obj, kind = _task(task, out.shape[1])
                    loss = task_obj.loss_from_raw(out, yb, kind).mean()
                else:
                    loss = F.mse_loss(out[:, 0], yb) if regression else F.cross_entropy(out, yb)
                optimizer.zero_grad()
                loss.backward()
                recorder.log_step(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                step += 1
            val_loss, val_score = evaluate(model, test.x, test.y, task=task)
            recorder.log_validation(step, val_loss=val_loss, val_accuracy=None if regression else val_score)
    model.eval()
    _, test_score = evaluate(model, test.x, test.y, task=task)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / f"{name}.safetensors"))
    summary = {"name": name, "test_mae" if regression else "test_accuracy": test_score, "epochs": epochs,
               "seed": seed, "lr": lr,
               "batch_size": batch_size, "train_size": len(x), "test_size": len(test.y)}
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary
