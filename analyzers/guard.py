"""Analyses borrow a model and hand it back exactly as they found it.

`analysis_mode(module)` holds the model's lock (a model cached by the dashboard is shared by every browser session),
puts it in eval mode, and on the way out restores every submodule's train/eval flag and each parameter's `.grad`
and `requires_grad`, and checks that no hook was left behind.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

from torch import nn

from .errors import AnalyzerError

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def lock_for(module: nn.Module) -> threading.RLock:
    """The one lock of this module object, shared by every thread that analyses it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def _hook_count(module: nn.Module) -> int:
    total = 0
    for sub in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(sub, attr, {}) or {})
    return total


@contextlib.contextmanager
def analysis_mode(module: nn.Module, *, train: bool = False):
    """Lock `module`, switch it to eval (or train) mode, and restore everything about it on exit."""
    with lock_for(module):
        modes = [(sub, sub.training) for sub in module.modules()]
        params = list(module.parameters())
        grads = [p.grad for p in params]
        requires = [p.requires_grad for p in params]
        hooks_before = _hook_count(module)
        module.train(train)
        try:
            yield module
        finally:
            for sub, mode in modes:
                sub.training = mode
            for p, grad, req in zip(params, grads, requires):
                p.grad = grad
                p.requires_grad_(req)
            leaked = _hook_count(module) - hooks_before
        if leaked:
            raise AnalyzerError(f"an analysis left {leaked} hook(s) on the model; this is a bug in the analysis")


def unwrap(model) -> nn.Module:
    """The `nn.Module` inside a `LoadedModel`, or the module itself."""
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise AnalyzerError(f"expected a torch.nn.Module or a loaded model, got {type(model).__name__}")
    return module
