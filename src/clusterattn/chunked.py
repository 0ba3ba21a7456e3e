"""Chunked prefill: each decoder layer runs over a long prompt in query chunks.

At long prompts the prefill's peak memory is set by activations, not by the cache: a decoder layer
holds several ``(batch, seq, hidden)`` tensors of the whole prompt at once (normed input, queries,
their rotated copies, the attention output and its projection) and two or three ``(batch, seq,
intermediate)`` ones in its MLP. :func:`prefill_chunks` runs each layer over ``chunk`` prompt tokens
at a time instead, layer after layer: the chunk's queries attend to the layer's keys of every
earlier token and its own (the cache layer gathers them chunk by chunk), and its MLP runs on the
chunk alone. The model computes the same function; only the order of the work changes. Between
layers the whole prompt's hidden states exist as before (one copy with ``overwrite=True``), and each
compressed layer is compressed once its last chunk has run, before the next layer starts, with the
last queries the press reads (:mod:`clusterattn.integration`). So the peak becomes the residual
stream, one layer's full K/V and one chunk's activations.

With sdpa on CPU, chunks that are a multiple of 512 tokens give bit-identical outputs (torch's
CPU kernel splits keys in blocks of 512); other sizes agree to float rounding.

Only a prefill into an empty cache is chunked (a decode step, a second turn or a prompt of at most
``chunk`` tokens runs as one pass). The first use wraps each decoder layer's ``forward`` once (one
generic wrapper for every family; parameters and state dict unchanged); the wrapper is inert for
calls that did not ask for chunks and inside ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from clusterattn.hf import attn_implementation, find_cache, is_static_sliding, masked_gqa

__all__ = ["Chunk", "current", "decoder_layers", "install_chunking", "prefill_chunks", "uninstall_chunking"]

_ORIGINAL = "_clusterattn_forward"
_local = threading.local()  # .tokens: the chunk size asked for; .chunk: the chunk being run
_lock = threading.Lock()
_SLICED = ("position_ids", "cache_position", "position_embeddings")


@dataclass
class _Run:
    """One decoder layer's chunked call: its prompt length and the reusable causal-mask buffer."""

    total: int
    rows: int
    buffer: torch.Tensor | None = None
    dirty: tuple[int, int] | None = field(default=None)  # the buffer's columns now holding a triangle


@dataclass
class Chunk:
    """Prompt tokens ``[start, end)`` of a ``total``-token prefill, running through one layer."""

    start: int
    end: int
    run: _Run

    @property
    def total(self) -> int:
        return self.run.total

    @property
    def final(self) -> bool:
        """True for the layer's last chunk (its cache then holds the whole prompt)."""
        return self.end == self.run.total

    def mask(self, mask, kv_len: int, dtype: torch.dtype, device: torch.device):
        """The attention mask of this chunk's queries over the layer's ``kv_len`` keys (the last of
        them is token ``end - 1``), from the whole prompt's ``mask``: its rows of this chunk and, when
        the layer holds fewer keys than the mask has columns (a dynamic layer mid-prompt, a sliding
        window), the columns of those keys. Where the prompt's mask is None (causal from the first
        token, no padding), the first chunk keeps None and later ones get an additive ``(1, 1,
        chunk, end)`` mask, causal aligned to the last key (a static layer's: ``kv_len`` columns,
        token ``j`` in column ``j``)."""
        start, end, n = self.start, self.end, self.end - self.start
        if isinstance(mask, torch.Tensor):
            if mask.ndim != 4:
                raise RuntimeError(f"chunked prefill needs a 4-D mask, not shape {tuple(mask.shape)}")
            if mask.shape[-2] != 1:
                mask = mask[..., start:end, :]
            if kv_len < mask.shape[-1]:
                mask = mask[..., end - kv_len : end]
            return mask
        if mask is not None:
            raise RuntimeError(f"chunked prefill cannot slice a {type(mask).__name__} attention mask")
        if start == 0:
            return None  # causal from the first key, as in one pass
        if kv_len > end:  # a static layer: key column j is token j, later columns not written yet
            cols, rows = torch.arange(kv_len, device=device), torch.arange(start, end, device=device)
            future = cols[None, :] > rows[:, None]
            blank = torch.zeros((n, kv_len), dtype=dtype, device=device)
            return blank.masked_fill_(future, float("-inf"))[None, None]
        if kv_len != end:
            raise RuntimeError(f"chunked prefill: a layer holds {kv_len} keys at token {end} without a mask")
        run = self.run
        if run.buffer is None or run.buffer.dtype != dtype:
            run.buffer, run.dirty = torch.zeros((run.rows, run.total), dtype=dtype, device=device), None
        buffer = run.buffer
        if run.dirty is not None:
            buffer[:, run.dirty[0] : run.dirty[1]] = 0
        block = buffer[:n, start:end]
        block.masked_fill_(torch.ones((n, n), dtype=torch.bool, device=device).triu_(1), float("-inf"))
        run.dirty = (start, end)
        return buffer[None, None, :n, :end]


