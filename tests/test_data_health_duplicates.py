"""Duplicates and leakage (analyzers.data_health.duplicates): planted exact and near copies, copies across splits and
with other labels, found by both searches; the calibrated threshold against a hand computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import gumbel_l

from analyzers.data_health import duplicates as dup
from analyzers.data_health.duplicates import (FULL_GROUP, KINDS, PAIR_COLUMNS, calibrated_threshold,
                                              find_duplicates, nearest_neighbours, row_hashes)
from analyzers.errors import AnalyzerError, InvalidOption

ORIGINALS, DIMS, NOISE = 2000, 32, 0.1


def _planted(seed: int = 0):
    """2000 Gaussian rows in train, plus copies of distinct originals: (x, ids, split, labels, truth) with truth
    kind -> set of frozenset({id, id}). Each group of 10-30 copies: exact or near (noise of NOISE std per value),
    in train or in test (a leak), with the same label or another one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ORIGINALS, DIMS))
    labels = rng.integers(0, 5, ORIGINALS)
    split = np.array(["train"] * ORIGINALS, dtype=object)
    plan = [("exact", "train", False, 30), ("near", "train", False, 30), ("exact", "test", False, 20),
            ("near", "test", False, 20), ("exact", "train", True, 10), ("near", "train", True, 10)]
    sources = rng.choice(ORIGINALS, sum(p[3] for p in plan), replace=False)
    rows, row_split, row_labels, truth = [], [], [], {k: set() for k in KINDS}
    used = 0
    for match, where, relabel, count in plan:
        for source in sources[used:used + count]:
            copy = x[source] + (rng.normal(scale=NOISE, size=DIMS) if match == "near" else 0.0)
            label = (labels[source] + 1 + rng.integers(0, 4)) % 5 if relabel else labels[source]
            new_id = ORIGINALS + len(rows)
            rows.append(copy)
            row_split.append(where)
            row_labels.append(label)
            pair = frozenset({int(source), new_id})
            truth[match].add(pair)
            if where != "train":
                truth["leak"].add(pair)
            if relabel:
                truth["conflicting-label"].add(pair)
        used += count
    x = np.concatenate([x, np.array(rows)])
    split = np.concatenate([split, np.array(row_split, dtype=object)])
    labels = np.concatenate([labels, np.array(row_labels)])
    order = rng.permutation(len(x))  # copies anywhere among the rows; ids follow their rows
    return x[order], np.arange(len(x))[order], split[order], labels[order], truth


@pytest.fixture(scope="module")
def planted():
    x, ids, split, labels, truth = _planted()
    return x, ids, split, labels, truth, find_duplicates(x, ids=ids, split=split, labels=labels)


def _found(result, kind):
    table = result.of_kind(kind)
    return {frozenset({int(a), int(b)}) for a, b in zip(table["id_a"], table["id_b"])}


def test_planted_copies_are_found(planted):
    *_, truth, result = planted
    assert result.search == "exact" and result.threshold_source == "calibrated"
    exact = _found(result, "exact")
    assert exact == truth["exact"]  # recall 1.0, precision 1.0
    near = _found(result, "near")
    recall = len(near & truth["near"]) / len(truth["near"])
    precision = len(near & truth["near"]) / len(near)
    assert recall >= 0.9 and precision >= 0.9  # measured 1.0 and 1.0
    assert _found(result, "leak") == truth["leak"]
    assert _found(result, "conflicting-label") == truth["conflicting-label"]
    assert result.counts == {"exact": 60, "near": 60, "leak": 40, "conflicting-label": 20}
    assert result.leaking_rows == {"test": 40, "train": 40}
    assert result.groups == 60 and result.largest_group == 2


