"""Pure computation for the model-debugging dashboard: tensors and arrays in, frozen dataclasses and arrays out.

Heavy dependencies (captum, shap, umap, scikit-learn's estimators) are imported only by the functions that need them,
so `import analyzers` stays cheap.
"""
from __future__ import annotations

import importlib

from .errors import AnalyzerError

# public name -> module that defines it; resolved on first access
_EXPORTS = {
    "load_model": "models", "load_model_bytes": "models", "wrap_module": "models", "LoadedModel": "models",
    "load_dataset": "datasets", "load_dataset_bytes": "datasets", "check_dataset": "datasets", "Dataset": "datasets",
    "predict": "inference", "Predictions": "inference",
    "run_analysis": "pipeline", "load_run_inputs": "pipeline",
    "open_run": "runs", "list_runs": "runs", "delete_run": "runs", "Run": "runs",
    "analysis_mode": "guard",
    "explain": "attributions", "explain_sample": "explain_run",
    "evaluate": "evaluation", "find_slices": "slices", "find_label_issues": "label_noise", "compare_runs": "comparison",
    "project": "projections", "ensure_projection": "projections",
    "gradient_norm_traces": "gradients", "overfit_one_batch": "gradients",
    "TrainingRecorder": "recorder", "read_training_log": "recorder",
}

__all__ = ["AnalyzerError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analyzers' has no attribute {name!r}")
