"""A damaged run is isolated (issue 19, item 3): every kind of damage a disk, a person or a worker can do to a run is
refused by `open_run` with one line naming the file; every page of that run shows the line as `st.error`; the Load
page lists the run as damaged; every other run, and the Load and Compare pages, keep working."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyzers.loading.run_checks import RunDamaged
from analyzers.loading.runs import check_run_files, open_run

from test_dashboard_app import PAGES, _app, _ok, _plain


def _rewrite_parquet(path: Path, change) -> None:
    table = pd.read_parquet(path)
    change(table).to_parquet(path, index=False)


def _corrupt_pages(path: Path) -> None:
    """Garbage over the data pages of a Parquet file, its footer (schema, row count) left whole."""
    import pyarrow.parquet as pq

    data = bytearray(path.read_bytes())
    footer = pq.read_metadata(path).serialized_size + 8  # the footer, its length and the closing magic
    data[4:len(data) - footer] = bytes(len(data) - footer - 4)
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # still reads


def _findings(run: Path, record: dict) -> None:
    (run / "findings.json").write_text(json.dumps({"findings": [record]}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# name -> (damage, the file the one line must name). The first ten are the list; the rest are their kin.
DAMAGE = {
    "truncated probs.npy": (lambda p: _truncate(p / "probs.npy"), "probs.npy"),
    "garbage samples.parquet": (lambda p: (p / "samples.parquet").write_bytes(b"PAR1 not a table PAR1"),
                                "samples.parquet"),
    "minimal run.json": (lambda p: (p / "run.json").write_text(json.dumps({"format_version": 1})), "run.json"),
    "fewer probs rows than samples": (lambda p: np.save(p / "probs.npy", np.load(p / "probs.npy")[:-7]),
                                      "probs.npy"),
    "missing pred column": (lambda p: _rewrite_parquet(p / "samples.parquet", lambda t: t.drop(columns=["pred"])),
                            "samples.parquet"),
    "labels out of range": (lambda p: _rewrite_parquet(p / "samples.parquet",
                                                       lambda t: t.assign(label=t["label"] + 40)),
                            "samples.parquet"),
    "garbage metrics.json": (lambda p: (p / "metrics.json").write_text("[1, 2, "), "metrics.json"),
    # the stored findings (the Overview and the report word them and link by their class indices)
    "findings.json of an unknown kind": (lambda p: _findings(p, {"kind": "exploit", "impact": 1.0, "details": {}}),
                                         "findings.json"),
    "findings.json naming a class out of range": (lambda p: _findings(p, {"kind": "confusion", "impact": 3.0, "details": {
        "true": 0, "pred": 99, "count": 3, "share_of_true": 0.1}}), "findings.json"),
    "findings.json missing a detail": (lambda p: _findings(p, {"kind": "confusion", "impact": 3.0, "details": {
        "true": 0, "pred": 1, "share_of_true": 0.1}}), "findings.json"),
    "findings.json recall keyed by text": (lambda p: _findings(p, {"kind": "imbalance", "impact": 2.0, "details": {
        "rare": [1], "recall": {"one": 0.5}, "support": {"1": 3}, "ratio": 4.0, "overall_recall": 0.9}}),
                                           "findings.json"),
    "garbage slices.parquet": (lambda p: (p / "slices.parquet").write_bytes(b"\x00" * 64), "slices.parquet"),
    "garbage embeddings": (lambda p: np.save(next((p / "embeddings").glob("*.npy")), np.zeros((3, 2))),
                           "embeddings/"),
    "garbage gradients": (lambda p: (p / "gradients" / "traces.parquet").write_text("grad_norm\n1\n"),
                          "gradients/traces.parquet"),
    "metrics.json of the wrong shape": (lambda p: (p / "metrics.json").write_text(json.dumps({"accuracy": "high"})),
                                        "metrics.json"),
    "slices without ids": (lambda p: _rewrite_parquet(p / "slices.parquet", lambda t: t.drop(columns=["ids"])),
                           "slices.parquet"),
    "gradient flags not lists": (lambda p: (p / "gradients" / "flags.json").write_text(
        json.dumps({"vanishing": "fc1"})), "gradients/flags.json"),
    # one row written whole: the digits run may hold no suspect at all (confident learning estimates 0 wrong labels)
    "label-noise classes out of range": (lambda p: _rewrite_parquet(
        p / "label_noise.parquet", lambda t: pd.DataFrame({"id": [0], "label": [0], "suggested_label": [-1],
                                                           "score": [0.5]})), "label_noise.parquet"),
    "projection of other samples": (lambda p: _rewrite_parquet(
        next((p / "projections").glob("*-2d.parquet")), lambda t: t.iloc[:5]), "projections/"),
    "probabilities that do not sum to one": (lambda p: np.save(p / "probs.npy", np.load(p / "probs.npy") * 0.5),
                                             "probs.npy"),
    # the dashboard's calibration and findings read `confidence` as the top probability (run_checks.check_probs)
    "confidence that is not the top probability": (lambda p: _rewrite_parquet(
        p / "samples.parquet", lambda t: t.assign(confidence=t["confidence"] * 0.9)), "probs.npy"),
    "probabilities with a NaN": (lambda p: np.save(p / "probs.npy", np.where(
        np.arange(np.load(p / "probs.npy").size).reshape(np.load(p / "probs.npy").shape) == 3, np.nan,
        np.load(p / "probs.npy")).astype(np.load(p / "probs.npy").dtype)), "probs.npy"),
    # its footer intact and its pages not: only reading the rows shows it (a large table is footer-checked at open)
    "projection with corrupt pages": (lambda p: _corrupt_pages(next((p / "projections").glob("*-2d.parquet"))),
                                      "projections/"),
    "run.json model without a hash": (lambda p: (p / "run.json").write_text(json.dumps(
        {**json.loads((p / "run.json").read_text()), "model": {"spec": "x"}})), "run.json"),
}


@pytest.fixture(scope="module")
def healthy(sample_run_dir) -> Path:
    return sample_run_dir("digits")


def _damaged_copy(healthy: Path, root: Path, kind: str) -> Path:
    run = root / "broken"
    shutil.copytree(healthy, run)
    DAMAGE[kind][0](run)
    return run


@pytest.mark.parametrize("kind", DAMAGE)
def test_open_run_refuses_each_damage_in_one_line_naming_the_file(kind, healthy, tmp_path):
    run = _damaged_copy(healthy, tmp_path, kind)
    with pytest.raises(RunDamaged) as info:
        open_run(run)
    message = str(info.value)
    assert DAMAGE[kind][1] in message and "\n" not in message, message
    assert re.search(r"run (it )?again|--overwrite", message), message  # it says how to fix it
    open_run(healthy)  # the healthy original is untouched


# the damage a table's footer cannot show: its values; each is refused when the table is read
VALUE_DAMAGE = {"label-noise classes out of range": "label_noise.parquet",
                "projection with corrupt pages": "projections/*-2d.parquet"}


@pytest.mark.parametrize("kind", [k for k in DAMAGE if ".parquet" in DAMAGE[k][1] or DAMAGE[k][1] == "projections/"])
def test_a_large_tables_footer_is_checked_at_open_and_its_values_when_read(kind, healthy, tmp_path, monkeypatch):
    """A 10M-row run's derived tables are checked from their footers when it opens (FOOTER_CHECK_BYTES): made
    0 here, every table is. Each damage is still refused in one line naming the file: at open, or, for a value
    that only the rows show, when a page reads the table."""
    import analyzers.loading.runs as runs

    monkeypatch.setattr(runs, "FOOTER_CHECK_BYTES", 0)
    run = _damaged_copy(healthy, tmp_path, kind)
    if kind not in VALUE_DAMAGE:
        with pytest.raises(RunDamaged, match=re.escape(DAMAGE[kind][1])):
            open_run(run)
        return
    opened = open_run(run)
    relpath = next(run.glob(VALUE_DAMAGE[kind])).relative_to(run).as_posix()  # the table the damage changed
    with pytest.raises(RunDamaged, match=re.escape(relpath)) as info:
        opened.read_parquet(relpath)
    assert "\n" not in str(info.value)


def test_a_projection_damaged_past_its_footer_is_the_embeddings_pages_one_line(healthy, tmp_path, monkeypatch):
    """With every table footer-checked at open, the Embeddings page reads the projection by the run's rules: its
    corrupt pages are one error naming the file and the run, never a library's message."""
    import analyzers.loading.runs as runs

    monkeypatch.setattr(runs, "FOOTER_CHECK_BYTES", 0)
    root = tmp_path / "runs"
    root.mkdir()
    broken = _damaged_copy(healthy, root, "projection with corrupt pages")
    at = _app(monkeypatch, root, run="broken").run()
    at.switch_page("views/embeddings.py").run()
    _ok(at)
    errors = [_plain(e.value) for e in at.error]
    assert any("projections/" in e and str(broken) in e for e in errors), errors


