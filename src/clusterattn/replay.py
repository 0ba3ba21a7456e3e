"""Record one full prefill and replay many presses on it (:mod:`clusterattn.batching` stacks the
replayed caches into decode batches).

Compression happens after each layer's own attention and never changes the prefill's activations,
so a press replayed on a recorded prefill gives the cache the live layer-wise path would give.
Evaluation grids use this to share one prefill between every press and budget.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from clusterattn import decoding
from clusterattn.cache import CompressedLayer, CompressionStats, Plan, compress_layer
from clusterattn.hf import Cache, fill_layer
from clusterattn.presses.decoding import DecodingPress


class Recorder:
    """A stand-in press that keeps each layer's queries instead of compressing (see :func:`replay`):
    arm a cache with it (``CompressedCache(model, Recorder())``) and prefill."""

    uniform_layers = True

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.pad_mask: torch.Tensor | None = None

    def warm_up(self) -> None:
        """Nothing to load."""

    def select(self, query, key, scaling, *, layer, n_layers, pad_mask, inv_freq=None):
        self.queries[layer] = query.detach().clone()
        self.scaling[layer] = scaling
        self.pad_mask = pad_mask
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
    inv_freq: dict[int, torch.Tensor] | None = None  # per layer index, for presses that unrotate keys


def replay(record: PrefillRecord, press) -> tuple[Cache, CompressionStats]:
    """A new cache holding ``press``'s selection from a recorded prefill; the record is unchanged."""
    cache = copy.copy(record.cache)
    cache.layers = [copy.copy(layer) for layer in record.cache.layers]  # decoding grows its own layers
    inv_freq = None if record.inv_freq is None else record.inv_freq.__getitem__
    plan = Plan(press=press, layers=list(record.layers), inv_freq=inv_freq)
    press.warm_up()  # outside the timed compression, as in a live prefill
    start = time.perf_counter()
    with torch.no_grad():
        for rank, layer_idx in enumerate(record.layers):
            source = record.cache.layers[layer_idx]
            layer = CompressedLayer(layer_idx, plan)
            fill_layer(layer, source.keys, source.values)
            layer.plan = None
            compress_layer(
                layer, plan, record.queries[rank], source.keys, source.values, record.scaling[rank],
                record.pad_mask,
            )  # fmt: skip
            if isinstance(press, DecodingPress):  # its window starts with the prompt's last queries
                decoding.start(layer, press, record.queries[rank])
            cache.layers[layer_idx] = layer
    plan.stats.seconds = time.perf_counter() - start
    return cache, plan.stats
