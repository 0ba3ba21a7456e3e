"""H2O: heavy hitters by attention accumulated over all prompt queries, plus recent tokens.

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models*, NeurIPS 2023. Scores are computed in query chunks (never the full ``L x L`` matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterattn.presses.base import WindowPress, check_choice
from clusterattn.scoring import AGGREGATIONS, accumulated_scores


@dataclass
class H2OPress(WindowPress):
    """H2O for prompt compression: the last ``window_size`` tokens are the recent part, the rest of
    the budget goes to the prefix tokens with the largest attention accumulated over every prompt
    query.

    Args:
        chunk_size: queries scored at once (memory bound ``chunk_size x L`` per head).
    """

    aggregation: str = "mean"
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("aggregation", self.aggregation, AGGREGATIONS)

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        scores = accumulated_scores(
            query, key, scaling, aggregation=self.aggregation, pad_mask=pad_mask, chunk_size=self.chunk_size
        )
        return scores[..., : key.shape[2] - self.window_size]