def current() -> Chunk | None:
    """The chunk this thread is running through a decoder layer, or None outside chunked prefill."""
    return getattr(_local, "chunk", None)


def decoder_layers(model) -> list[torch.nn.Module]:
    """Every decoder layer of ``model``'s language model (a module with an ``mlp`` and a
    ``self_attn`` that has a ``layer_idx``)."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "mlp", None), torch.nn.Module)
        and hasattr(getattr(module, "self_attn", None), "layer_idx")
    ]


def _sliced(name: str, value, start: int, end: int):
    """A decoder layer's argument for prompt tokens ``[start, end)``: positions sliced, the rest as is."""
    if name not in _SLICED or value is None:
        return value
    if name == "cache_position":
        return value[start:end]
    if name == "position_ids":
        return value[..., start:end]
    return tuple(t[:, start:end] for t in value)  # position_embeddings: (cos, sin), (batch, seq, dim)


def _check_kwargs(kwargs: dict, total: int) -> None:
    for name, value in kwargs.items():
        if name in _SLICED and value is not None:
            tensors = value if isinstance(value, tuple) else (value,)
            axis = {"position_ids": -1, "cache_position": 0, "position_embeddings": 1}[name]
            if any(not isinstance(t, torch.Tensor) or t.shape[axis] != total for t in tensors):
                raise RuntimeError(f"chunked prefill: {name} does not have the prompt's {total} tokens")
        elif isinstance(value, torch.Tensor) and name != "attention_mask":
            raise RuntimeError(f"chunked prefill cannot slice the decoder layer's {name!r} argument")


def _is_prefill(module, cache) -> bool:
    """True when ``module``'s layer of ``cache`` holds nothing yet (a prefill into an empty cache);
    raises for a layer whose keys a chunk's mask cannot address (a static ring buffer)."""
    idx = module.self_attn.layer_idx
    if idx >= len(cache.layers):
        return True
    if is_static_sliding(cache.layers[idx]):
        raise ValueError(
            "prefill_chunk does not support a static cache's sliding-window layers (Gemma3 with "
            "compile=True or cache_implementation='static'); use a dynamic cache or one pass"
        )
    return cache.layers[idx].get_seq_length() == 0


