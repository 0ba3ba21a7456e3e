"""Decode-phase compression: any press, applied again while the model generates.

Only the prompt is compressed by a press alone: every generated token is kept, so the cache grows
with the output (the limit the ClusterAttn paper names: "no dynamic update when outputs are very
long"; a reasoning model writes thousands of tokens). :class:`DecodingPress` wraps a press and
re-selects each layer's cache with that press's own rule whenever it holds ``budget + interval``
tokens, down to ``budget`` tokens per KV head, with the last generated tokens' queries as the
observation window: ClusterAttn fits its spans over prompt and generated tokens alike, SnapKV takes
its top-k, StreamingLLM keeps sinks and recent tokens, H2O accumulates the attention of the
observed queries. Kept keys keep their RoPE, so positions stay true; each row and KV head selects
its own tokens.

The prompt is compressed at prefill by the wrapped press as usual (its own budget), or kept whole
with ``compress_prompt=False``; ``protect_prompt=True`` never evicts what the prefill kept and
re-selects among generated tokens only. The cache side is :mod:`clusterattn.decoding`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clusterattn.presses.base import BasePress, check_int

OBSERVED_QUERIES = 32
"""Queries a layer keeps for re-selection when the wrapped press has no ``window_size`` (H2O's
accumulated attention then sums over the last 32 queries)."""


@dataclass
class DecodingPress:
    """Compress the prompt with ``press``, then keep each layer's cache at ``budget`` tokens per KV
    head while decoding (re-selecting every ``interval`` tokens).

    Args:
        press: the press whose rule selects, at prefill (with its own budget) and during decoding
            (with ``budget``); any press of :data:`clusterattn.PRESSES` that keeps one budget in
            every layer (not ``full``, not PyramidKV).
        budget: tokens per KV head left after each re-selection (window included).
        interval: tokens appended before the next re-selection: a layer holds at most
            ``budget + interval`` tokens. Larger intervals cost fewer re-selections.
        compress_prompt: False keeps the whole prompt at prefill (only decoding compresses).
        protect_prompt: True keeps every token the prefill kept and re-selects among generated
            tokens only (``budget`` then counts both; it must exceed the prompt's kept tokens).

    Use it like any press: ``with DecodingPress(ClusterAttnPress(budget=1024), budget=1024)(model):``
    ``model.generate(...)``, ``CompressedCache(model, press)``, or ``generate(..., press=...)``.
    Dynamic caches only (a static cache's shapes cannot shrink); the stats count the re-selections
    (``decode_compressions``) and their time (``decode_seconds``).
    """

    press: BasePress
    budget: int
    interval: int = 128
    compress_prompt: bool = True
    protect_prompt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.press, DecodingPress):
            raise TypeError("DecodingPress cannot wrap another DecodingPress")
        if not isinstance(self.press, BasePress):
            raise TypeError(
                f"DecodingPress wraps a press with a selection rule (e.g. ClusterAttnPress(budget=1024)), "
                f"got {self.press!r}"
            )
        check_int("budget", self.budget, 1)
        check_int("interval", self.interval, 1)
        for name in ("compress_prompt", "protect_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.press.reads_unrotated_keys:
            raise ValueError(
                f"DecodingPress cannot re-select with a press that scores keys before RoPE "
                f"({type(self.press).__name__} with unrotate_keys=True): after the first selection the "
                "cache's slots no longer sit at consecutive positions, so its keys cannot be turned back"
            )
        if not self.press.uniform_layers:
            raise ValueError(
                f"DecodingPress needs a press that keeps one budget in every layer; "
                f"{type(self.press).__name__} gives layers different budgets"
            )
        _ = self.decode_press  # the wrapped press's own checks of the decode budget (window, n_sink)

    @property
    def decode_press(self) -> BasePress:
        """The wrapped press with ``budget`` as its budget: the rule each re-selection applies."""
        return dataclasses.replace(self.press, budget=self.budget, compression_ratio=None)

    @property
    def observed_queries(self) -> int:
        """Queries of the last appended tokens each layer keeps for its next re-selection."""
        return getattr(self.press, "window_size", OBSERVED_QUERIES)

    @property
    def queries_read(self) -> int | None:
        """The prefill's last queries the prompt's selection and the first decode window read."""
        inner = getattr(self.press, "queries_read", None)
        return None if inner is None else max(inner, self.observed_queries)

    @property
    def uniform_layers(self) -> bool:
        return True

    @property
    def reads_unrotated_keys(self) -> bool:
        return False  # refused in __post_init__

    def select(self, query, key, scaling, *, layer, n_layers, pad_mask=None, inv_freq=None):
        """The prefill's selection: the wrapped press's, or None with ``compress_prompt=False``."""
        if not self.compress_prompt:
            return None
        return self.press.select(query, key, scaling, layer=layer, n_layers=n_layers, pad_mask=pad_mask)

    def warm_up(self) -> None:
        self.press.warm_up()

    def __call__(self, model):
        """Context manager: this press on the calling thread's calls of ``model`` (see
        :meth:`clusterattn.presses.base.BasePress.__call__`)."""
        from clusterattn.integration import apply_press

        return apply_press(model, self)
