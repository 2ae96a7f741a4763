"""Property-based and fuzz tests of the loaders: any input loads correctly or raises AnalyzerError, nothing else."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from analyzers import AnalyzerError, load_dataset_bytes, load_model, load_model_bytes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_DIGITS = load_model("sample:digits")


def _npz(**items) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **items)
    return buffer.getvalue()


def _valid_files() -> dict:
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(png, format="PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("set/1/a.png", png.getvalue())
        z.writestr("set/2/b.png", png.getvalue())
    table = pd.DataFrame({"a": rng.random(5), "b": rng.random(5), "label": [0, 1, 0, 1, 0]})
    return {"d.npz": _npz(x=rng.random((5, 3), dtype=np.float32), y=np.array([0, 1, 0, 1, 1])),
            "d.zip": archive.getvalue(), "d.csv": table.to_csv(index=False).encode()}


VALID = _valid_files()


def _mutate(data: bytes, edits: list) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        i = position % len(out)
        if kind == 0:
            out[i] = value
        elif kind == 1:
            del out[i:i + value % 16 + 1]
        else:
            out[i:i] = bytes([value]) * (value % 8 + 1)
    return bytes(out)


_EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), edits=_EDITS)
def test_mutated_dataset_files_load_or_raise_our_error(name, edits):
    data = _mutate(VALID[name], edits)
    try:
        dataset = load_dataset_bytes(data, name=name, model=_DIGITS if name.endswith(".zip") else None)
    except AnalyzerError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert len(dataset.x) == len(dataset.y) == len(dataset.ids) > 0
        assert dataset.x.dtype == np.float32 and dataset.y.dtype == np.int64


@FUZZ
@given(data=st.binary(max_size=512), name=st.sampled_from(["m.pt2", "m.pt", "m.safetensors", "d.npz", "d.csv"]))
def test_random_bytes_never_escape_as_another_error(data, name):
    try:
        if name.startswith("m."):
            load_model_bytes(data, name=name, arch="digits")
        else:
            load_dataset_bytes(data, name=name)
    except AnalyzerError:
        pass


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 6)),
                elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
       data=st.data())
def test_npz_round_trip_keeps_values_and_labels(x, data):
    y = data.draw(arrays(np.int64, (len(x),), elements=st.integers(0, 4)))
    dataset = load_dataset_bytes(_npz(x=x, y=y), name="d.npz")
    np.testing.assert_array_equal(dataset.x, x)
    np.testing.assert_array_equal(dataset.y, y)
    np.testing.assert_array_equal(dataset.ids, np.arange(len(x)))


@settings(max_examples=40, deadline=None)
@given(table=st.integers(1, 30).flatmap(lambda n: st.fixed_dictionaries({
    "f": st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n),
    "g": st.lists(st.integers(-5, 5), min_size=n, max_size=n),
    "label": st.lists(st.integers(0, 3), min_size=n, max_size=n),
    "site": st.lists(st.sampled_from(["a", "b"]), min_size=n, max_size=n)})))
def test_csv_round_trip_splits_features_labels_and_metadata(table):
    frame = pd.DataFrame(table)[["f", "g", "label", "site"]]
    dataset = load_dataset_bytes(frame.to_csv(index=False).encode(), name="t.csv")
    assert dataset.feature_names == ("f", "g")
    np.testing.assert_allclose(dataset.x[:, 0], frame["f"].to_numpy(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(dataset.y, frame["label"])
    assert list(dataset.metadata["site"]) == table["site"]
