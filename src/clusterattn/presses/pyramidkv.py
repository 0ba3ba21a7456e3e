"""PyramidKV: SnapKV selection with budgets decreasing linearly over depth.

Cai et al., *PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling*, 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterattn.presses.base import check_int
from clusterattn.presses.snapkv import SnapKVPress


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores, with the prefix budget of layer ``l`` falling linearly from
    ``2 b - b / beta`` (first layer) to ``b / beta`` (last), so the mean over layers is ``b``.

    Layers keep different numbers of tokens (every KV head of one layer keeps the same count).

    Args:
        beta: ratio between the mean and the smallest prefix budget (default 20, as in the paper).
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("beta", self.beta, 1)

    @property
    def uniform_layers(self) -> bool:
        return False

    def layer_budget(self, seq_len: int, layer: int, n_layers: int) -> int:
        prefix = self.total_budget(seq_len) - self.window_size
        low = prefix // self.beta
        high = 2 * prefix - low
        if n_layers == 1:
            return prefix + self.window_size
        step = (high - low) / (n_layers - 1)
        return max(1, round(high - layer * step)) + self.window_size