def test_every_pair_is_one_row_per_kind_with_how_it_matched(planted):
    x, ids, split, labels, truth, result = planted
    table = result.table()
    assert list(table.columns) == list(PAIR_COLUMNS)
    assert list(dict.fromkeys(table["kind"])) == list(KINDS)  # sorted by kind
    assert (table["row_a"] < table["row_b"]).all()
    assert (ids[table["row_a"]] == table["id_a"]).all() and (split[table["row_b"]] == table["split_b"]).all()
    leaks = result.of_kind("leak")
    assert set(leaks["match"]) == {"exact", "near"} and (leaks["split_a"] != leaks["split_b"]).all()
    conflicts = result.of_kind("conflicting-label")
    assert (conflicts["label_a"] != conflicts["label_b"]).all()
    assert (result.of_kind("exact")["distance"] == 0).all()
    near = result.of_kind("near")
    assert (near["distance"] > 0).all() and (near["distance"] <= result.near_threshold).all()
    expected = np.linalg.norm(x[near["row_a"]] - x[near["row_b"]], axis=1)
    assert near["distance"].to_numpy() == pytest.approx(expected, rel=1e-4)  # float32 search
    back = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert back["counts"] == result.counts and len(back["pairs"]) == len(table)


def test_the_calibrated_threshold_is_the_hand_computation_and_scale_free():
    # the min-Gumbel's constants are scipy's: its median, and the half-width around it that holds half its mass
    assert dup.GUMBEL_MEDIAN == pytest.approx(gumbel_l.median())
    m, a = gumbel_l.median(), dup.GUMBEL_MAD
    assert gumbel_l.cdf(m + a) - gumbel_l.cdf(m - a) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 10))
    x[200:210] = x[:10] + rng.normal(scale=0.01, size=(10, 10))
    x[300] = x[301]  # an exact copy: its distance 0 is left out
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    logs = np.log(np.where(d > 0, d, np.inf).min(axis=1))
    median = np.median(logs)
    beta = np.median(np.abs(logs - median)) / a
    expected = np.exp(median - beta * m + beta * gumbel_l.ppf(0.5 / len(logs)))
    _, distances, _ = nearest_neighbours(x.astype(np.float32), 5)
    assert calibrated_threshold(distances) == pytest.approx(expected, rel=1e-4)
    result = find_duplicates(x)
    assert result.near_threshold == pytest.approx(expected, rel=1e-4)
    scaled = find_duplicates(x * 10.0)
    assert scaled.near_threshold == pytest.approx(10 * result.near_threshold, rel=1e-4)
    assert scaled.table()[["id_a", "id_b", "kind"]].equals(result.table()[["id_a", "id_b", "kind"]])
    assert _found(result, "near") == {frozenset({i, 200 + i}) for i in range(10)}
    assert _found(result, "exact") == {frozenset({300, 301})}


def test_no_copies_no_pairs_and_a_given_threshold_is_used():
    x = np.random.default_rng(2).normal(size=(2000, 32))
    result = find_duplicates(x)
    assert result.counts["near"] == 0 and result.counts["exact"] == 0  # a normal fitted to log d flagged 4 pairs here
    wide = find_duplicates(x, near_threshold=1e9, k=2)
    assert wide.threshold_source == "given" and wide.near_threshold == 1e9
    assert 2000 <= wide.counts["near"] <= 4000  # every row with its 2 nearest, each pair once


def test_the_hnsw_search_finds_the_same_planted_pairs_as_exact_search(planted):
    x, ids, split, labels, truth, exact = planted
    approximate = find_duplicates(x, ids=ids, split=split, labels=labels, exact_search_limit=100)
    assert approximate.search == "hnsw" and exact.search == "exact"
    for kind in KINDS:
        assert _found(approximate, kind) & truth[kind] == _found(exact, kind) & truth[kind], kind
    assert _found(approximate, "exact") == truth["exact"]
    # measured: the whole table, nothing but the planted pairs, as by exact search
    assert approximate.table()[["id_a", "id_b", "kind"]].equals(exact.table()[["id_a", "id_b", "kind"]])


def _distance_recall(rows, points, k: int) -> float:
    """Share of the neighbours found that lie no farther than the true k-th nearest (ties count as found)."""
    from scipy.spatial.distance import cdist

    full = cdist(points, points)
    np.fill_diagonal(full, np.inf)
    kth = np.sort(full, axis=1)[:, k - 1]
    return float(np.mean(np.take_along_axis(full, np.maximum(rows, 0), 1) <= kth[:, None] * (1 + 1e-9)))


