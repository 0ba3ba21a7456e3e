"""What :func:`clusterattn.integration.capturing_queries` records: the queries a model's attention
layers compute, prefill and decode steps alike (for analysis of the attention decode steps pay)."""

from __future__ import annotations

import torch


class QueryCapture:
    """Post-RoPE queries of every compressible layer on every forward call (see
    :func:`clusterattn.integration.capturing_queries`).

    ``calls[rank]`` lists ``(batch, q_heads, q_len, head_dim)`` tensors in call order (the prefill
    first, then one per decode step) for the ``rank``-th compressible layer ``layers[rank]``;
    ``scaling[rank]`` is that layer's attention scale.
    """

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.rank = {layer: i for i, layer in enumerate(layers)}
        self.calls: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
        self.scaling: dict[int, float] = {}

    def on_attention(self, module, query, key, value, scaling) -> None:
        rank = self.rank.get(module.layer_idx)
        if rank is not None:
            self.calls[rank].append(query.detach().clone())
            self.scaling[rank] = float(scaling)
