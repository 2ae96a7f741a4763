"""analyzers.arrays.empty_array: np.empty's contract, mapped at once when large."""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from analyzers import arrays
from analyzers.arrays import POPULATE_BYTES, empty_array


def _mapped(array) -> bool:
    """Whether the memory under `array` is an mmap (through the views numpy stacks on it)."""
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(array.obj if isinstance(array, memoryview) else array, mmap.mmap)


@pytest.mark.parametrize("shape,dtype", [((3, 4), np.float32), ((POPULATE_BYTES // 4 + 7,), np.float32),
                                         ((POPULATE_BYTES // 8 // 16 + 1, 4, 4), np.float64), (5, np.int64)])
def test_it_is_a_writable_c_ordered_array_of_the_shape_asked(shape, dtype):
    out = empty_array(shape, dtype)
    expected = (shape,) if isinstance(shape, int) else shape
    assert out.shape == expected and out.dtype == dtype and out.flags.c_contiguous and out.flags.writeable
    values = np.arange(out.size, dtype=dtype).reshape(expected)
    out[...] = values
    np.testing.assert_array_equal(out, values)
    large = out.nbytes >= POPULATE_BYTES and hasattr(mmap, "MAP_POPULATE")
    assert _mapped(out) == large  # mapped only where it pays


def test_two_arrays_never_share_memory():
    a, b = empty_array(POPULATE_BYTES // 4, np.float32), empty_array(POPULATE_BYTES // 4, np.float32)
    a[:] = 1.0
    b[:] = 2.0
    assert not np.shares_memory(a, b) and (a == 1.0).all()


@pytest.mark.skipif(not hasattr(mmap, "MAP_POPULATE"), reason="MAP_POPULATE is Linux's")
def test_a_refused_mapping_falls_back_to_np_empty(monkeypatch):
    class Refusing:  # the mmap module, but its mappings refused (a memory limit)
        MAP_POPULATE, MAP_PRIVATE, MAP_ANONYMOUS = mmap.MAP_POPULATE, mmap.MAP_PRIVATE, mmap.MAP_ANONYMOUS

        @staticmethod
        def mmap(*args, **kwargs):
            raise OSError("no mapping")

    monkeypatch.setattr(arrays, "mmap", Refusing)
    out = empty_array(POPULATE_BYTES // 4 + 1, np.float32)
    assert not _mapped(out)
    out[:] = 3.0
    assert (out == 3.0).all()
