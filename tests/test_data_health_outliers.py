"""Outliers and low-density regions (analyzers.data_health.outliers): kNN scores against a brute-force distance
matrix, the isolation forest against scikit-learn's own, planted far points found, a planted sparse region where the
model fails named while a dense hard region and a sparse easy one are not."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.ensemble import IsolationForest

from analyzers.data_health.outliers import LOW_DENSITY, REGION_COLUMNS, find_outliers
from analyzers.errors import AnalyzerError, InvalidOption


def _brute_knn(z, k, reference=None):
    """Mean distance to the k nearest reference rows (self excluded), from the full distance matrix."""
    ref = np.arange(len(z)) if reference is None else np.flatnonzero(reference)
    d = cdist(z, z[ref])
    d[ref[None, :] == np.arange(len(z))[:, None]] = np.inf
    return np.sort(d, axis=1)[:, :k].mean(1)


def test_knn_scores_are_the_mean_distance_to_the_k_nearest_rows():
    z = np.random.default_rng(0).normal(size=(300, 6))
    found = find_outliers(z, k=7)
    np.testing.assert_allclose(found.scores, _brute_knn(z, 7), rtol=1e-9)
    assert found.k == 7 and found.search == "exact" and found.reference_rows == 300


def test_a_reference_scores_every_row_against_the_reference_rows_only():
    rng = np.random.default_rng(1)
    z = np.r_[rng.normal(size=(200, 4)), rng.normal(loc=6.0, size=(50, 4))]  # 50 rows far from the reference
    reference = np.r_[np.ones(200, bool), np.zeros(50, bool)]
    found = find_outliers(z, reference=reference, k=5)
    np.testing.assert_allclose(found.scores, _brute_knn(z, 5, reference), rtol=1e-9)
    # dense among themselves, yet far from anything in the reference: every one of them outscores every reference row
    assert found.scores[200:].min() > found.scores[:200].max()
    # without a reference, the same 50 rows are one another's neighbours and look ordinary
    assert np.median(find_outliers(z, k=5).scores[200:]) < 2 * np.median(found.scores[:200])


def test_planted_far_points_are_the_flagged_ones():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(990, 8))
    far = rng.normal(size=(10, 8))
    far *= 8.0 / np.linalg.norm(far, axis=1, keepdims=True)  # 10 points at radius 8, the bulk within about 5
    z = np.r_[z, far]
    found = find_outliers(z, contamination=0.01)
    assert found.flagged.sum() == 10
    assert set(np.flatnonzero(found.flagged)) == set(range(990, 1000)) == set(found.top(10))
    # the forest's axis-aligned cuts isolate a point far along a diagonal less readily: 9 of the 10 here
    forest = find_outliers(z, method="isolation_forest", contamination=0.01, seed=0)
    assert forest.flagged.sum() == 10 and len(set(np.flatnonzero(forest.flagged)) & set(range(990, 1000))) >= 9


def test_the_isolation_forest_score_is_scikit_learns():
    z = np.random.default_rng(3).normal(size=(400, 5))
    found = find_outliers(z, method="isolation_forest", seed=4)
    expected = -IsolationForest(random_state=4).fit(z).score_samples(z)
    np.testing.assert_allclose(found.scores, expected)
    assert found.k is None and found.search == "isolation_forest"


def test_the_sparse_region_where_the_model_fails_is_named_and_the_others_are_not():
    rng = np.random.default_rng(5)
    dense = rng.normal(scale=0.5, size=(800, 2))  # the bulk: 5% errors
    # as dense as the bulk (a quarter of its rows in a quarter of its area), 50% errors: a slice, not underrepresented
    hard = rng.normal(loc=(8, 0), scale=0.25, size=(200, 2))
    sparse_bad = rng.normal(loc=(0, 12), scale=2.5, size=(40, 2))  # sparse, 60% errors: the planted region
    sparse_easy = rng.normal(loc=(-12, 0), scale=2.5, size=(40, 2))  # sparse, 5% errors
    z = np.r_[dense, hard, sparse_bad, sparse_easy]
    errors = np.r_[rng.random(800) < 0.05, rng.random(200) < 0.5, rng.random(40) < 0.6, rng.random(40) < 0.05]
    found = find_outliers(z, errors=errors, n_regions=4, k=10, seed=0)
    regions = found.regions
    assert list(regions.columns) == list(REGION_COLUMNS)
    assert regions["size"].sum() == len(z)
    named = regions[regions["low_density_high_error"]]
    assert len(named) == 1
    rows = set(named.iloc[0]["rows"].tolist())
    assert len(rows & set(range(1000, 1040))) / 40 >= 0.9 and len(rows - set(range(1000, 1040))) <= 4
    assert named.iloc[0]["density_score"] >= LOW_DENSITY
    # the hand count of its error rate and the one-sided Fisher test
    from scipy.stats import fisher_exact

    inside = np.isin(np.arange(len(z)), list(rows))
    wrong = int(errors[inside].sum())
    assert named.iloc[0]["errors"] == wrong
    p = fisher_exact([[wrong, inside.sum() - wrong], [errors[~inside].sum(), (~inside).sum() - errors[~inside].sum()]],
                     alternative="greater")[1]
    assert named.iloc[0]["p_value"] == pytest.approx(p)
    hard_region = regions[regions["rows"].map(lambda r: len(set(r.tolist()) & set(range(800, 1000))) > 150)]
    assert len(hard_region) == 1 and not hard_region.iloc[0]["low_density_high_error"]
    assert hard_region.iloc[0]["p_adjusted"] < 0.05  # its errors are significant, its density is not low


def test_bad_options_and_points_get_one_line_errors():
    z = np.zeros((10, 2))
    with pytest.raises(InvalidOption, match="method"):
        find_outliers(z, method="lof")
    with pytest.raises(InvalidOption, match="contamination"):
        find_outliers(z, contamination=0.7)
    with pytest.raises(AnalyzerError, match="text"):
        find_outliers(np.array([["a"], ["b"], ["c"]], dtype=object))
    with pytest.raises(AnalyzerError, match="NaN"):
        find_outliers(np.r_[z, [[np.nan, 0]]])
    with pytest.raises(AnalyzerError, match="boolean"):
        find_outliers(np.random.default_rng(0).normal(size=(10, 2)), errors=np.zeros(10))


def test_to_json_is_plain_json_with_the_top_rows_and_their_ids():
    import json

    z = np.random.default_rng(6).normal(size=(50, 3))
    found = find_outliers(z, ids=np.arange(50) + 1000, k=3)
    record = json.loads(json.dumps(found.to_json()))
    assert record["n"] == 50 and record["n_flagged"] == 1
    assert record["top"][0]["id"] == int(np.argmax(found.scores)) + 1000
