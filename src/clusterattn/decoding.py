"""The cache side of decode-phase compression (:class:`~clusterattn.presses.decoding.DecodingPress`).

After the prefill, a :class:`~clusterattn.cache.CompressedLayer` armed with a ``DecodingPress``
carries a :class:`DecodeState`: the rule (the wrapped press at the decode budget) and the queries
of the last appended tokens. Every later attention call on the layer (a decode step, or an
appended chunk such as a second turn) goes through :func:`observe` right after the attention: the
call's queries join the window, and once the layer holds ``budget + interval`` tokens the press
re-selects ``budget`` of them per KV head (:func:`reselect`), exactly as it selects from a prompt:
the layer's whole cache is its "prompt" and the last observed tokens its window. The logical length
does not change (``dropped`` grows by what is evicted), so positions and masks stay right; kept
padding of a left-padded batch stays described by the layer's slot mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from clusterattn.cache import CompressedLayer, _kept_real, gather_kv
from clusterattn.presses.decoding import DecodingPress
from clusterattn.timing import timer

__all__ = ["DecodeState", "observe", "reselect", "start"]


@dataclass
class DecodeState:
    """A decoding layer's re-selection rule and window.

    ``press``: the rule at the budget it selects (the decode budget, less the protected prompt);
    ``budget`` / ``interval``: see :class:`DecodingPress`; ``fixed``: leading slots never evicted
    (the prompt's, with ``protect_prompt``); ``queries``: ``(batch, q_heads, <= observed, head_dim)``
    post-RoPE queries of the last appended tokens, oldest first.
    """

    press: object
    budget: int
    interval: int
    fixed: int
    observed: int
    queries: torch.Tensor


def start(layer: CompressedLayer, wrapper: DecodingPress, query: torch.Tensor) -> None:
    """Give ``layer`` its decode state at the end of its prefill; ``query`` ``(batch, q_heads, seq,
    head_dim)`` is the prefill's, whose last tokens seed the window (copied: the prefill's queries
    are not kept alive)."""
    fixed = layer.physical_length if wrapper.protect_prompt else 0
    press = wrapper.decode_press
    if fixed:
        room = wrapper.budget - fixed
        if room < press.min_budget:
            raise ValueError(
                f"protect_prompt: the prompt keeps {fixed} tokens, so a budget of {wrapper.budget} leaves "
                f"{room} for generated tokens; {type(press).__name__} needs at least {press.min_budget}"
            )
        press = dataclasses.replace(press, budget=room)
    observed = wrapper.observed_queries
    layer.decoder = DecodeState(
        press, wrapper.budget, wrapper.interval, fixed, observed, query[:, :, -observed:].clone()
    )


def observe(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
    """After an attention call on a decoding layer: keep the call's queries ``(batch, q_heads,
    q_len, head_dim)`` in the window, and re-select once the layer holds ``budget + interval``."""
    state = layer.decoder
    state.queries = torch.cat([state.queries, query], dim=2)[:, :, -state.observed :]
    if layer.physical_length >= state.budget + state.interval:
        reselect(layer, scaling)


def reselect(layer: CompressedLayer, scaling: float) -> None:
    """Re-select ``budget`` tokens per KV head of ``layer`` with its decode state's press."""
    state, plan = layer.decoder, layer.armed
    keys, values = layer.keys, layer.values
    start_time = timer(keys)
    batch, _, physical, _ = keys.shape
    fixed = state.fixed
    pad_mask = None
    if layer.slot_mask is not None and not fixed:  # kept padding, then real appended tokens
        tail = torch.ones(batch, physical - layer.slot_mask.shape[1], dtype=torch.bool, device=keys.device)
        pad_mask = torch.cat([layer.slot_mask.to(keys.device), tail], dim=1)
    with torch.no_grad():
        idx = state.press.select(
            state.queries,
            keys[:, :, fixed:],
            scaling,
            layer=plan.rank(layer.layer_idx),
            n_layers=len(plan.layers),
            pad_mask=pad_mask,
        )
    if idx is None:  # the press keeps everything (its budget covers the cache)
        return
    if fixed:
        head = torch.arange(fixed, device=idx.device).expand(*idx.shape[:2], -1)
        idx = torch.cat([head, idx + fixed], dim=-1)
    dropped = physical - idx.shape[-1]
    if pad_mask is not None:
        layer.slot_mask = _kept_real(pad_mask, idx, dropped, state.press)
    layer.keys, layer.values = gather_kv(keys, values, idx)
    layer.dropped += dropped
    layer.prompt_slots = idx.shape[-1]  # nothing kept so far can be cropped away
    plan.stats.decode_compressions += 1
    plan.stats.decode_seconds += timer(layer.keys) - start_time
