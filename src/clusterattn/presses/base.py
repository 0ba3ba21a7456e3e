"""Budget semantics shared by every press, and the ``with press(model):`` context manager.

A *press* decides, for one layer at the end of prefill, which prompt tokens each KV head keeps. It
sees the layer's post-RoPE queries ``(batch, q_heads, seq, head_dim)`` and cached keys
``(batch, kv_heads, seq, head_dim)`` and returns kept indices ``(batch, kv_heads, kept)``, unique
and ascending, the same count for every head (so one length per request still describes the cache,
as a paged serving cache needs). Presses never import transformers: the hooks live in
:mod:`clusterattn.integration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clusterattn.dbac import topk_indices
from clusterattn.rope import unrotate


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value: object, minimum: float | None = None, maximum: float | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a finite real number in
    ``[minimum, maximum]`` (NaN and infinities are refused: what they select is undefined)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class BasePress:
    """Common contract: keep ``budget`` tokens per KV head, or a share ``1 - compression_ratio``.

    Args:
        budget: prompt tokens kept per KV head and layer, window included. Prompts of at most
            ``budget`` tokens are left untouched.
        compression_ratio: alternatively, the share of the prompt to drop, in ``[0, 1)``. The
            effective budget is ``max(min_budget, round(L * (1 - ratio)))``: the window is always
            kept, so very high ratios on short prompts keep a little more than asked (recorded in
            the stats).
    """

    budget: int | None = None
    compression_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.compression_ratio is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of budget or compression_ratio")
        if self.budget is not None:
            check_int("budget", self.budget, 1)
            if self.budget < self.min_budget:
                raise ValueError(
                    f"budget ({self.budget}) must be >= {self.min_budget} for {type(self).__name__} "
                    f"({self.budget_floor_reason})"
                )
        else:
            ratio = self.compression_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise TypeError(f"compression_ratio must be a float, got {type(ratio).__name__}")
            if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
                raise ValueError(f"compression_ratio must be in [0, 1), got {ratio}")

    # -- budget semantics ---------------------------------------------------------------------
    @property
    def min_budget(self) -> int:
        """Smallest meaningful budget for this press."""
        return 1

    @property
    def budget_floor_reason(self) -> str:
        return "at least one token"

    def total_budget(self, seq_len: int) -> int:
        """Tokens kept per KV head (window included) for a prompt of ``seq_len`` tokens."""
        if self.budget is not None:
            return self.budget
        return max(self.min_budget, round(seq_len * (1.0 - self.compression_ratio)))

    def layer_budget(self, seq_len: int, layer: int, n_layers: int) -> int:
        """Budget of compressible layer ``layer`` of ``n_layers``; uniform unless overridden."""
        return self.total_budget(seq_len)

    @property
    def uniform_layers(self) -> bool:
        """True when every layer keeps the same number of tokens."""
        return True

    @property
    def reads_unrotated_keys(self) -> bool:
        """True when :meth:`select_indices` scores the keys before RoPE (and reads no query, which
        stays rotated); :meth:`select` then needs ``inv_freq``. Default False."""
        return False

    @property
    def queries_read(self) -> int | None:
        """How many of the prompt's last queries :meth:`select` reads (None: all of them). A
        chunked prefill (:mod:`clusterattn.chunked`) keeps only these from the earlier chunks."""
        return None

    # -- selection ----------------------------------------------------------------------------
    def select(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        *,
        layer: int,
        n_layers: int,
        pad_mask: torch.Tensor | None = None,
        inv_freq: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Kept token indices for one layer, or None to leave the layer untouched.

        Args:
            query: ``(batch, q_heads, seq, head_dim)`` post-RoPE prompt queries.
            key: ``(batch, kv_heads, seq, head_dim)`` post-RoPE prompt keys, at positions
                ``0 .. seq - 1`` (up to one shift per row).
            scaling: the model's attention scale.
            layer: index among the compressible layers; n_layers: their count.
            pad_mask: ``(batch, seq)`` True on real tokens, left padding only.
            inv_freq: ``(rotated_dims / 2,)`` the layer's RoPE inverse frequencies. Needed only by a
                press that :attr:`reads_unrotated_keys`: its :meth:`select_indices` then gets the keys
                turned back to before RoPE (:func:`clusterattn.rope.unrotate`).

        Returns:
            ``(batch, kv_heads, budget)`` int64, unique and ascending per head, or None.
        """
        seq = key.shape[2]
        budget = self.layer_budget(seq, layer, n_layers)
        if seq <= self.total_budget(seq) or seq <= budget:
            return None
        if self.reads_unrotated_keys:
            if inv_freq is None:
                raise ValueError(
                    f"{type(self).__name__} scores keys before RoPE and needs the layer's inverse "
                    "frequencies (select(..., inv_freq=...)); the transformers integration and the "
                    "vLLM plugin pass them"
                )
            key = unrotate(key, inv_freq)
        return self.select_indices(query, key, scaling, budget, layer=layer, pad_mask=pad_mask)

    def select_indices(self, query, key, scaling, budget, *, layer, pad_mask):  # pragma: no cover
        raise NotImplementedError

    def warm_up(self) -> None:
        """Load whatever the press compiles, before the first compression (a session calls it
        when it starts, outside the timed compression). Default: nothing."""

    def __call__(self, model):
        """Context manager: compress the prompt cache inside ``model(...)`` / ``model.generate``.

        Yields a :class:`clusterattn.integration.PressSession` whose ``stats`` describe the last
        compression.
        """
        from clusterattn.integration import apply_press  # the one module that knows transformers

        return apply_press(model, self)


@dataclass
class WindowPress(BasePress):
    """A press that always keeps the last ``window_size`` prompt tokens (the observation window)
    and chooses ``budget - window_size`` tokens of the prefix from per-token scores."""

    window_size: int = 32

    def __post_init__(self) -> None:
        check_int("window_size", self.window_size, 1)
        super().__post_init__()

    @property
    def min_budget(self) -> int:
        return self.window_size + 1

    @property
    def budget_floor_reason(self) -> str:
        return f"the budget includes the window of {self.window_size} tokens and must exceed it"

    @property
    def queries_read(self) -> int | None:
        return self.window_size  # the observation window's queries

    def prefix_scores(self, query, key, scaling, *, layer, pad_mask) -> torch.Tensor:
        """``(batch, kv_heads, seq - window_size)`` scores of the prefix tokens."""
        raise NotImplementedError  # pragma: no cover

    def select_prefix(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Choose ``budget`` prefix indices per row of ``scores``; default: plain top-k."""
        return topk_indices(scores, budget)

    def select_indices(self, query, key, scaling, budget, *, layer, pad_mask):
        seq = key.shape[2]
        scores = self.prefix_scores(query, key, scaling, layer=layer, pad_mask=pad_mask)
        keep = self.select_prefix(scores, budget - self.window_size)
        window = torch.arange(seq - self.window_size, seq, device=key.device)
        return torch.cat([keep, window.expand(*keep.shape[:-1], -1)], dim=-1)
