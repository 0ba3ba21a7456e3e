"""ClusterAttn: keep the contiguous attention clusters of each KV head.

Zhang et al., *ClusterAttn: KV Cache Compression under Intrinsic Attention Clustering*, ACL 2025.
Window scores (:func:`clusterattn.scoring.window_scores`) are clustered by DBAC
(:func:`clusterattn.dbac.dbac`); the kept cache is ``[K_prefix[clusters] ; K_window]`` per KV head.
Without the question (a cache compressed once and asked later), the keys' leverage
(:func:`clusterattn.scoring.key_leverage_scores`) can take the window's place as DBAC's input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from clusterattn.dbac import MAX_CLUSTERS, VARIANTS, dbac
from clusterattn.presses.base import WindowPress, check_choice, check_float, check_int
from clusterattn.scoring import AGGREGATIONS, key_leverage_scores, window_scores

SCORERS = ("window", "leverage")


@dataclass
class ClusterAttnPress(WindowPress):
    """ClusterAttn prompt compression (ACL 2025).

    Args:
        budget / compression_ratio: see :class:`~clusterattn.presses.base.BasePress`.
        window_size: observation window ``w`` (default 32), always kept.
        num_block: number of clusters; default ``min(max(1, (budget - w) // span_width),
            max_clusters)``.
        span_width: target cluster width when ``num_block`` is None (default 16 tokens, chosen on
            the needle sweep of the README: 16 > 24 > 32 at budgets 128-256, 8 fails).
        max_clusters: cap on the default number of clusters (default 16; None: no cap). Past it, a
            larger budget widens the spans (30 tokens at B = 512, 62 at B = 1024 with w = 32)
            instead of adding more 16-token ones, which cut long values such as UUIDs.
        span_before: share of each span placed before its peak (0.5 = centred; default 0.0: the
            peak sits just before what matters, e.g. on "is:" before a number's digits).
        alpha: relative density threshold, ``theta = alpha * w / L_pre`` (1.0 = uniform mass).
        theta: absolute threshold; overrides ``alpha`` when given.
        aggregation: how GQA query heads of one KV head combine scores: mean, sum or max
            (default max: a span one query head needs is kept for its whole group).
        n_sink: first real tokens always kept (default 0).
        variant: DBAC variant ``"A"`` (centre expansion) or ``"B"`` (prompt blocks).
        expand: neighbouring blocks per centre block (variant B).
        recent_ratio: share of the prefix budget ``B - w`` given to the most recent prefix tokens
            (those just before the window), kept whatever their scores; DBAC fits its clusters on
            the earlier tokens with the rest. Default 0.0 (pure ClusterAttn). For query-agnostic
            use (the question comes after compression, so the window cannot point at what it
            will need), where recency carries much of the signal: see ``docs/benchmarks.md``.
            1.0 keeps the last ``B`` prompt tokens (StreamingLLM without sinks).
        scorer: what DBAC clusters. ``"window"`` (default, the paper): attention from the last
            ``window_size`` queries. ``"leverage"``: each key's statistical leverage among its
            head's keys (:func:`~clusterattn.scoring.key_leverage_scores`; Chari & Van Durme,
            *Compactor*, 2025), which reads no query: for query-agnostic use, where the window holds
            the end of the context rather than the question, it keeps the spans around keys that
            stand out from the rest (a needle's names and numbers in a haystack of prose). The
            scores are rescaled to the window's total mass (``window_size``), so ``alpha`` keeps
            its meaning: 1.0 puts the threshold near the mean score. ``aggregation`` plays no part.
        unrotate_keys: with ``scorer="leverage"``, score the keys as they were before RoPE
            (:func:`clusterattn.rope.unrotate`, with the model's own inverse frequencies, which the
            transformers integration and the vLLM plugin pass), as Compactor does: a rotated key's
            direction depends on its position, which blurs what the leverage measures. Default
            False. Not under a :class:`~clusterattn.presses.decoding.DecodingPress`.
    """

    num_block: int | None = None
    span_width: int = 16
    max_clusters: int | None = MAX_CLUSTERS
    span_before: float = 0.0
    alpha: float = 1.0
    theta: float | None = None
    aggregation: str = "max"
    n_sink: int = 0
    variant: str = "A"
    expand: int = 1
    recent_ratio: float = 0.0
    scorer: str = "window"
    unrotate_keys: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_block is not None:
            check_int("num_block", self.num_block, 1)
        check_int("span_width", self.span_width, 1)
        if self.max_clusters is not None:
            check_int("max_clusters", self.max_clusters, 1)
        check_int("n_sink", self.n_sink, 0)
        check_int("expand", self.expand, 0)
        check_float("span_before", self.span_before, 0.0)
        if self.span_before >= 1.0:
            raise ValueError(f"span_before must be in [0, 1), got {self.span_before}")
        check_float("alpha", self.alpha, 0.0)
        if self.theta is not None:
            check_float("theta", self.theta, 0.0)
        if self.budget is not None and self.n_sink > self.budget - self.window_size:
            raise ValueError(
                f"n_sink ({self.n_sink}) must be <= the prefix budget budget - window_size "
                f"({self.budget - self.window_size})"
            )
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("scorer", self.scorer, SCORERS)
        if not isinstance(self.unrotate_keys, bool):
            raise TypeError(f"unrotate_keys must be a bool, got {self.unrotate_keys!r}")
        if self.unrotate_keys and self.scorer != "leverage":
            raise ValueError(
                "unrotate_keys=True needs scorer='leverage' (the window scorer reads rotated queries "
                "against the keys, which must then stay rotated)"
            )
        ratio = self.recent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"recent_ratio must be a float, got {type(ratio).__name__}")
        if not 0.0 <= ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"recent_ratio must be in [0, 1], got {ratio}")

    @property
    def reads_unrotated_keys(self) -> bool:
        return self.unrotate_keys

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask):
        if self.scorer == "leverage":
            scores = key_leverage_scores(key, pad_mask=pad_mask)
            total = scores.nan_to_num(neginf=0.0).sum(dim=-1, keepdim=True).clamp_min_(1e-30)
            scores = scores * (self.window_size / total)
            return scores[..., : key.shape[2] - self.window_size]
        return window_scores(
            query, key, scaling, self.window_size, aggregation=self.aggregation, pad_mask=pad_mask
        )

    def recent_tokens(self, budget: int) -> int:
        """Most recent prefix tokens kept outright out of a prefix budget of ``budget``:
        ``round(recent_ratio * budget)``, leaving room for the ``n_sink`` sinks."""
        return min(round(self.recent_ratio * budget), budget - self.n_sink)

    def select_prefix(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """``(batch, kv_heads, budget)`` sorted prefix indices from ``scores``
        ``(batch, kv_heads, n)``: DBAC's clusters on ``scores[..., : n - r]`` with ``budget - r``
        tokens, then the ``r = recent_tokens(budget)`` last positions. Left padding sits at the start
        of a row, so the last positions are real whenever the row has ``r`` real prefix tokens (and
        when it has fewer, every real token is kept anyway)."""
        if self.n_sink > budget:
            raise ValueError(f"n_sink ({self.n_sink}) exceeds the prefix budget ({budget}) of this prompt")
        recent = self.recent_tokens(budget)
        if recent == 0:
            return self._clusters(scores, budget)
        n = scores.shape[-1]
        tail = torch.arange(n - recent, n, device=scores.device).expand(*scores.shape[:-1], -1)
        if recent == budget:
            return tail
        return torch.cat([self._clusters(scores[..., : n - recent], budget - recent), tail], dim=-1)

    def _clusters(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        # theta relative to the uniform mass over each row's real (finite-scored) prefix tokens
        relative = self.alpha * self.window_size if self.theta is None else None
        return dbac(
            scores,
            budget,
            num_block=self.num_block,
            theta=self.theta,
            relative_theta=relative,
            span_width=self.span_width,
            max_clusters=self.max_clusters,
            span_before=self.span_before,
            n_sink=self.n_sink,
            variant=self.variant,
            expand=self.expand,
        )

    @classmethod
    def from_profile(cls, path: str | Path, **overrides) -> ClusterAttnPress:
        """Build a press from a JSON profile (a dict of this class's fields), with overrides.

        The file holds ``{"config": {...}}`` or the fields themselves. A profile written by
        ``clusterattn profile`` also has ``"budgets": {"128": {"config": {...}}, ...}`` (``num_block``
        is tuned per budget): ``from_profile(path, budget=B)`` takes budget ``B``'s entry. A budget
        without an entry keeps the nearest profiled budget's cluster width instead
        (``span_width = (B' - window_size) // num_block``, ``num_block`` by the default rule, with no
        ``max_clusters`` cap, so that the width stays the profiled one).
        """
        data = json.loads(Path(path).read_text())
        config = dict(data.get("config", data))
        entries = data.get("budgets") or {}
        target = overrides.get("budget")
        if entries and target is not None:
            entry = entries.get(str(target))
            if entry is None:
                ref = min(entries, key=lambda k: (abs(int(k) - target), int(k)))
                config = dict(entries[ref].get("config", entries[ref]))
                num_block = config.pop("num_block", None)
                if num_block:
                    window = config.get("window_size", cls.window_size)
                    config["span_width"] = max(1, (int(ref) - window) // num_block)
                    config["max_clusters"] = None
            else:
                config = dict(entry.get("config", entry))
        if "compression_ratio" in overrides:
            config.pop("budget", None)
        elif "budget" in overrides:
            config.pop("compression_ratio", None)
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"profile {path} has unknown ClusterAttnPress fields: {sorted(unknown)}")
        config.update(overrides)
        if "budget" not in config and "compression_ratio" not in config:
            raise ValueError("from_profile needs budget or compression_ratio (in the file or as an override)")
        return cls(**config)

    def to_dict(self) -> dict:
        return asdict(self)
