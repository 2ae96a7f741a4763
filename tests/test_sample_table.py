"""issue 15: a run's samples table read column by column (analyzers.loading.sample_table), and what reads it so.

The reference is pandas on the whole table: the columns, rows and id lookups of a `SampleTable` must equal
`pd.read_parquet` of every part joined, and a ranking read from the candidate rows must equal sorting every row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analyzers.evaluation.metrics import RANKINGS, confusion, rank_errors
from analyzers.loading.run_checks import RunDamaged
from analyzers.evaluation.slices import slice_mask
from analyzers.loading.sample_table import SampleTable, positions_of
from dashboard.selection import id_positions


def _samples(n: int, seed: int = 0, ids=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, 3, n))
    # ties on purpose: a ranking must break them by id, and missing values go last
    confidence = np.round(rng.random(n), 1)
    loss = np.round(rng.random(n) * 3, 1)
    loss[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({"id": np.arange(n) if ids is None else ids, "label": label, "pred": pred,
                         "confidence": confidence, "loss": loss, "correct": label == pred,
                         "colour": rng.choice(["red", "green", None], n)})


def _write_parts(table: pd.DataFrame, folder, sizes, row_group_size=7):
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, size in enumerate(sizes):
        part = pa.Table.from_pandas(table.iloc[start:start + size], preserve_index=False)
        if k == 0:  # a part whose text column is all missing is typed null there, as a streamed part is
            part = part.set_column(part.schema.get_field_index("colour"), "colour", pa.nulls(size))
        path = folder / f"part-{k:06d}.parquet"
        pq.write_table(part, path, row_group_size=row_group_size)
        paths.append(path)
        start += size
    return paths


@pytest.fixture
def parted(tmp_path):
    table = _samples(100)
    table.loc[:22, "colour"] = None  # the first part's text is all missing
    return table, SampleTable(_write_parts(table, tmp_path / "samples", [23, 40, 37]))


def test_columns_and_rows_equal_the_whole_table_read_by_pandas(parted):
    table, parts = parted
    rows = np.array([99, 0, 23, 22, 57, 57, 63, 1])  # across parts and row groups, out of order, one twice
    fresh = SampleTable(parts.files)
    pd.testing.assert_frame_equal(fresh.rows(rows), table.iloc[rows].set_axis(rows))  # every column from the files
    fresh["loss"], fresh["colour"]
    pd.testing.assert_frame_equal(fresh.rows(rows), table.iloc[rows].set_axis(rows))  # some from memory
    assert len(parts) == len(table) and parts.columns == list(table.columns)
    for name in table.columns:
        pd.testing.assert_series_equal(parts[name], table[name], check_names=True)
    pd.testing.assert_frame_equal(parts.rows(rows), table.iloc[rows].set_axis(rows))  # all from memory
    assert len(parts.rows([])) == 0 and list(parts.rows([]).columns) == list(table.columns)
    with pytest.raises(IndexError):
        parts.rows([100])
    pd.testing.assert_frame_equal(parts.to_frame(), table)


@pytest.mark.parametrize("kind", ["positions", "text"])
def test_ids_are_found_as_selection_finds_them_in_the_whole_column(tmp_path, kind):
    ids = np.arange(60) * 3 if kind == "positions" else np.array([f"s-{i}" for i in range(60)][::-1], dtype=object)
    table = _samples(60, ids=ids)
    parts = SampleTable(_write_parts(table, tmp_path / "samples", [30, 30]))
    wanted = [str(ids[5]), ids[41], "nobody", str(ids[5]), str(ids[0])]
    assert parts.positions(wanted).tolist() == id_positions(ids, wanted).tolist() == [5, 41, 5, 0]
    assert id_positions(parts, wanted).tolist() == [5, 41, 5, 0]
    assert parts.has_id(ids[59]) and not parts.has_id("nobody")
    assert parts.positions([]).tolist() == []


@pytest.mark.parametrize("ids", [np.arange(50), np.arange(50) * 3, np.arange(50)[::-1].copy(),
                                 np.arange(50, dtype=np.uint64), np.arange(50, dtype=np.int32)])
def test_an_array_of_integer_ids_finds_what_their_texts_find(ids):
    """The fast path for an array of integer ids (a slice's members at 10M rows) against the ids written as text:
    the same rows in the same order, with repeats, and nothing for ids that name no row (negative, too large for
    the ids' type, absent)."""
    wanted = np.array([7, 3, 3, -1, 0, 49, 51, 60, 147, 2**40], dtype=np.int64)
    as_text = positions_of(ids, [str(w) for w in wanted])
    assert positions_of(ids, wanted).tolist() == as_text.tolist()
    assert positions_of(ids, wanted[wanted >= 0].astype(np.uint64)).tolist() == as_text.tolist()
    expected = [int(np.flatnonzero(ids == w)[0]) for w in wanted if (ids == w).any()]
    assert as_text.tolist() == expected and len(expected) >= 4


@pytest.mark.parametrize("by", [b for b in RANKINGS if RANKINGS[b][1] in ("confidence", "loss", "margin")])
@pytest.mark.parametrize("limit", [1, 5, 40, 400])
def test_a_ranking_read_from_its_candidates_equals_sorting_every_row(parted, by, limit):
    table, parts = parted
    probs = np.random.default_rng(1).dirichlet(np.ones(3), len(table))
    _, column, ascending, which = RANKINGS[by]
    whole = table.assign(margin=np.sort(probs, 1)[:, -1] - np.sort(probs, 1)[:, -2])
    if which != "all":
        whole = whole[whole["correct"] == (which == "right")]
    expected = whole.sort_values([column, "id"], ascending=[ascending, True], kind="stable").head(limit)
    if by != "margin":
        expected = expected.drop(columns="margin")
    for source in (table, parts):
        got = rank_errors(source, probs, by=by, limit=limit)
        pd.testing.assert_frame_equal(got, expected, check_exact=False)


def test_confusion_cells_list_their_ids_in_order_whether_or_not_ids_increase():
    rng = np.random.default_rng(2)
    labels, pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    for ids in (np.arange(500) * 2, rng.permutation(500), np.array([f"x{i}" for i in rng.permutation(500)])):
        conf = confusion(labels, pred, num_classes=4, ids=ids)
        for a in range(4):
            for b in range(4):
                assert conf.ids(a, b).tolist() == sorted(ids[(labels == a) & (pred == b)].tolist())


def test_pandas_dtypes_float_ids_and_out_of_range_numbers_read_as_pandas_reads_them(tmp_path):
    """Review of issue 15's change: nullable columns keep their dtype, a float id is found by its text as pandas
    writes it, and a number no id type can hold names no sample rather than raising."""
    table = pd.DataFrame({"id": [0.5, 1.0, 2.0], "count": pd.array([1, None, 3], dtype="Int64"),
                          "flag": pd.array([True, None, False], dtype="boolean")})
    path = tmp_path / "samples.parquet"
    table.to_parquet(path, index=False)
    parts = SampleTable([path])
    pd.testing.assert_frame_equal(parts.to_frame(), pd.read_parquet(path))
    pd.testing.assert_frame_equal(parts.rows([2, 0]), pd.read_parquet(path).iloc[[2, 0]])
    assert parts.positions(["1.0", "0.5", "1"]).tolist() == [1, 0]
    ints = np.arange(5, dtype=np.int64)
    assert positions_of(ints, ["99999999999999999999", "-0", "3"]).tolist() == [3]
    huge = np.array([2**63 + 5, 2**63 + 9], dtype=np.uint64)
    assert positions_of(huge, [str(2**63 + 9), "-1"]).tolist() == [1]
    wide = pd.DataFrame({"id": np.array([-(2**62), 2**62], dtype=np.int64)})
    assert slice_mask(wide, [2**62]).tolist() == [False, True]


@pytest.mark.parametrize("ids", [np.arange(300), np.arange(300) + 1, np.arange(300)[::-1].copy(),
                                 np.arange(300, dtype=np.uint32), np.r_[np.arange(150), np.arange(151, 301)]])
def test_a_slices_members_mask_the_rows_that_isin_finds(ids):
    """slice_mask's lookups (rows themselves for ids 0..N-1, a table, isin) against numpy's isin, with members
    outside the ids, negative, repeated, as an array and as a list."""
    members = np.array([0, 5, 5, 299, 300, -1, 1000, 42], dtype=np.int64)
    expected = np.isin(ids.astype(np.int64), members)
    frame = pd.DataFrame({"id": ids})
    assert slice_mask(frame, members).tolist() == expected.tolist() == slice_mask(frame, list(members)).tolist()
    assert 3 <= expected.sum() <= 5


def test_a_part_damaged_after_the_run_opened_is_one_line(tmp_path):
    table = _samples(40)
    paths = _write_parts(table, tmp_path / "samples", [20, 20])
    parts = SampleTable(paths, where=tmp_path, relpath="samples")
    paths[1].write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    with pytest.raises(RunDamaged) as caught:
        parts["loss"]
    assert "samples" in str(caught.value) and "\n" not in str(caught.value)


def test_the_dashboard_pages_never_read_the_whole_samples_table(sample_run_dir, tmp_path, monkeypatch):
    """Every page of the digits run, with `Run.samples` (the whole table in pandas) made to fail: the pages read
    columns and pages of rows only."""
    import shutil

    from streamlit.testing.v1 import AppTest

    from analyzers.loading.runs import Run

    runs = tmp_path / "runs"
    shutil.copytree(sample_run_dir("digits"), runs / "sample-digits")

    def whole_table(self):
        raise AssertionError("a page read the whole samples table")

    monkeypatch.setattr(Run, "samples", property(whole_table))
    monkeypatch.setenv("DASHBOARD_RUNS_DIR", str(runs))
    monkeypatch.setenv("DASHBOARD_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("DASHBOARD_RUN", str(runs / "sample-digits"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=180).run()
    for page in ("overview", "confusion", "errors", "explain", "embeddings", "network", "health"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])


@pytest.mark.parametrize("name", ["digits", "tabular"])
def test_a_large_table_read_a_column_at_a_time_is_pandas_whole_read(name, sample_run_dir, monkeypatch):
    """Run.read_parquet reads a table over LEAN_READ_BYTES a column at a time; every table of a run (lists of ids,
    JSON text, categories, nullable columns) reads back as pandas reads the whole file."""
    from analyzers.loading import runs

    monkeypatch.setattr(runs, "LEAN_READ_BYTES", 0)
    path = Path(sample_run_dir(name))
    tables = sorted(p for p in path.rglob("*.parquet") if "samples" not in p.name)
    assert len(tables) >= 3
    for table in tables:
        pd.testing.assert_frame_equal(runs.read_parquet_lean(table), pd.read_parquet(table), obj=table.name)
