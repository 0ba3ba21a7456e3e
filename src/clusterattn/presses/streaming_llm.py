"""StreamingLLM: attention sinks plus the most recent tokens.

Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterattn.dbac import rank_and_select, sink_mask
from clusterattn.presses.base import BasePress, check_int


@dataclass
class StreamingLLMPress(BasePress):
    """Keep the first ``n_sink`` real tokens and the ``budget - n_sink`` most recent ones.

    Args:
        n_sink: number of attention-sink tokens (default 4).
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        check_int("n_sink", self.n_sink, 0)
        super().__post_init__()

    @property
    def min_budget(self) -> int:
        return self.n_sink + 1

    @property
    def budget_floor_reason(self) -> str:
        return f"the budget includes the {self.n_sink} sink tokens and must exceed them"

    @property
    def queries_read(self) -> int:
        return 0  # positions only

    def select_indices(self, query, key, scaling, budget, *, layer, pad_mask):
        batch, kv_heads, seq = key.shape[:3]
        recency = torch.arange(seq, device=key.device, dtype=torch.float32).expand(batch, kv_heads, seq)
        if pad_mask is not None:
            recency = recency.masked_fill(~pad_mask[:, None, :], float("-inf"))
        return rank_and_select(recency, budget, sink_mask(recency, self.n_sink))
