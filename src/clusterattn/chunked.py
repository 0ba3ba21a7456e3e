"""MLP chunking of the prefill: a long prompt's MLPs run over the sequence in slices.

At long prompts the prefill's peak memory is set by activations, not by the cache: each decoder
layer's MLP holds two or three ``(batch, seq, intermediate)`` tensors at once (gate, up and their
product; 3-8x the hidden size), far more than the layer's own K/V. The MLP is per-token work, so
running it over ``chunk`` tokens at a time computes the same function. Attention still sees the
whole prompt at once (each layer is compressed right after its attention, as before), so the peak
becomes one layer's full K/V and queries plus one chunk's MLP activations.

:func:`mlp_chunks` turns it on for the calling thread's calls of a model, the way a press is
applied: the first use wraps each decoder layer's ``mlp`` once (one generic wrapper for every
family, the module's own ``forward`` kept and called per slice; parameters and state dict are
unchanged), and the wrapper is inert for calls that did not ask for chunks, for one-token decode
steps and inside ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator

import torch

__all__ = ["install_chunking", "mlp_modules", "mlp_chunks", "uninstall_chunking"]

_ORIGINAL = "_clusterattn_forward"
_local = threading.local()
_lock = threading.Lock()


def mlp_modules(model) -> list[torch.nn.Module]:
    """The ``mlp`` module of every decoder layer (a layer: a module with ``self_attn`` and ``mlp``)."""
    return [
        layer.mlp
        for layer in model.modules()
        if hasattr(layer, "self_attn") and isinstance(getattr(layer, "mlp", None), torch.nn.Module)
    ]


def _chunked_forward(module, hidden: torch.Tensor, *args, **kwargs):
    """``module``'s own forward over ``hidden`` ``(batch, seq, hidden)``, ``chunk`` tokens at a time
    when this thread asked for chunks and ``seq`` exceeds the chunk; else the forward itself."""
    forward = getattr(module, _ORIGINAL)
    chunk = getattr(_local, "tokens", None)
    if (
        chunk is None
        or args
        or kwargs
        or torch.compiler.is_compiling()
        or not isinstance(hidden, torch.Tensor)
        or hidden.ndim < 2
        or hidden.shape[-2] <= chunk
    ):
        return forward(hidden, *args, **kwargs)
    n = hidden.shape[-2]
    first = forward(hidden[..., :chunk, :])
    out = first.new_empty((*first.shape[:-2], n, first.shape[-1]))
    out[..., :chunk, :] = first
    del first
    for start in range(chunk, n, chunk):
        out[..., start : start + chunk, :] = forward(hidden[..., start : start + chunk, :])
    return out


def install_chunking(model) -> None:
    """Wrap every decoder layer's MLP of ``model`` (once; idempotent and thread-safe). Calls that
    did not enter :func:`mlp_chunks` compute exactly what they did."""
    with _lock:
        for mlp in mlp_modules(model):
            if _ORIGINAL not in mlp.__dict__:
                mlp.__dict__[_ORIGINAL] = mlp.forward
                mlp.__dict__["forward"] = types.MethodType(_chunked_forward, mlp)


def uninstall_chunking(model) -> None:
    """Undo :func:`install_chunking`: every MLP's own forward again."""
    with _lock:
        for mlp in mlp_modules(model):
            if _ORIGINAL in mlp.__dict__:
                del mlp.__dict__["forward"]
                del mlp.__dict__[_ORIGINAL]


def check_chunk(tokens) -> int | None:
    """``tokens`` as a chunk size (an int >= 1) or None; raises for anything else."""
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"mlp_chunk must be an int or None, got {type(tokens).__name__}")
    if tokens < 1:
        raise ValueError(f"mlp_chunk must be >= 1 token, got {tokens}")
    return tokens


@contextlib.contextmanager
def mlp_chunks(model, tokens: int | None) -> Iterator[None]:
    """Run the MLPs of this thread's calls of ``model`` over at most ``tokens`` tokens at a time
    inside the block (None: unchanged, no wrapper installed)."""
    tokens = check_chunk(tokens)
    if tokens is None:
        yield
        return
    install_chunking(model)
    previous = getattr(_local, "tokens", None)
    _local.tokens = tokens
    try:
        yield
    finally:
        _local.tokens = previous
