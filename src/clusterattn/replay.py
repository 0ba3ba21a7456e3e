"""Record one full prefill and replay many presses on it (:mod:`clusterattn.batching` stacks the
replayed caches into decode batches).

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
from transformers.cache_utils import Cache

from clusterattn.integration import CompressionStats, apply_press, gather_kv, install_compressed


class _Recorder:
    """A stand-in press that keeps each layer's queries instead of compressing (see :func:`replay`)."""

    uniform_layers = True

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}

    def warm_up(self) -> None:
        """Nothing to load (a session calls it on every press when it starts)."""

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
    press.warm_up()  # outside the timed compression, as in a live session
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