def _chunked_forward(module, *args, **kwargs):
    """``module``'s own forward over the prompt ``chunk`` tokens at a time when this thread asked for
    chunks and the call is a prefill of more than ``chunk`` tokens into an empty cache."""
    forward = getattr(module, _ORIGINAL)
    tokens = getattr(_local, "tokens", None)
    if tokens is None or torch.compiler.is_compiling() or current() is not None:
        return forward(*args, **kwargs)
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[1] <= tokens:
        return forward(*args, **kwargs)
    cache = find_cache(args, kwargs)
    if cache is None:
        raise ValueError("prefill_chunk needs a cache to gather each layer's keys (call with use_cache=True)")
    if not _is_prefill(module, cache):
        return forward(*args, **kwargs)
    implementation = attn_implementation(module.self_attn)
    if not implementation.startswith("clusterattn_"):
        raise RuntimeError(
            f"chunked prefill needs clusterattn's attention wrapper, but the model runs {implementation!r}; "
            "call clusterattn.integration.install(model) again"
        )
    if len(args) > 1:
        raise RuntimeError("chunked prefill needs the decoder layer's other arguments by keyword")
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    total = hidden.shape[1]
    _check_kwargs(kwargs, total)
    run, out, rest = _Run(total=total, rows=min(tokens, total)), None, None
    if getattr(_local, "overwrite", False) and not torch.is_grad_enabled():
        out = hidden  # a chunk's input rows are read by that chunk alone: its output replaces them
    try:
        with masked_gqa():  # chunks carry a mask: keep grouped KV heads whole (CPU), not copied per head
            for start in range(0, total, tokens):
                end = min(start + tokens, total)
                sliced = {k: _sliced(k, v, start, end) for k, v in kwargs.items()}
                _local.chunk = Chunk(start, end, run)
                result = forward(hidden[:, start:end], **sliced)
                _local.chunk = None
                if isinstance(result, tuple):
                    result, rest = result[0], result[1:]
                if out is None:
                    out = result.new_empty((result.shape[0], total, result.shape[-1]))
                out[:, start:end] = result
                del result
    finally:
        _local.chunk = None
    return out if rest is None else (out, *rest)


def install_chunking(model) -> None:
    """Wrap every decoder layer of ``model`` (once; idempotent and thread-safe). Calls that did not
    enter :func:`prefill_chunks` compute exactly what they did."""
    with _lock:
        for layer in decoder_layers(model):
            if _ORIGINAL not in layer.__dict__:
                layer.__dict__[_ORIGINAL] = layer.forward
                layer.__dict__["forward"] = types.MethodType(_chunked_forward, layer)


def uninstall_chunking(model) -> None:
    """Undo :func:`install_chunking`: every decoder layer's own forward again."""
    with _lock:
        for layer in decoder_layers(model):
            if _ORIGINAL in layer.__dict__:
                del layer.__dict__["forward"]
                del layer.__dict__[_ORIGINAL]


def check_chunk(tokens) -> int | None:
    """``tokens`` as a chunk size (an int >= 1) or None; raises for anything else."""
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"prefill_chunk must be an int or None, got {type(tokens).__name__}")
    if tokens < 1:
        raise ValueError(f"prefill_chunk must be >= 1 token, got {tokens}")
    return tokens


@contextlib.contextmanager
def prefill_chunks(model, tokens: int | None, *, overwrite: bool = False) -> Iterator[None]:
    """Run this thread's prefills of ``model`` ``tokens`` prompt tokens at a time through each
    decoder layer inside the block (None: unchanged, no wrapper installed).

    ``overwrite=True`` writes each chunk's output over its own input rows (outside autograd), so
    the whole forward keeps one ``(batch, seq, hidden)`` residual stream instead of three (the
    model's input embeddings and each layer's input and output). Only for calls that keep no layer
    input: not with ``output_hidden_states=True`` or hooks that record hidden states, whose tensors
    would be overwritten. :func:`clusterattn.generate` and ``clusterattn bench`` use it."""
    tokens = check_chunk(tokens)
    if tokens is None:
        yield
        return
    from clusterattn.integration import install

    install(model)  # the attention wrapper gives each chunk its mask
    install_chunking(model)
    previous = getattr(_local, "tokens", None), getattr(_local, "overwrite", False)
    _local.tokens, _local.overwrite = tokens, bool(overwrite)
    try:
        yield
    finally:
        _local.tokens, _local.overwrite = previous