def test_the_healthy_run_passes_every_check(healthy):
    run = open_run(healthy)
    assert len(run.samples) == run.num_samples == run.probs.shape[0]


def test_a_worker_that_writes_a_damaged_analysis_file_stores_nothing(healthy, tmp_path):
    stage = _damaged_copy(healthy, tmp_path, "gradient flags not lists")
    with pytest.raises(Exception, match=r"damaged gradients/flags.json .*nothing was stored"):
        check_run_files(stage, num_samples=450, num_classes=10)


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_page_of_a_damaged_run_shows_one_error(kind, healthy, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    broken = _damaged_copy(healthy, root, kind)
    at = _app(monkeypatch, root, run="broken").run()
    for page in PAGES:
        if page != "views/overview.py":
            at.switch_page(page).run()
        _ok(at)  # no uncaught exception: Streamlit's redacted error page never shows
        errors = [_plain(e.value) for e in at.error]
        if page == "views/load.py":  # the listing works, and says which run is damaged
            assert not errors and any("1 stored run(s) are damaged" in _plain(w.value) for w in at.warning)
            continue
        assert any(DAMAGE[kind][1] in e and str(broken) in e for e in errors), (page, errors)


def test_other_runs_and_the_listing_keep_working_beside_every_damaged_run(healthy, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    for number, kind in enumerate(DAMAGE):
        shutil.copytree(healthy, root / f"broken-{number}")
        DAMAGE[kind][0](root / f"broken-{number}")
    shutil.copytree(healthy, root / "good")
    shutil.copytree(healthy, root / "good-too")
    at = _app(monkeypatch, root, run="good").run()
    _ok(at)
    assert at.title[0].value == "Overview" and not at.error
    assert "(damaged)" in at.sidebar.selectbox[0].format_func("broken-0")
    assert at.sidebar.selectbox[0].format_func("good") == "good"
    at.switch_page("views/compare.py").run()
    _ok(at)
    assert not at.error
    assert at.selectbox(key="compare-other").options == ["good-too"]  # damaged runs are not offered
    at.switch_page("views/load.py").run()
    _ok(at)
    listing = at.dataframe(key="runs-table").value
    status = dict(zip(listing["run"], listing["status"]))
    assert status["good"] == status["good-too"] == "ok"
    problems = dict(zip(listing["run"], listing["problem"]))
    for number, kind in enumerate(DAMAGE):
        assert status[f"broken-{number}"] == "damaged"
        assert DAMAGE[kind][1] in problems[f"broken-{number}"], (kind, problems[f"broken-{number}"])
    at.text_input(key="runs-search").input(str(open_run(healthy).samples["id"].iloc[0])).run()
    _ok(at)
    for page in PAGES:  # every page of a healthy run, with all the damaged runs beside it
        at.switch_page(page).run()
        _ok(at)
        assert not at.error, (page, [e.value for e in at.error])