@pytest.mark.parametrize("case", ["clusters", "copies"])
def test_nearest_neighbours_against_a_brute_force_distance_matrix(case):
    """Both searches against scipy's full distance matrix: the exact one row for row, the HNSW graph with a recall
    of at least 0.98 of the 5 nearest; the distances are the float64 ones of the points found. "copies" holds 500
    identical rows, on which a plain HNSW graph found 6% of the other rows' neighbours."""
    from analyzers.data_health.duplicates import nearest_neighbours

    rng = np.random.default_rng(5)
    if case == "clusters":
        points = rng.normal(size=(2000, 16)) + 6 * rng.integers(0, 4, size=(2000, 1))
    else:
        points = np.concatenate([rng.normal(size=(1500, 16)), np.zeros((500, 16))])
    full = cdist(points, points)
    np.fill_diagonal(full, np.inf)
    rows, distances, search = nearest_neighbours(points, 5)
    assert search == "exact" and rows.shape == (2000, 5)
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :5], rtol=1e-12, atol=1e-12)
    assert _distance_recall(rows, points, 5) == 1.0
    rows, distances, search = nearest_neighbours(points, 5, exact_search_limit=100)
    assert search == "hnsw" and rows.shape == (2000, 5)
    recall = _distance_recall(rows, points, 5)
    assert recall >= 0.98, recall
    np.testing.assert_allclose(distances, np.take_along_axis(full, rows, 1), rtol=1e-12)
    assert (np.diff(distances, axis=1) >= 0).all()  # nearest first
    assert not (rows == np.arange(2000)[:, None]).any()  # never the row itself
    if case == "copies":  # each zero row's neighbours are other zero rows at distance 0
        assert (rows[1500:] >= 1500).all() and (distances[1500:] == 0).all()
    again, _, _ = nearest_neighbours(points, 5, exact_search_limit=100)
    assert (again == rows).all()  # the same graph on every call


def test_given_neighbours_are_reused_and_checked(planted):
    from analyzers.data_health.duplicates import nearest_neighbours

    x, ids, split, labels, truth, exact = planted
    table = nearest_neighbours(np.asarray(x, dtype=np.float64).reshape(len(x), -1), 10)
    reused = find_duplicates(x, ids=ids, split=split, labels=labels, neighbours=table)
    assert reused.table()[["id_a", "id_b", "kind"]].equals(exact.table()[["id_a", "id_b", "kind"]])
    with pytest.raises(AnalyzerError, match="do not fit"):
        find_duplicates(x, ids=ids, neighbours=(table[0][:10], table[1][:10], "exact"))


def test_large_groups_are_stars_and_hashes_are_canonical():
    row = np.arange(6, dtype=np.float64)
    x = np.concatenate([np.tile(row, (FULL_GROUP + 5, 1)), np.tile(row + 100, (4, 1)),
                        np.random.default_rng(3).normal(size=(30, 6)) * 50])
    result = find_duplicates(x)
    assert result.counts["exact"] == (FULL_GROUP + 4) + 6  # a star of 25 rows, all 6 pairs of 4
    assert result.groups == 2 and result.largest_group == FULL_GROUP + 5
    assert set(result.of_kind("exact").query("row_b < @FULL_GROUP + 5")["row_a"]) == {0}
    signed = np.array([[0.0, np.nan, 1.0], [-0.0, np.nan, 1.0], [0.0, 0.0, 1.0]])
    digests = row_hashes(signed, batch_size=1)
    assert digests[0] == digests[1] != digests[2]
    texts = np.array(["a cat", "a dog", "a cat", "A cat"], dtype=object)
    found = find_duplicates(texts, labels=[0, 0, 1, 0])
    assert found.search == "none" and found.near_threshold is None
    assert _found(found, "exact") == _found(found, "conflicting-label") == {frozenset({0, 2})}


