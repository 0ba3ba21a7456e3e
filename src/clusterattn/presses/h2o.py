"""H2O: heavy hitters by attention accumulated over all prompt queries, plus recent tokens.

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models*, NeurIPS 2023. Scores are computed in query chunks (never the full ``L x L`` matrix).
"""

from __future__ import annotations

import weakref
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
    chunk_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("aggregation", self.aggregation, AGGREGATIONS)

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        # The scores cost as much as the prefill's attention and do not depend on the budget; when
        # the same recorded tensors are scored again (``generate_many`` over several budgets), the
        # last result per layer is reused. Identity is checked through weak references, so a new
        # tensor at a recycled address can never match.
        memo = _MEMO.get(layer)
        if (
            memo is not None
            and memo[0]() is query
            and memo[1]() is key
            and memo[2] == self._score_key(pad_mask)
        ):
            scores = memo[3]
        else:
            scores = accumulated_scores(
                query,
                key,
                scaling,
                aggregation=self.aggregation,
                pad_mask=pad_mask,
                chunk_size=self.chunk_size,
            )
            _MEMO[layer] = (weakref.ref(query), weakref.ref(key), self._score_key(pad_mask), scores)
        return scores[..., : key.shape[2] - self.window_size]

    def _score_key(self, pad_mask):
        return (self.aggregation, None if pad_mask is None else id(pad_mask))


_MEMO: dict[int, tuple] = {}
