"""Smoke run of `benchmarks/run_benchmarks.py --quick`: it runs the real code paths on a few hundred samples and writes a
result file whose rows carry the ratios the full benchmark reports. The slow sections (projections, dashboard) and the
ones that only repeat code paths checked here are skipped to keep this test fast."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# The quick benchmark takes about two minutes on 2 cores: `make bench` runs it (pytest -m benchmark), after the
# benchmark itself, so the suite stays within its 20 minutes.
pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_benchmarks.py"
SKIPPED = "projections,dashboard,interactive,tabular,upload,waits,trust,tables"  # tables: the scale section runs the same dashboard walk; upload: the live-server tests cover it; waits: minutes; trust: tests/test_faithfulness.py checks its verdicts


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--sizes", "200,400", "--skip", SKIPPED,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "quick.json").read_text())


def _rows(document, section):
    return [r for r in document["results"] if r["section"] == section]


def test_writes_json_and_markdown_with_the_expected_keys(quick_result):
    out, document = quick_result
    assert {"meta", "floors", "results", "skipped", "errors", "details"} <= set(document)
    assert document["errors"] == {}
    assert document["meta"]["quick"] is True and document["meta"]["sizes"] == [200, 400]
    for section in SKIPPED.split(","):
        assert document["skipped"][section] == "skipped by --skip"
    for row in document["results"]:
        assert {"section", "what", "n", "seconds", "floor", "floor_seconds", "ratio", "target", "met"} <= set(row)
    markdown = (out / "quick.md").read_text()
    assert markdown.startswith("# Benchmark results") and "| Section | What | N |" in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == len(document["results"]) + 1


def test_run_rows_are_ratios_to_the_forward_floor_of_each_size(quick_result):
    _, document = quick_result
    rows = [r for r in _rows(document, "run") if r["target"] == 1.5]
    # per size, the run of every stage but the gradient traces, and the same without the data-health stage
    whole = [r["n"] for r in rows if r["what"] == "analyzers run (all stages but gradient traces)"]
    assert whole == [200, 400] and sorted({r["n"] for r in rows}) == [200, 400]
    for row in rows:
        floor = document["floors"][str(row["n"])]["forward_s"]
        assert row["floor"] == "forward" and row["floor_seconds"] == pytest.approx(floor, abs=1e-3)
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_seconds"], rel=1e-2)
        assert row["met"] == (row["ratio"] <= 1.5)
    # the stages' imports, start-up cost measured apart in each size's fresh worker (it has no target of its own)
    imports = [r for r in _rows(document, "run") if r["what"].startswith("start-up: the stages' imports")]
    assert [r["n"] for r in imports] == [200, 400] and all(r["seconds"] > 0 and r["target"] is None for r in imports)
    memory = [r for r in _rows(document, "memory") if r["unit"] == "MiB" and r["target"] is not None]
    assert [r["n"] for r in memory] == [200, 400]
    assert all(math.isfinite(r["value"]) and r["met"] == (r["value"] <= 1536) for r in memory)
    after_load = [r for r in _rows(document, "memory") if "once it is loaded" in r["what"]]
    assert [r["n"] for r in after_load] == [200, 400]
    assert all(r["value"] <= m["value"] + 1 for r, m in zip(after_load, memory))  # a part of the whole run's peak


def test_explanations_every_sample_are_ratios_to_the_gradient_floor(quick_result):
    _, document = quick_result
    if "explain_all" in document["skipped"]:
        pytest.skip(document["skipped"]["explain_all"])
    rows = [r for r in _rows(document, "explain_all") if r["target"] == 1.3]
    assert sorted((r["what"].split()[0], r["n"]) for r in rows) == [("gradcam", 200), ("gradcam", 400),
                                                                    ("saliency", 200), ("saliency", 400)]
    for row in rows:
        assert row["floor"] == "forward+backward" and row["ratio"] > 0
        assert row["floor_seconds"] == pytest.approx(document["floors"][str(row["n"])]["forward_backward_s"], abs=1e-3)


def test_startup_and_peer_rows(quick_result):
    _, document = quick_result
    startup = _rows(document, "startup")
    targeted = [r for r in startup if r["target"] is not None]
    assert len(targeted) == 2 and all(r["floor"] == "import torch" and r["target"] == 1.0 for r in targeted)
    assert all(r["floor"] == "import torch" and r["ratio"] > 0 for r in startup if r["target"] is None)
    assert document["floors"]["import_torch_s"] > 0
    if "peer images" in document["skipped"]:
        pytest.skip(document["skipped"]["peer images"])
    peer = _rows(document, "peer")
    base = [r for r in peer if r["floor"] is None]
    assert len(base) == 1 and base[0]["seconds"] > 0
    assert all(r["floor_seconds"] == base[0]["seconds"] and r["ratio"] > 0 for r in peer if r["floor"])


def test_sandbox_rows_compare_the_worker_with_this_process(quick_result):
    _, document = quick_result
    rows = _rows(document, "sandbox")
    round_trips = [r for r in rows if r["unit"] == "ms"]
    assert sorted(r["what"].split(",")[0] for r in round_trips) == ["gradcam", "saliency"]
    detail = document["details"]["sandbox"]
    for row in round_trips:
        method = detail["methods"][row["what"].split(",")[0]]
        assert method["bit_identical"] is True  # the worker computes the very same maps
        beyond = (method["worker_median_s"] - method["in_process_median_s"]) * 1000
        # the row keeps four significant digits (_round): a loaded machine can make the difference 100+ ms
        assert row["value"] == pytest.approx(beyond, rel=1e-3, abs=1e-2) and row["met"] == (row["value"] <= 5.0)
    (run,) = [r for r in rows if r["unit"] == "s"]
    assert run["n"] == 400 and run["floor"] == "the same run in-process" and run["target"] == 1.05
    assert run["floor_seconds"] == pytest.approx(detail["runs"]["process"]["fastest_wall_s"], rel=1e-3)
    assert run["ratio"] == pytest.approx(run["seconds"] / run["floor_seconds"], rel=1e-2)
    assert detail["runs"]["last_sandbox_record"]["level"] in ("full", "reduced")

def test_bad_arguments_exit_with_a_message():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip", "nonsense"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section(s) nonsense" in proc.stderr


def test_evaluation_rows_per_task_are_ratios_to_the_classification_total(quick_result):
    _, document = quick_result
    rows = _rows(document, "evaluation")
    detail = document["details"]["evaluation"]
    assert detail["n"] == 2000 and set(detail["tasks"]) == {"classification", "regression", "multilabel"}
    (base,) = [r for r in rows if r["what"] == "classification: evaluate() total"]
    assert base["floor"] is None and base["seconds"] > 0
    for name, task in detail["tasks"].items():
        assert task["planted_is_top"] is True, task  # the planted region is the top slice in every task
        parts = {r["what"].split(": ", 1)[1] for r in rows if r["what"].startswith(f"{name}: ")}
        assert {"evaluate() total", "metrics", "slices"} <= parts
        assert ("per_label" in parts) == (name == "multilabel")
    for row in rows:
        if row is not base:
            assert row["floor"] == "classification evaluate()" and row["floor_seconds"] == base["seconds"]
            assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_seconds"], rel=1e-2, abs=1e-3)


def test_health_rows_are_curves_against_the_forward_floor_and_the_profile_against_a_plain_timing(quick_result):
    _, document = quick_result
    if "health" in document["skipped"]:
        pytest.skip(document["skipped"]["health"])
    rows = _rows(document, "health")
    detail = document["details"]["health"]
    curves = [r for r in rows if r["what"].startswith("robustness curve: ")]
    assert {"gaussian_noise", "occlusion"} <= set(detail["curves"])
    assert sorted(r["what"].split(": ", 1)[1] for r in curves) == sorted(detail["curves"])
    for row in curves:
        curve = detail["curves"][row["what"].split(": ", 1)[1]]
        count = len(curve["strengths"])
        assert curve["strengths"][0] == 0 and curve["model_unchanged"] is True, curve["model_changes"]
        assert row["n"] == 200 and row["floor"] == f"forward x {count}" and row["target"] == 1.5
        assert row["floor_seconds"] == pytest.approx(curve["floor_forward"]["wall_s"] * count, rel=1e-3)
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_seconds"], rel=1e-2)
        assert row["met"] == (row["ratio"] <= 1.5)
    profile = [r for r in rows if r["what"].startswith("inference profile: ")]
    assert len(profile) == 2 and detail["profile"]["model_unchanged"] is True
    for row in profile:
        assert row["target_kind"] == "within" and row["target"] == 0.2
        assert row["floor_seconds"] == pytest.approx(detail["profile"]["plain_per_forward_s"], rel=1e-3)
        assert row["met"] == (abs(row["ratio"] - 1) <= 0.2)
