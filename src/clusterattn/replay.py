"""Record one full prefill and replay many presses on it; stack replayed caches into one batch.

Compression happens after each layer's own attention and never changes the prefill's activations,
so a press replayed on a recorded prefill gives the cache the live layer-wise path would give.
Evaluation grids use this to share one prefill between every press and budget.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from clusterattn.integration import CompressionStats, _CacheState, apply_press, gather_kv, install_compressed


class _Recorder:
    """A stand-in press that keeps each layer's queries instead of compressing (see :func:`replay`)."""

    uniform_layers = True

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}

    def select(self, query, key, scaling, *, layer, n_layers, pad_mask):
        self.queries[layer] = query.detach().clone()
        self.scaling[layer] = scaling
        return None


@dataclass
class PrefillRecord:
    """One full prefill, kept so that many presses can be applied to it (see :func:`replay`).

    Compression happens after each layer's own attention and never changes the prefill's
    activations, so a press applied to a recorded prefill yields exactly the cache (and the same
    first token) as the same press applied live inside prefill.
    """

    cache: Cache
    queries: dict[int, torch.Tensor]  # per compressible layer rank: (batch, q_heads, seq, head_dim)
    scaling: dict[int, float]
    layers: list[int]
    pad_mask: torch.Tensor | None
    next_pos: torch.Tensor
    logits: torch.Tensor


@contextlib.contextmanager
def recording(model) -> Iterator[_Recorder]:
    """Record the post-RoPE queries of every compressible layer during one prefill."""
    recorder = _Recorder()
    with apply_press(model, recorder) as session:
        recorder.session = session
        yield recorder


def replay(record: PrefillRecord, press) -> tuple[Cache, CompressionStats]:
    """A new cache holding ``press``'s selection from a recorded prefill; the record is unchanged."""
    cache = copy.copy(record.cache)
    cache.layers = [copy.copy(layer) for layer in record.cache.layers]
    if hasattr(cache, "_clusterattn"):
        del cache._clusterattn
    stats = CompressionStats(prompt_tokens=record.cache.layers[record.layers[0]].keys.shape[2])
    start = time.perf_counter()
    with torch.no_grad():
        for rank, layer_idx in enumerate(record.layers):
            key, value = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
            idx = press.select(
                record.queries[rank], key, record.scaling[rank],
                layer=rank, n_layers=len(record.layers), pad_mask=record.pad_mask,
            )  # fmt: skip
            if idx is None:
                continue
            install_compressed(
                cache, layer_idx, *gather_kv(key, value, idx), idx,
                record.pad_mask, record.next_pos, stats,
            )  # fmt: skip
    stats.seconds = time.perf_counter() - start
    return cache, stats


def stack_caches(caches: list[Cache]) -> Cache:
    """One cache whose batch rows are the rows of ``caches``, in order.

    Every cache must hold the same per-layer lengths (e.g. several uniform-budget presses replayed
    on one prefill), so their rows decode together in one batch; compression state (original next
    positions, kept padding slots) is stacked alongside.
    """
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    shapes = {tuple(layer.keys.shape[2] for layer in cache.layers) for cache in caches}
    if len(shapes) != 1:
        raise ValueError(f"caches of different per-layer lengths cannot share a batch: {sorted(shapes)}")
    states = [getattr(cache, "_clusterattn", None) for cache in caches]
    if len({state is None for state in states}) != 1:
        raise ValueError("cannot stack compressed and uncompressed caches")
    merged = copy.copy(caches[0])
    merged.layers = []
    for i, layer in enumerate(caches[0].layers):
        layer = copy.copy(layer)
        layer.keys = torch.cat([cache.layers[i].keys for cache in caches])
        layer.values = torch.cat([cache.layers[i].values for cache in caches])
        merged.layers.append(layer)
    if states[0] is not None:
        width = next(iter(caches[0]._clusterattn.lengths.values()))
        kept_real = None
        if any(state.kept_real is not None for state in states):
            rows = [
                state.kept_real
                if state.kept_real is not None
                else torch.ones(cache.layers[0].keys.shape[0], width, dtype=torch.bool)
                for state, cache in zip(states, caches, strict=True)
            ]
            kept_real = torch.cat(rows)
        merged._clusterattn = _CacheState(
            next_pos=torch.cat([state.next_pos for state in states]),
            lengths=dict(states[0].lengths),
            kept_real=kept_real,
        )
    return merged


def _width(cache: Cache) -> int:
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    if len(lengths) != 1:
        raise ValueError(f"padded stacking needs one length across a cache's layers, got {sorted(lengths)}")
    return lengths.pop()


def stack_padded(caches: list[Cache]) -> tuple[Cache, torch.Tensor | None]:
    """One batch from caches of different lengths, each with one length across its layers.

    Shorter caches are left-padded with zero keys and values; the returned ``(batch, width)`` mask
    is False on those slots (and on kept padding slots), or None when nothing is padded. Compressed
    caches (every layer compressed, e.g. uniform-budget presses at several budgets) carry the mask
    as their kept-slot state, so decoding under a press masks the slots by itself; plain caches
    (kvpress's) need the mask passed as ``attention_mask`` with the new tokens' columns appended.
    Softmax gives masked slots exactly zero weight: rows decode as they would alone, up to float
    rounding.
    """
    if not caches:
        raise ValueError("stack_padded needs at least one cache")
    widths = [_width(cache) for cache in caches]
    width = max(widths)
    states = [getattr(cache, "_clusterattn", None) for cache in caches]
    if len({state is None for state in states}) != 1:
        raise ValueError("cannot stack compressed and uncompressed caches")
    if states[0] is not None and any(
        len(s.lengths) != len(c.layers) for s, c in zip(states, caches, strict=True)
    ):
        raise ValueError("padded stacking needs every layer compressed (no sliding-window layers)")
    real = []
    for cache, state, w in zip(caches, states, widths, strict=True):
        kept = None if state is None else state.kept_real
        if kept is None:
            kept = torch.ones(cache.layers[0].keys.shape[0], w, dtype=torch.bool)
        real.append(F.pad(kept.to(cache.layers[0].keys.device), (width - w, 0), value=False))
    kept_real = torch.cat(real)
    kept_real = None if bool(kept_real.all()) else kept_real
    merged, pads = copy.copy(caches[0]), [(0, 0, width - w, 0) for w in widths]
    merged.layers = []
    for i, layer in enumerate(caches[0].layers):
        layer = copy.copy(layer)
        layer.keys = torch.cat([F.pad(c.layers[i].keys, p) for c, p in zip(caches, pads, strict=True)])
        layer.values = torch.cat([F.pad(c.layers[i].values, p) for c, p in zip(caches, pads, strict=True)])
        merged.layers.append(layer)
    if states[0] is not None:
        merged._clusterattn = _CacheState(
            next_pos=torch.cat([state.next_pos for state in states]),
            lengths={layer: width for layer in states[0].lengths},
            kept_real=kept_real,
        )
    return merged, kept_real
