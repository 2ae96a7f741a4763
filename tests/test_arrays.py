"""analyzers.arrays.empty_array: np.empty's contract, mapped at once when large."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from analyzers import arrays
from analyzers.arrays import POPULATE_BYTES, empty_array
from conftest import mapped_rss_kib


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


# ------------------------------------------------------------------------------------- passes over a file's map

@pytest.fixture
def mapped_rows(tmp_path):
    """A 32 MiB (N, 16) float32 array saved as .npy, and its read-only map."""
    values = np.random.default_rng(0).normal(size=(POPULATE_BYTES // 2 // 64, 16)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.save(path, values)
    return values, path, np.load(path, mmap_mode="r")


@pytest.mark.parametrize("rows", [1, 7, 1000, 10**9])
def test_row_blocks_cover_every_row_once_in_order(mapped_rows, rows):
    values, _, mapped = mapped_rows
    for source in (values[:5003], mapped[:5003]):
        seen = list(arrays.row_blocks(source, rows))
        assert [s for s, _, _ in seen] == list(range(0, 5003, rows))
        assert all(stop - start == len(block) <= rows for start, stop, block in seen)
        np.testing.assert_array_equal(np.concatenate([block for _, _, block in seen]), values[:5003])
    with pytest.raises(ValueError, match="at least 1"):
        next(arrays.row_blocks(values, 0))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_pass_over_a_file_map_holds_one_block_of_its_pages(mapped_rows):
    values, path, mapped = mapped_rows
    block_rows = 4096  # 256 KiB
    total, most = 0.0, 0
    for _, _, block in arrays.row_blocks(mapped, block_rows):
        total += float(block.sum(dtype=np.float64))
        most = max(most, mapped_rss_kib(path))  # while the pass goes on, not only at its end
    assert total == pytest.approx(float(values.sum(dtype=np.float64)), rel=1e-6)
    # during the pass, a block and the kernel's read-around (5 MiB seen here) of the 32 MiB; after it, a block or two
    assert most <= values.nbytes // 1024 // 4 and mapped_rss_kib(path) <= 4 * block_rows * 64 // 1024
    float(np.asarray(mapped).sum())  # the control: a plain read holds every page
    assert mapped_rss_kib(path) >= 0.9 * values.nbytes // 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_take_rows_equals_indexing_and_holds_one_block_of_a_map(mapped_rows):
    values, path, mapped = mapped_rows
    rng = np.random.default_rng(1)
    for rows in (np.sort(rng.choice(len(values), 5000, replace=False)), np.array([0, 4095, 4096, len(values) - 1]),
                 np.arange(0), np.arange(len(values))):
        for source in (values, mapped):
            np.testing.assert_array_equal(arrays.take_rows(source, rows, block_rows=4096), values[rows])
    arrays.take_rows(mapped, np.sort(rng.choice(len(values), 5000, replace=False)), block_rows=4096)
    assert mapped_rss_kib(path) <= 4 * 4096 * 64 // 1024  # plain indexing mapped nearly all of it
    for rows in (np.array([5, 3, 5]), np.array([-1, 0]), np.array([True, False] * (len(values) // 2))):
        np.testing.assert_array_equal(arrays.take_rows(mapped, rows, block_rows=4096), values[rows])  # numpy's
    with pytest.raises(IndexError):
        arrays.take_rows(mapped, np.array([1, len(values)]), block_rows=4096)


def test_pages_a_process_wrote_are_never_dropped(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.zeros((50_000, 16), np.float32))
    for mode in ("c",):  # copy-on-write: dropping its pages would lose the writes
        mapped = np.load(path, mmap_mode=mode)
        mapped[::3] = 5.0
        for _, _, block in arrays.row_blocks(mapped, 1000):
            block.sum()
        assert (mapped[::3] == 5.0).all() and (mapped[1::3] == 0.0).all()


def test_all_finite_is_numpys_answer_in_any_block(monkeypatch, mapped_rows):
    values, _, mapped = mapped_rows
    monkeypatch.setattr(arrays, "FINITE_BLOCK_BYTES", 997 * values[:1].nbytes)  # many blocks, the last one short
    assert arrays.all_finite(values) and arrays.all_finite(mapped) and arrays.all_finite(np.arange(5))
    for row in (0, 996, 997, len(values) - 1):
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = values.copy()
            spoiled[row, 3] = bad
            assert not arrays.all_finite(spoiled) and not np.isfinite(spoiled).all()
    assert not arrays.all_finite(np.float32(np.nan)) and arrays.all_finite(np.zeros((0, 4), np.float32))
    assert not arrays.all_finite(np.array([[1 + 1j, complex(np.inf, 0)]]))