def test_the_tabular_sample_has_no_leak_and_planted_ones_are_found():
    import sample_models

    sample = sample_models.get_sample("tabular")
    train, test = sample.load_data("train"), sample.load_data("test")
    x = np.concatenate([train.x, test.x])
    ids = np.concatenate([train.ids, test.ids])
    split = np.array(["train"] * len(train.x) + ["test"] * len(test.x))
    labels = np.concatenate([train.y, test.y])
    clean = find_duplicates(x, ids=ids, split=split, labels=labels)
    assert clean.counts == dict.fromkeys(KINDS, 0)
    picked = np.arange(5) * 7
    copies = np.concatenate([test.x[picked] * 1.0001, test.x[picked[:2]]])  # 0.01% larger, two exact copies
    planted = find_duplicates(np.concatenate([x, copies]), ids=np.concatenate([ids, 1000 + np.arange(7)]),
                              split=np.concatenate([split, ["train"] * 7]),
                              labels=np.concatenate([labels, test.y[picked], 1 - test.y[picked[:2]]]))
    expected = {frozenset({int(i), 1000 + n}) for n, i in enumerate(test.ids[picked])}
    expected |= {frozenset({int(i), 1005 + n}) for n, i in enumerate(test.ids[picked[:2]])}
    assert _found(planted, "leak") == expected
    # the relabelled exact copies conflict with their test row and with its scaled copy (near, both in train)
    assert _found(planted, "conflicting-label") == {frozenset({a, 1005 + n}) for n, i in
                                                    enumerate(test.ids[picked[:2]]) for a in (int(i), 1000 + n)}
    assert planted.counts["exact"] == 2 and planted.counts["near"] == 7 and planted.counts["leak"] == 7


def test_bad_input_and_options_are_refused_with_their_fix():
    x = np.random.default_rng(4).normal(size=(20, 3))
    with pytest.raises(AnalyzerError, match="no rows"):
        find_duplicates(x[:0])
    with pytest.raises(AnalyzerError, match="one entry per row"):
        find_duplicates(x, split=["train"] * 19)
    with pytest.raises(AnalyzerError, match="ids repeat"):
        find_duplicates(x, ids=[1] * 20)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(AnalyzerError, match="NaN"):
        find_duplicates(x, embeddings=bad)
    with pytest.raises(AnalyzerError, match="one row per sample"):
        find_duplicates(x, embeddings=x[:5])
    with pytest.raises(InvalidOption, match="k must"):
        find_duplicates(x, k=0)
    with pytest.raises(InvalidOption, match="near_threshold"):
        find_duplicates(x, near_threshold=-1.0)
    assert dup.find_duplicates(x[:1]).counts == dict.fromkeys(KINDS, 0)  # one row: nothing to pair


def test_row_digests_are_sha256_of_each_rows_bytes_on_one_thread_or_two():
    """Rows of more than 2047 bytes are hashed on two threads, half a batch each, read in place; shorter ones,
    scalars and empty rows on one: every digest is hashlib's SHA-256 of the row's `tobytes()` (floats with -0.0 as
    0.0), in row order, at any batch size."""
    import hashlib

    from analyzers.data_health.duplicates import row_hashes

    rng = np.random.default_rng(0)
    negative_zero = rng.random((6, 700))
    negative_zero[2, 5] = -0.0
    arrays = [rng.random((37, 3, 32, 32), dtype=np.float32), rng.random((50, 4)), np.array(["ab", "cd", "ab"]),
              rng.integers(0, 5, (9, 3000)).astype(np.int8), np.zeros((4, 0)), rng.random((1, 3000)),
              rng.random((7, 1000)) > 0.5, np.array([["ab", "c"], ["x", "yy"]]), rng.random(5), negative_zero]
    for x in arrays:
        expected = [hashlib.sha256((row + row.dtype.type(0) if row.dtype.kind == "f" else row).tobytes()).digest()
                    for row in x]
        for batch_size in (1, 5, 1024):
            assert row_hashes(x, batch_size=batch_size) == expected, (x.dtype, x.shape, batch_size)
