"""Dataset loading and the checks against a model; every refusal with its message."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torch import nn

from analyzers import AnalyzerError, check_dataset, load_dataset, load_dataset_bytes, load_model, wrap_module
from tests.conftest import TinyCNN


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits_model():
    return load_model("sample:digits")


def test_sample_dataset_is_the_test_split_with_metadata():
    data = load_dataset("sample:digits")
    assert data.x.shape == (450, 1, 8, 8) and data.x.dtype == np.float32
    assert data.modality == "image" and len(data.ids) == 450 and "ink" in data.metadata
    assert data.class_names == tuple(str(d) for d in range(10))


def test_npz_keeps_ids_class_names_metadata_and_extras():
    rng = np.random.default_rng(0)
    data = load_dataset_bytes(_npz(x=rng.random((6, 4)), y=np.array([0, 1, 2, 0, 1, 2]), ids=np.arange(10, 16),
                                   class_names=np.array(["a", "b", "c"]), group=np.array(list("xxyyzz")),
                                   mask=np.ones((6, 2))), name="d.npz")
    assert data.x.dtype == np.float32 and data.modality == "tabular"
    assert list(data.ids) == list(range(10, 16)) and data.class_names == ("a", "b", "c")
    assert list(data.metadata["group"]) == list("xxyyzz") and data.extras["mask"].shape == (6, 2)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((3, 2))), "has no array y"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(4, int)), "y must be one label per sample"),
    (dict(x=np.zeros((3, 2)), y=np.array([0.5, 1, 0])), "not integers"),
    (dict(x=np.zeros((0, 2)), y=np.zeros(0, int)), "has no samples"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(3, int), ids=np.array([1, 1, 2])), r"not unique \(1 repeat\)"),
    (dict(x=np.array([["a", "b"]] * 3), y=np.zeros(3, int)), "not numbers"),
])
def test_bad_npz_is_refused(arrays, message):
    with pytest.raises(AnalyzerError, match=message):
        load_dataset_bytes(_npz(**arrays), name="d.npz")


def test_csv_takes_numeric_features_label_ids_and_keeps_the_rest_as_metadata():
    table = pd.DataFrame({"sample": ["s1", "s2", "s3"], "f1": [0.1, 0.2, 0.3], "f2": [1, 2, 3],
                          "site": ["a", "b", "a"], "label": [0, 1, 0]})
    data = load_dataset_bytes(table.to_csv(index=False).encode(), name="t.csv", id_column="sample")
    assert data.feature_names == ("f1", "f2") and list(data.ids) == ["s1", "s2", "s3"]
    np.testing.assert_allclose(data.x, [[0.1, 1], [0.2, 2], [0.3, 3]], rtol=1e-6)
    assert list(data.metadata.columns) == ["site"]
    parquet = io.BytesIO()
    table.to_parquet(parquet)
    again = load_dataset_bytes(parquet.getvalue(), name="t.parquet", id_column="sample")
    np.testing.assert_array_equal(again.x, data.x)


def test_text_labels_map_through_the_model_class_names():
    model = wrap_module(_Linear(3, 2), (3,), class_names=("cat", "dog"))
    table = pd.DataFrame({"a": [0.0, 1.0], "b": [1.0, 2.0], "label": ["dog", "cat"]})
    with pytest.raises(AnalyzerError, match="2 numeric feature columns but the model takes 3"):
        load_dataset_bytes(table.to_csv(index=False).encode(), name="t.csv", model=model)
    table["c"] = [5.0, 6.0]
    data = load_dataset_bytes(table.to_csv(index=False).encode(), name="t.csv", model=model)
    assert list(data.y) == [1, 0]
    table.loc[0, "label"] = "bird"
    with pytest.raises(AnalyzerError, match="labels bird in 't.csv' are not among the model's classes"):
        load_dataset_bytes(table.to_csv(index=False).encode(), name="t.csv", model=model)


class _Linear(nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("csv, kwargs, message", [
    ("a,b\n1,2\n", {}, "no label column 'label'"),
    ("a,label\n1,0\n", {"id_column": "sid"}, "no id column 'sid'"),
    ("a,label\n1,0\n", {"features": ["z"]}, "feature columns z are not in"),
    ("name,label\nx,0\n", {}, "no numeric feature columns"),
    ("a,label\n", {}, "has no rows"),
    ("a,label,id\n1,0,7\n2,1,7\n", {"id_column": "id"}, "not unique"),
])
def test_bad_tables_are_refused(csv, kwargs, message):
    with pytest.raises(AnalyzerError, match=message):
        load_dataset_bytes(csv.encode(), name="t.csv", **kwargs)


def test_image_zip_is_converted_resized_and_normalised(digits_model):
    rng = np.random.default_rng(0)
    members = {f"imgs/{label}/{i}.png": _png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
               for label in ("3", "5") for i in range(2)}
    data = load_dataset_bytes(_zip(members), name="imgs.zip", model=digits_model, mean=[0.5], std=[0.25])
    assert data.x.shape == (4, 1, 8, 8)
    assert list(data.y) == [3, 3, 5, 5]  # folder names found among the model's class names
    assert data.preprocessing["mean"] == [0.5] and data.preprocessing["std"] == [0.25]
    assert data.x.min() >= (0 - 0.5) / 0.25 - 1e-6 and data.x.max() <= (1 - 0.5) / 0.25 + 1e-6


@pytest.mark.parametrize("members, message", [
    ({"../evil/0.png": b"x"}, "unsafe path '../evil/0.png'"),
    ({"/abs/0.png": b"x"}, "unsafe path '/abs/0.png'"),
    ({"3/0.png": b"not an image"}, "image '3/0.png' in 'z.zip' could not be decoded"),
    ({"a/0.png": b"x"}, "class folders a in 'z.zip' do not name the model's classes"),
    ({"readme.txt": b"hi"}, "holds no PNG or JPEG images"),
    ({"0.png": b"x"}, "is not inside a class folder"),
])
def test_bad_zips_are_refused(members, message, digits_model):
    with pytest.raises(AnalyzerError, match=message):
        load_dataset_bytes(_zip(members), name="z.zip", model=digits_model)


def test_zip_bomb_is_refused_by_declared_size(digits_model):
    with pytest.raises(AnalyzerError, match="zip bomb"):
        load_dataset_bytes(_zip({"a/0.png": b"\0" * (20 << 20)}), name="bomb.zip", model=digits_model)


def test_zip_bomb_is_refused_by_actual_size(monkeypatch, digits_model):
    # A forged header can under-declare sizes; the reader stops once the real bytes exceed the budget.
    import analyzers.loading.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_UNCOMPRESSED_BYTES", 1000)
    monkeypatch.setattr(datasets, "MAX_COMPRESSION_RATIO", 10 ** 9)
    archive = _zip({"a/0.png": _png(np.zeros((8, 8), np.uint8)), "a/1.png": b"\0" * 5000})
    forged = bytearray(archive)
    with pytest.raises(AnalyzerError, match="zip bomb"):
        load_dataset_bytes(bytes(forged), name="bomb.zip", model=digits_model)


def test_unsupported_and_empty_files(tmp_path):
    with pytest.raises(AnalyzerError, match="not a supported dataset file"):
        load_dataset_bytes(b"abc", name="d.xlsx")
    with pytest.raises(AnalyzerError, match="is empty"):
        load_dataset_bytes(b"", name="d.npz")
    with pytest.raises(AnalyzerError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x[:, :, :, :4], y), r"samples have shape \(1, 8, 4\) but the model takes \(1, 8, 8\)"),
    (lambda x, y: (x, y + 3), r"labels range over 3\.\.5 but the model has 3 classes"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y), "1 samples hold NaN or inf"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), y), "1 samples hold NaN or inf"),
])
def test_data_against_model_checks(change, message):
    model = wrap_module(TinyCNN(), (1, 8, 8))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1])
    x, y = change(x, y)
    data = load_dataset_bytes(_npz(x=x, y=y), name="d.npz")
    with pytest.raises(AnalyzerError, match=message):
        check_dataset(data, model)


def test_dataset_naming_more_classes_than_the_model_has_is_refused():
    model = wrap_module(TinyCNN(), (1, 8, 8))
    data = load_dataset_bytes(_npz(x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 1, 2]),
                                   class_names=np.array(list("abcde"))), name="d.npz")
    with pytest.raises(AnalyzerError, match="the dataset names 5 classes but the model has 3 outputs"):
        check_dataset(data, model)


def test_non_finite_rows_are_found_across_chunks_and_large_finite_values_pass():
    from analyzers.loading.datasets import _non_finite_rows

    x = np.zeros((10_000, 3), np.float32)
    x[5, 0], x[7_000, 1], x[9_999, 2] = np.nan, np.inf, -np.inf
    assert list(np.flatnonzero(_non_finite_rows(x, chunk=4096))) == [5, 7_000, 9_999]
    huge = np.full((4, 3), 3e38, np.float32)  # finite, though their sum overflows
    assert not _non_finite_rows(huge).any()
