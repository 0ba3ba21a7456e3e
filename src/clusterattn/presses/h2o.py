"""H2O: heavy hitters by attention accumulated over all prompt queries, plus recent tokens.

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models*, NeurIPS 2023. Scores are computed in query chunks (never the full ``L x L`` matrix).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from clusterattn.presses.base import WindowPress, check_choice, check_int
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
        check_int("chunk_size", self.chunk_size, 1)

    @property
    def queries_read(self) -> None:
        return None  # attention accumulated over every prompt query

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        # The scores cost as much as the prefill's attention and do not depend on the budget; when
        # the same recorded tensors are scored again (``generate_many`` over several budgets), the
        # result is reused. It is kept on the query tensor itself (it dies with it), keyed by the
        # key tensor's identity and the scoring settings: no state on the press or the module.
        settings = (self.aggregation, self.chunk_size, None if pad_mask is None else id(pad_mask))
        memo = getattr(query, "_clusterattn_h2o", None)
        if memo is not None and memo[0]() is key and memo[1] == settings:
            scores = memo[2]
        else:
            scores = accumulated_scores(
                query,
                key,
                scaling,
                aggregation=self.aggregation,
                pad_mask=pad_mask,
                chunk_size=self.chunk_size,
            )
            query._clusterattn_h2o = (weakref.ref(key), settings, scores)
        return scores[..., : key.shape[2] - self.window_size]
