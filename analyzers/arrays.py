"""Large arrays whose memory is mapped at once: numpy-only, cheap to import."""
from __future__ import annotations

import math
import mmap

import numpy as np

# Below this many bytes np.empty is as fast; above, its pages are mapped one 4 KiB page fault at a time on first
# write: 368 MB of attributions took 0.56 s to fill the first time and 0.03 s the second on this machine (2 cores,
# no transparent huge pages), against 0.08 s + 0.03 s mapped by MAP_POPULATE.
POPULATE_BYTES = 64 << 20


def empty_array(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised, writable, C-ordered array like `np.empty(shape, dtype)`; when it is large (POPULATE_BYTES)
    and the platform has MAP_POPULATE (Linux), its pages are mapped by the kernel in one call instead of on first
    touch. Every element must be written before it is read, as with np.empty."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if not isinstance(shape, int) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if nbytes < POPULATE_BYTES or populate is None or dtype.hasobject:
        return np.empty(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    except (OSError, ValueError):  # a mapping refused (limits): the plain allocation
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)



def row_blocks(array: np.ndarray, rows: int):
    """Yield `(start, stop, array[start:stop])` over the rows of `array`, `rows` at a time.

    When `array` reads a file through a read-only memory map (`np.load(path, mmap_mode="r")`, or a view of one), the
    pages of each block are handed back once the loop has moved past it: pages a map has read count in the process's
    RSS until it is unmapped, so one pass over a 640 MB embedding file had held all 640 MB. They are read again from
    the file (the page cache) if touched again; nothing is lost, because the map cannot be written."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    release = _page_release(array)
    for start in range(0, len(array), rows):
        stop = min(start + rows, len(array))
        block = array[start:stop]
        try:
            yield start, stop, block
        finally:
            release(block)


def rows_per_block(array: np.ndarray, nbytes: int) -> int:
    """How many of `array`'s rows fit in `nbytes` (at least one): the block size of a pass with `row_blocks`."""
    return max(1, int(nbytes) // max(1, array[:1].nbytes))


FINITE_BLOCK_BYTES = 32 << 20


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of `array` is finite, checked FINITE_BLOCK_BYTES of rows at a time (`row_blocks`): one
    np.isfinite over 123 MB of images took 0.065 s with its 31 MB mask, blocks of 32 MB 0.01 s; a file map's pages
    are handed back as it goes."""
    if array.ndim == 0 or array.dtype.kind not in "fc":
        return bool(np.isfinite(array).all())
    return all(bool(np.isfinite(block).all())
               for _, _, block in row_blocks(array, rows_per_block(array, FINITE_BLOCK_BYTES)))


def take_rows(array: np.ndarray, rows: np.ndarray, *, block_rows: int) -> np.ndarray:
    """`array[rows]` for sorted row indices, gathered `block_rows` at a time so that a read-only file map holds one
    block's pages at once (`row_blocks`): the kernel maps 64 KiB around every page fault, so 20k random rows of a
    640 MB map had mapped nearly all of it."""
    rows = np.asarray(rows)
    increasing = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
    in_range = len(rows) == 0 or (rows.dtype.kind in "iu" and 0 <= rows[0] and rows[-1] < len(array))
    if _read_only_map(array) is None or not (increasing and in_range):
        return array[rows]  # numpy's own indexing: its errors, its negative rows
    out = np.empty((len(rows),) + array.shape[1:], array.dtype)
    done = 0
    for start, stop, block in row_blocks(array, block_rows):
        upto = done + int(np.searchsorted(rows[done:], stop))
        out[done:upto] = block[rows[done:upto] - start]
        done = upto
    return out


def _page_release(array: np.ndarray):
    """A function dropping a C-contiguous view's pages from `array`'s read-only file map; a no-op for other arrays
    (memory the process wrote must never be dropped: MADV_DONTNEED would zero a private or anonymous map)."""
    mapped = _read_only_map(array)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if mapped is None or dontneed is None:
        return lambda view: None
    base = np.frombuffer(mapped, np.uint8).ctypes.data
    size = len(mapped)

    def release(view: np.ndarray) -> None:
        if view.size == 0 or not view.flags.c_contiguous:
            return
        start = view.ctypes.data - base
        first = start - start % mmap.PAGESIZE
        stop = min(size, start + view.nbytes)
        if 0 <= first < stop:
            try:
                mapped.madvise(dontneed, first, stop - first)
            except OSError:  # a map the kernel will not advise (hugetlbfs): its pages stay, nothing is lost
                pass

    return release


def _read_only_map(array):
    """The mmap.mmap under `array` when it is (a view of) a read-only np.memmap of a file, else None."""
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap) and array.mode == "r" and isinstance(array.base, mmap.mmap):
            return array.base
        array = array.base
    return None
