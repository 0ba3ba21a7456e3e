"""Random selection: a floor for every other press."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterattn.presses.base import WindowPress, check_int


@dataclass
class RandomPress(WindowPress):
    """Keep the window and a uniformly random set of prefix tokens (a hash of position, head, layer and seed).

    Args:
        seed: the draws differ per seed, layer and KV head.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        batch, kv_heads, seq = key.shape[:3]
        prefix = seq - self.window_size
        # A counter-based hash of (distance to the window, head, layer, seed): the same draws for a
        # token whatever the batch or its left padding, so rows stay independent.
        distance = torch.arange(prefix - 1, -1, -1, device=key.device, dtype=torch.int64)
        head = torch.arange(kv_heads, device=key.device, dtype=torch.int64)[:, None]
        x = distance * 2654435761 + head * 40503 + (self.seed * 1000003 + layer * 7919)
        for _ in range(2):
            x = ((x >> 16) ^ x) * 0x45D9F3B % (1 << 32)
        scores = (x.float() / float(1 << 32)).expand(batch, -1, -1)
        if pad_mask is not None:
            scores = scores.masked_fill(~pad_mask[:, None, : seq - self.window_size], float("-inf"))
        return scores
