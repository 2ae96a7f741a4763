"""The public names of `analyzers` stay what they say, whichever submodules were imported first."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import analyzers
from tests.conftest import ROOT


def test_public_names_are_not_shadowed_by_submodules():
    for info in pkgutil.walk_packages(analyzers.__path__, prefix="analyzers."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in analyzers.__all__:
        value = getattr(analyzers, name)
        assert not isinstance(value, type(analyzers)), f"analyzers.{name} is a module, not the public {name}"
    assert callable(analyzers.explain) and callable(analyzers.load_model)


def test_import_analyzers_stays_light():
    code = ("import sys, analyzers; heavy = [m for m in ('captum', 'shap', 'umap', 'openTSNE', 'sklearn', 'streamlit', "
            "'pandas', 'torch') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
