"""Numba kernel behind :mod:`clusterattn.dbac_compiled` (imported only when numba is installed).

It walks ``(rows, n)`` int32 bit patterns of float32 scores one row after another; numba compiles
it to machine code on first use and caches that next to this file.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core.errors import NumbaError

__all__ = ["NumbaError", "cluster_key"]

_INT32_MIN = -(2**31)
_FINITE_BITS = np.uint32(0x7F800000)  # bits of +inf: plain scores' bits, as uint32, lie below it


@numba.njit(cache=True, nogil=True, boundscheck=False)
def cluster_key(bits, blk, theta_bits, num_block, before, key):  # pragma: no cover - compiled
    """DBAC variant A's ranking key, written into ``key`` ``(rows, n)`` int32.

    Per row of ``bits`` ``(rows, n)`` int32: each ``blk``-token block's peak (largest bits;
    ``-2**31``, noise, where it is below ``theta_bits``), the ``num_block`` highest peaks (equal
    peaks: the later block first), each such non-noise block's span of ``blk`` tokens from its
    first arg-max minus ``before``, shifted inside ``[0, n)``, and the key: ``bits`` inside the
    spans, ``bits - 2**31`` elsewhere. Returns False, early, at the first row holding a score that
    is not plain (sign bit set, or the bits of inf / NaN); ``key`` is then unspecified.

    Loop indices are unsigned: numba then drops its negative-index wrap-around, and the block
    maxima vectorise (3-4x faster than with signed indices)."""
    rows, n = bits.shape
    n_blocks = (n + blk - 1) // blk
    k = min(num_block, n_blocks)
    width = np.uint64(blk)
    size = np.uint64(n)
    unsigned = bits.view(np.uint32)  # one comparison flags both a set sign bit and inf / NaN
    order = np.empty(n_blocks, dtype=np.int64)  # (peak << 32) + block: unique, ties to the later block
    for r in range(rows):
        row_u = unsigned[r]
        worst = np.uint32(0)
        for b in range(n_blocks):
            lo = np.uint64(b) * width
            top = np.uint32(0)
            for i in range(lo, min(lo + width, size)):
                top = max(top, row_u[i])
            worst = max(worst, top)
            peak = np.int64(np.int32(top))
            order[b] = (np.int64(_INT32_MIN) if peak < theta_bits else peak) * 4294967296 + b
        if worst >= _FINITE_BITS:
            return False
        chosen = np.partition(order, n_blocks - k)[n_blocks - k :] if k < n_blocks else order
        row = bits[r]
        out = key[r]
        for i in range(size):
            out[i] = row[i] ^ _INT32_MIN
        for code in chosen:
            if code >> 32 == _INT32_MIN:  # noise: no span
                continue
            lo = np.uint64(code & 0xFFFFFFFF) * width
            centre = lo
            for i in range(lo + np.uint64(1), min(lo + width, size)):
                if row[i] > row[centre]:
                    centre = i
            start = np.uint64(min(max(np.int64(centre) - before, 0), n - blk))
            for i in range(start, start + width):
                out[i] = row[i]
    return True
