"""Compiled CPU path of DBAC's plain case (variant A, no sinks, finite non-negative scores).

The tensor path of :func:`clusterattn.dbac.dbac` costs a fixed number of small tensor ops per call
whatever the size (block peaks, threshold, spans, key, scatter: about 20 of them, each a few
microseconds on CPU), so on one prompt's ``(1, kv_heads, n)`` scores it spent twice as long as a
plain top-k. This module computes the same int32 ranking key in one compiled call (numba): block
peaks with the threshold and the plain-score check fused in, the top blocks (a partition of
``(peak, block)`` codes), then the key with the spans written in place. The final top-``budget``
stays torch's own ``topk`` on that key, so the kept indices are identical to the tensor path's,
ties included (tests compare both paths).

Opt-in, because it costs memory: numba's LLVM adds about 100 MB of resident memory to the process
(more at the peak on glibc, whose malloc then keeps more; SmolLM2 at 16k: peak RSS 1861 MB against
1608 MB without it), while it saves a few milliseconds per prompt. Turn it on with
``CLUSTERATTN_COMPILED=1`` in the environment or :func:`set_enabled` (``True``); it then runs on
CPU tensors when numba is installed (``pip install clusterattn[compiled]``). On other devices,
without numba, or when numba cannot compile or cache the kernel here (one ``RuntimeWarning``), the
tensor path runs.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np
import torch

__all__ = ["available", "enabled", "plain_key", "set_enabled", "warm_up"]

_STATE = {"enabled": os.environ.get("CLUSTERATTN_COMPILED", "0") == "1", "kernels": None}


def _kernels():
    """The numba kernels module, imported on first use; None when numba is not installed (with a
    warning, once, if the compiled path was asked for) or cannot be used here (with a warning)."""
    if _STATE["kernels"] is None:
        try:
            _STATE["kernels"] = importlib.import_module("clusterattn._dbac_numba")
        except ImportError as error:  # numba is not installed: the tensor path, as on other devices
            if _STATE["enabled"]:  # asked for: say why it is not there
                _give_up(error)
            _STATE["kernels"] = False
        except Exception as error:  # e.g. numba finds no writable cache location
            _give_up(error)
    return _STATE["kernels"] or None


def _give_up(error: Exception) -> None:
    """Fall back to the tensor path for the rest of the process, saying why."""
    _STATE["kernels"] = False
    warnings.warn(
        f"clusterattn: compiled DBAC unavailable ({type(error).__name__}: {error}); using the tensor "
        "path (the same selections, slower on CPU)",
        RuntimeWarning,
        stacklevel=4,
    )


def available() -> bool:
    """Whether the compiled kernels can run here (numba importable)."""
    return _kernels() is not None


def enabled() -> bool:
    """Whether :func:`clusterattn.dbac.dbac` uses the compiled path where it applies."""
    return bool(_STATE["enabled"]) and available()


def set_enabled(flag: bool) -> bool:
    """Turn the compiled path on or off for this process; returns the previous setting."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {type(flag).__name__}")
    previous, _STATE["enabled"] = bool(_STATE["enabled"]), flag
    return previous


def plain_key(
    scores: torch.Tensor, blk: int, num_block: int, theta_bits: int, before: int
) -> torch.Tensor | None:
    """DBAC variant A's int32 ranking key ``(..., n)`` for ``scores`` ``(..., n)``, or None where
    the compiled path does not apply (disabled, numba missing, not a CPU tensor, float64, a tensor
    that needs grad, or any score that is not plain: negative, ``-0.0``, inf or NaN).

    ``blk``: the block and span width; ``theta_bits``: the int32 bits of the float32 threshold
    (``-2**31`` admits every block); ``before``: tokens of each span placed before its centre.
    The key is ``bits - 2**31`` outside the clusters and ``bits`` inside, exactly the tensor path's
    (``dbac._dbac_plain``)."""
    if (
        not _STATE["enabled"]
        or not scores.is_cpu
        or scores.dtype == torch.float64
        or scores.requires_grad
        or scores.numel() == 0
    ):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    n = scores.shape[-1]
    # numpy views and a numpy key: a torch view or allocation costs several times as much here
    bits = scores.float().contiguous().numpy().view(np.int32)
    key = np.empty(bits.shape, dtype=np.int32)
    try:
        plain = kernels.cluster_key(
            bits.reshape(-1, n), blk, theta_bits, num_block, before, key.reshape(-1, n)
        )
    except kernels.NumbaError as error:  # this numba / numpy could not compile it
        _give_up(error)
        return None
    return torch.from_numpy(key) if plain else None


def warm_up() -> bool:
    """Import numba and load (or compile, the first time on a machine) the kernel now, so that the
    first compression does not pay for it (about 0.5 s from numba's cache). Returns whether the
    compiled path is on."""
    if enabled():
        plain_key(torch.ones(1, 2), 1, 1, -(2**31), 0)
    return enabled()
