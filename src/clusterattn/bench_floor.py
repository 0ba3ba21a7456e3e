"""The memory-bandwidth floor of a decode step, measured on the machine that runs the bench.

A decode step reads every weight once and the whole cache once; nothing can make it faster than
those bytes divided by the memory bandwidth. :func:`copy_bandwidth` measures the bandwidth the way
STREAM's copy kernel does (bytes read plus bytes written, per second, of a large tensor copy on the
bench's own device and threads), and :func:`floor_ms` turns a step's bytes into the floor that
``clusterattn bench`` and ``benchmarks/gpu_bench.py`` print beside each decode time.

:func:`matvec_ms` measures a second, practical bound: the time the device's own matrix-vector kernels
take for one token over the model's linear weights. Where a decode step is far from the bandwidth
floor but close to this bound (two CPU cores, whose GEMV reads well below the copy bandwidth), the
kernels, not the host or the cache, set the step's time.
"""

from __future__ import annotations

import statistics
import time

import torch

from clusterattn.timing import synchronize

__all__ = ["copy_bandwidth", "floor_ms", "linear_weights", "matvec_ms", "weight_bytes"]


def copy_bandwidth(
    device: torch.device | str = "cpu", nbytes: int = 2**28, repeats: int = 5, rounds: int = 3
) -> float:
    """Bytes/s (read + written) of ``dst.copy_(src)`` over ``nbytes``-byte float32 tensors on
    ``device``: the best of ``rounds`` rounds, each the median of ``repeats`` copies between freshly
    allocated buffers after one untimed copy. Larger than any last-level cache, so it measures memory,
    not cache, bandwidth; the best round, because the floor is the least time the memory allows (on
    CPU one round's buffers may land on huge pages and copy about twice as fast as another's)."""
    device = torch.device(device)
    best = 0.0
    for _ in range(rounds):
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            dst.copy_(src)
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * src.numel() * src.element_size() / statistics.median(times))
        del src, dst
    return best


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones once), except an
    untied input embedding, of which a step reads one row per token."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and embedding is not None and output.weight is embedding
    for param in model.parameters():
        if id(param) in seen or (param is embedding and not tied):
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def linear_weights(model) -> list[torch.Tensor]:
    """Every distinct ``nn.Linear`` weight of ``model`` ``(out, in)``, a tied output embedding once.

    Raises:
        ValueError: the model has no linear layer.
    """
    seen, weights = set(), []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights.append(module.weight)
    if not weights:
        raise ValueError("the model has no nn.Linear weights to time")
    return weights


@torch.no_grad()
def matvec_ms(model, repeats: int = 5) -> float:
    """Milliseconds of one token's matrix-vector products ``(1, in) @ (in, out)`` over every distinct
    ``nn.Linear`` weight of ``model`` (a tied output embedding once), run back to back on the
    weights' own device and dtype: the median of ``repeats`` passes after one untimed pass. The
    attention, norms and the cache are left out, so a decode step cannot beat this with these
    kernels."""
    weights = linear_weights(model)
    device = weights[0].device
    inputs = {
        (w.shape[1], w.dtype): torch.randn(1, w.shape[1], dtype=w.dtype, device=device) for w in weights
    }

    def one_pass() -> float:
        synchronize(device)
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1], w.dtype], w)
        synchronize(device)
        return time.perf_counter() - start

    one_pass()
    return 1000 * statistics.median(one_pass() for _ in range(repeats))


def floor_ms(weights: int, cache: int, bandwidth: float) -> float:
    """Milliseconds to read ``weights + cache`` bytes at ``bandwidth`` bytes/s."""
    return 1000 * (weights + cache) / bandwidth
