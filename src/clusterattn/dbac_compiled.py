"""Compiled CPU path of DBAC's plain case (variant A, no sinks, finite non-negative scores).

The tensor path of :func:`clusterattn.dbac.dbac` costs a fixed number of small tensor ops per call
whatever the size (block peaks, threshold, spans, key, scatter: about 20 of them, each a few
microseconds on CPU), so on one prompt's ``(1, kv_heads, n)`` scores it spends about twice as long
as a plain top-k. This module computes the same int32 ranking key in one call of a small C kernel
(``clusterattn._dbac_c``, ``src/clusterattn/_dbac_c.c``): block peaks with the threshold and the
plain-score check fused in, the top blocks (a heap of unique ``(peak, block)`` codes: equal peaks go
to the later block), then the key with the spans written in place. The final top-``budget`` stays
torch's own ``topk`` on that key, so the kept indices are identical to the tensor path's, ties
included (tests compare both paths).

The kernel is a plain CPython extension, built when the package is installed if a C compiler is
there (``setup.py``, ``optional=True``). It adds no dependency and no measurable memory, so it is
on by default wherever it was built. ``CLUSTERATTN_COMPILED=0`` in the environment or
:func:`set_enabled` (``False``) turns it off. On other devices, and where the extension was not
built (silently; with one ``RuntimeWarning`` if ``CLUSTERATTN_COMPILED=1`` asked for it), the tensor
path runs.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np
import torch

__all__ = ["available", "enabled", "plain_key", "set_enabled", "warm_up"]

_REQUESTED = os.environ.get("CLUSTERATTN_COMPILED", "")
_STATE = {"enabled": _REQUESTED != "0", "requested": _REQUESTED == "1", "kernel": None}


def _kernel():
    """The C extension module, imported on first use; None when it was not built (with a warning,
    once, if ``CLUSTERATTN_COMPILED=1`` asked for it) or cannot be loaded here (with a warning)."""
    if _STATE["kernel"] is None:
        try:
            _STATE["kernel"] = importlib.import_module("clusterattn._dbac_c")
        except ImportError as error:
            # not built (no C compiler at install time): the tensor path, as on other devices
            if _STATE["requested"]:  # asked for explicitly: say why it is not there
                _give_up(error)
            _STATE["kernel"] = False
        except Exception as error:  # a broken build
            _give_up(error)
    return _STATE["kernel"] or None


def _give_up(error: Exception) -> None:
    """Fall back to the tensor path for the rest of the process, saying why."""
    _STATE["kernel"] = False
    warnings.warn(
        f"clusterattn: compiled DBAC unavailable ({type(error).__name__}: {error}); using the tensor "
        "path (the same selections, slower on CPU). Reinstall with a C compiler to build it.",
        RuntimeWarning,
        stacklevel=4,
    )


def available() -> bool:
    """Whether the compiled kernel can run here (the extension was built)."""
    return _kernel() is not None


def enabled() -> bool:
    """Whether :func:`clusterattn.dbac.dbac` uses the compiled path where it applies."""
    return bool(_STATE["enabled"]) and available()


def set_enabled(flag: bool) -> bool:
    """Turn the compiled path on or off for this process; returns the previous setting."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {type(flag).__name__}")
    previous, _STATE["enabled"] = bool(_STATE["enabled"]), flag
    _STATE["requested"] = _STATE["requested"] or flag  # asked for: a missing kernel is worth a warning
    return previous


def plain_key(
    scores: torch.Tensor, blk: int, num_block: int, theta_bits: int, before: int
) -> torch.Tensor | None:
    """DBAC variant A's int32 ranking key ``(..., n)`` for ``scores`` ``(..., n)``, or None where
    the compiled path does not apply (disabled, not built, not a CPU tensor, float64, a tensor that
    needs grad, or any score that is not plain: negative, ``-0.0``, inf or NaN).

    ``blk``: the block and span width (``1 <= blk <= n``); ``theta_bits``: the int32 bits of the
    float32 threshold (``-2**31`` admits every block); ``before``: tokens of each span placed before
    its centre (``0 <= before < blk``). The key is ``bits - 2**31`` outside the clusters and
    ``bits`` inside, exactly the tensor path's (``dbac._dbac_plain``)."""
    if (
        not _STATE["enabled"]
        or not scores.is_cpu
        or scores.dtype == torch.float64
        or scores.requires_grad
        or scores.numel() == 0
    ):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    n = scores.shape[-1]
    # numpy views and a numpy key: a torch view or allocation costs several times as much here
    bits = scores.float().contiguous().numpy().view(np.int32)
    key = np.empty(bits.shape, dtype=np.int32)
    plain = kernel.cluster_key(bits, key, bits.size // n, n, blk, theta_bits, num_block, before)
    return torch.from_numpy(key) if plain else None


def warm_up() -> bool:
    """Load the kernel now, so that the first compression does not pay for the import. Returns
    whether the compiled path is on."""
    return enabled()
