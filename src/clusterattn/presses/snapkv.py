"""SnapKV: top-k of pooled observation-window scores, per KV head.

Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, NeurIPS 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clusterattn.presses.base import WindowPress, check_choice, check_int
from clusterattn.scoring import AGGREGATIONS, window_scores

POOLINGS = ("max", "avg")


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling of ``(batch, kv_heads, n)`` scores along ``n`` (same length); pads stay ``-inf``."""
    if kernel_size <= 1:
        return scores
    finite = torch.isfinite(scores)
    flat = torch.where(finite, scores, 0.0).flatten(0, -2).unsqueeze(1)
    pad = kernel_size // 2
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:  # the mean over the real tokens in the kernel (left padding counts as outside the row)
        count = F.avg_pool1d(finite.flatten(0, -2).unsqueeze(1).to(flat.dtype), kernel_size, 1, pad)
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad) / count.clamp_min(1e-12)
    pooled = pooled[..., : scores.shape[-1]].view(scores.shape)
    return pooled.masked_fill(~finite, float("-inf"))


@dataclass
class SnapKVPress(WindowPress):
    """SnapKV (NeurIPS 2024): window scores, pooled with ``kernel_size``, top-k per KV head.

    Args:
        kernel_size: pooling kernel (odd, default 7); 1 disables pooling.
        pooling: ``"max"`` or ``"avg"``.
        aggregation: GQA aggregation of the scores (mean, sum, max).
    """

    kernel_size: int = 7
    pooling: str = "max"
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        scores = window_scores(
            query, key, scaling, self.window_size, aggregation=self.aggregation, pad_mask=pad_mask
        )
        return pool_scores(scores, self.kernel_size, self.pooling)
