"""What crosses between the dashboard and a sandboxed worker: JSON and `.npy` bytes, never a pickle.

A frame is an 8-byte big-endian length, a JSON header, then the binary blobs the header lists. Values are JSON
numbers, strings, booleans and null, or tagged objects:
- `{"l": [...]}` a list or tuple, `{"d": {...}}` a dict with string keys;
- `{"a": i}` a numeric or boolean array, blob `i` in `.npy` format, read with `allow_pickle=False`;
- `{"f": {"columns": [...], "data": [...]}}` a table whose columns are arrays or lists of strings;
- `{"c": "module:Class", "v": {...}}` a frozen result dataclass, rebuilt only if it is in `RESULT_CLASSES`.

The parent reads what a possibly compromised worker sends, so every size is capped before anything is allocated,
object arrays are refused, and nothing names code to run except the fixed allow-list of result classes.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import AnalyzerError

HEADER = struct.Struct(">Q")
MAX_HEADER_BYTES = 64 << 20
DEFAULT_MAX_FRAME_BYTES = 16 << 30
MAX_DEPTH = 64
# Result dataclasses a worker may send back: rebuilt by calling the class with the decoded fields.
RESULT_CLASSES = frozenset({
    "analyzers.engines.inference:Predictions",
    "analyzers.training.gradients:OverfitResult",
    "analyzers.training.gradients:GradientTraces",
    "analyzers.explanations.attributions:ExplainResult",
    "analyzers.explanations.completeness:Completeness",
    "analyzers.explanations.perturbation:DeletionInsertion",
    "analyzers.explanations.faithfulness:SanityCheck",
    "analyzers.explanations.feature_maps:LayerActivations",
    "analyzers.explanations.feature_maps:TopActivating",
    "analyzers.explanations.concepts:TcavScores",
    "analyzers.data_health.robustness:RobustnessCurve",
    "analyzers.data_health.profile:InferenceProfile",
})


class WireError(AnalyzerError):
    """A frame that breaks the format: from a worker, this means it misbehaved and is stopped."""


def encode(value) -> tuple[bytes, list]:
    """The JSON header and the blobs of `value`."""
    blobs: list = []
    tree = _encode(value, blobs, 0)
    return json.dumps(tree, allow_nan=True, separators=(",", ":")).encode(), blobs


def _encode(value, blobs: list, depth: int):
    if depth > MAX_DEPTH:
        raise WireError("a value nested too deeply to send to the worker")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise WireError("an array of Python objects cannot be sent: only numeric and boolean arrays cross")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
        blobs.append(buffer.getvalue())
        return {"a": len(blobs) - 1}
    if isinstance(value, (list, tuple)):
        return {"l": [_encode(v, blobs, depth + 1) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise WireError("a dict with keys other than strings cannot be sent to the worker")
        return {"d": {k: _encode(v, blobs, depth + 1) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = f"{type(value).__module__}:{type(value).__qualname__}"
        if name not in RESULT_CLASSES:
            raise WireError(f"{name} is not a result type that may cross the worker boundary")
        return {"c": name, "v": {f.name: _encode(getattr(value, f.name), blobs, depth + 1)
                                 for f in dataclasses.fields(value)}}
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        columns, data = [], []
        for column in value.columns:
            series = value[column]
            columns.append(str(column))
            if not (pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype)):
                data.append({"s": [None if _missing(v) else str(v) for v in series.tolist()]})
            else:
                data.append(_encode(series.to_numpy(), blobs, depth + 1))
        return {"f": {"columns": columns, "data": data}}
    if callable(value):
        raise WireError("a function cannot be sent to the worker (progress callbacks stay in the dashboard)")
    raise WireError(f"a {type(value).__name__} cannot be sent to the worker: send arrays, tables, numbers or text")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decode(header: bytes, blobs: list):
    try:
        tree = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(f"the worker sent a header that is not JSON ({type(exc).__name__})") from exc
    return _decode(tree, blobs, 0)


def _decode(tree, blobs: list, depth: int):
    if depth > MAX_DEPTH:
        raise WireError("the worker sent a value nested too deeply")
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if not isinstance(tree, dict) or len(tree) not in (1, 2):
        raise WireError("the worker sent a value of unknown shape")
    if "l" in tree and len(tree) == 1:
        return [_decode(v, blobs, depth + 1) for v in _typed(tree["l"], list)]
    if "d" in tree and len(tree) == 1:
        return {str(k): _decode(v, blobs, depth + 1) for k, v in _typed(tree["d"], dict).items()}
    if "a" in tree and len(tree) == 1:
        index = tree["a"]
        if not isinstance(index, int) or not 0 <= index < len(blobs):
            raise WireError("the worker referred to an array it did not send")
        try:
            array = np.load(io.BytesIO(blobs[index]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise WireError(f"the worker sent an array that is not plain .npy data ({str(exc)[:80]})") from exc
        if array.dtype.hasobject or array.dtype.kind not in "biufc":
            raise WireError(f"the worker sent an array of dtype {array.dtype}, not numbers")
        return array
    if "f" in tree and len(tree) == 1:
        import pandas as pd

        frame = _typed(tree["f"], dict)
        columns = [str(c) for c in _typed(frame.get("columns"), list)]
        data = _typed(frame.get("data"), list)
        if len(columns) != len(data):
            raise WireError("the worker sent a table whose columns and data differ in number")
        values = {}
        for column, item in zip(columns, data):
            if isinstance(item, dict) and set(item) == {"s"}:
                texts = _typed(item["s"], list)
                if not all(v is None or isinstance(v, str) for v in texts):
                    raise WireError("the worker sent a text column holding other values")
                values[column] = texts
            else:
                values[column] = _decode(item, blobs, depth + 1)
                if not isinstance(values[column], np.ndarray) or values[column].ndim != 1:
                    raise WireError("the worker sent a table column that is not one-dimensional")
        lengths = {len(v) for v in values.values()}
        if len(lengths) > 1:
            raise WireError("the worker sent a table whose columns differ in length")
        return pd.DataFrame(values, columns=columns)
    if "c" in tree and "v" in tree:
        name = tree["c"]
        if name not in RESULT_CLASSES:
            raise WireError(f"the worker sent a {str(name)[:60]!r}, which is not an allowed result type")
        module_name, _, class_name = name.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {str(k): _decode(v, blobs, depth + 1) for k, v in _typed(tree["v"], dict).items()}
        if set(values) != fields:
            raise WireError(f"the worker sent a {class_name} with fields {sorted(values)[:6]}")
        return cls(**values)
    raise WireError("the worker sent a value of unknown kind")


def _typed(value, kind):
    if not isinstance(value, kind):
        raise WireError(f"the worker sent a malformed value (expected {kind.__name__})")
    return value


# --- frames on a file descriptor -------------------------------------------------------------------------------------

def write_frame(fd: int, message: dict) -> None:
    """Send `message` (a dict of encodable values) as one frame."""
    header, blobs = encode(message)
    sizes = [len(b) for b in blobs]
    head = json.dumps({"v": json.loads(header), "blobs": sizes}, separators=(",", ":")).encode()
    _write_all(fd, HEADER.pack(len(head)) + head)
    for blob in blobs:
        _write_all(fd, blob)


def read_frame(fd: int, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES, deadline=None):
    """Read one frame; `deadline(seconds_left)` is called before each blocking read (raising to stop)."""
    (length,) = HEADER.unpack(_read_exact(fd, HEADER.size, deadline))
    if length > MAX_HEADER_BYTES:
        raise WireError(f"the worker sent a {length}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
    try:
        head = json.loads(_read_exact(fd, length, deadline))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError("the worker sent a frame header that is not JSON") from exc
    if not isinstance(head, dict) or not isinstance(head.get("blobs"), list):
        raise WireError("the worker sent a frame without a blob list")
    sizes = head["blobs"]
    if not all(isinstance(s, int) and s >= 0 for s in sizes) or sum(sizes) > max_bytes:
        raise WireError(f"the worker announced {sum(s for s in sizes if isinstance(s, int))} bytes, over the "
                        f"{max_bytes}-byte limit")
    blobs = [_read_exact(fd, size, deadline) for size in sizes]
    return _decode(head.get("v"), blobs, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:1 << 24])
        view = view[written:]


def _read_exact(fd: int, size: int, deadline=None) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if deadline is not None:
            deadline()
        chunk = os.readv(fd, [view[got:got + (1 << 24)]])
        if chunk == 0:
            raise EOFError("the worker closed its pipe")
        got += chunk
    return bytes(buffer)
