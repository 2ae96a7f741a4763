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

