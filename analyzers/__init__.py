"""Pure computation for the model-debugging dashboard: tensors and arrays in, frozen dataclasses and arrays out.

Modules are grouped by the question they answer: `loading` (models, datasets, runs, the workspace and the sandbox),
`evaluation` (metrics, slices, label noise, comparison), `explanations` (attributions, faithfulness, projections),
`training` (gradients, the recorder) and `engines` (the run pipeline, batched inference). `errors` and `guard` are
shared by all of them. `show` and `serve` (`notebook`) are the notebook entry point: a run's report inline, and the
dashboard in the background.

Heavy dependencies (captum, shap, umap, scikit-learn's estimators) are imported only by the functions that need them,
so `import analyzers` stays cheap.
"""
from __future__ import annotations

import importlib

from .errors import AnalyzerError

# public name -> module that defines it; resolved on first access
_EXPORTS = {
    "load_model": "loading.models", "load_model_bytes": "loading.models", "wrap_module": "loading.models", "LoadedModel": "loading.models",
    "load_dataset": "loading.datasets", "load_dataset_bytes": "loading.datasets", "check_dataset": "loading.datasets", "Dataset": "loading.datasets",
    "predict": "engines.inference", "Predictions": "engines.inference",
    "run_analysis": "engines.pipeline", "load_run_inputs": "engines.pipeline",
    "open_run": "loading.runs", "list_runs": "loading.runs", "delete_run": "loading.runs", "Run": "loading.runs",
    "analysis_mode": "guard",
    "explain": "explanations.attributions",
    "explain_sample": "explanations.explain_run",
    "evaluate": "evaluation.stage",
    "find_slices": "evaluation.slices",
    "find_label_issues": "evaluation.label_noise",
    "compare_runs": "evaluation.comparison",
    "project": "explanations.projections", "ensure_projection": "explanations.projections",
    "gradient_norm_traces": "training.gradients", "overfit_one_batch": "training.gradients",
    "TrainingRecorder": "training.recorder", "read_training_log": "training.recorder",
    "show": "notebook", "serve": "notebook",
}

__all__ = ["AnalyzerError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analyzers' has no attribute {name!r}")
