"""Decode many caches of one prompt as one batch: stacking, padding and the batch key.

An evaluation grid answers one prompt under many presses and budgets. Decoding a small model on
CPU reads every weight once per step whatever the batch size, so rows decode far cheaper together:
caches of equal per-layer lengths stack as they are (:func:`stack_caches`); caches with one length
across their layers but different widths are left-padded and masked (:func:`stack_padded`).
:func:`batch_key` says which caches can share a batch, for our presses and kvpress's alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from clusterattn.integration import _CacheState

PADDED = ("padded",)
"""The :func:`batch_key` of caches that share one left-padded batch."""

_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def batch_key(cache: Cache, *, plain: bool = False) -> tuple:
    """Which decode batch ``cache`` can join: :data:`PADDED`, or its exact per-layer lengths.

    A cache with one length across its layers joins the padded batch when the padding can be
    masked: compressed by one of our presses on every layer (the press masks the slots itself), or,
    with ``plain=True``, a cache without compression state whose decode passes the mask as
    ``attention_mask`` (kvpress's pipeline). Anything else (PyramidKV's per-layer budgets, models
    with uncompressed sliding-window layers) batches only with caches of the very same shape.
    """
    lengths = tuple(layer.keys.shape[2] for layer in cache.layers)
    state = getattr(cache, "_clusterattn", None)
    if len(set(lengths)) == 1:
        if state is not None and len(state.lengths) == len(lengths):
            return PADDED
        if plain and state is None:
            return PADDED
    return ("exact", state is not None, *lengths)


def _states(caches: list[Cache]) -> list[_CacheState | None]:
    states = [getattr(cache, "_clusterattn", None) for cache in caches]
    if len({state is None for state in states}) != 1:
        raise ValueError("cannot stack compressed and uncompressed caches")
    return states


def _real_slots(caches, states, widths: list[int], width: int) -> torch.Tensor | None:
    """``(rows, width)``: True on each row's real kept slots, False on its left padding and on
    padding it kept from a padded prompt; None when every slot is real."""
    rows = []
    for cache, state, w in zip(caches, states, widths, strict=True):
        kept = None if state is None else state.kept_real
        if kept is None:
            kept = torch.ones(cache.layers[0].keys.shape[0], w, dtype=torch.bool)
        rows.append(F.pad(kept.to(cache.layers[0].keys.device), (width - w, 0), value=False))
    real = torch.cat(rows)
    return None if bool(real.all()) else real


def _concat(caches, states, pads: list[int], lengths: dict | None, kept_real) -> Cache:
    """The caches' rows in order, each left-padded by its ``pads`` entry on every layer."""
    merged = copy.copy(caches[0])
    merged.layers = []
    for i, layer in enumerate(caches[0].layers):
        layer = copy.copy(layer)
        rows = list(zip(caches, pads, strict=True))
        layer.keys = torch.cat([F.pad(c.layers[i].keys, (0, 0, p, 0)) for c, p in rows])
        layer.values = torch.cat([F.pad(c.layers[i].values, (0, 0, p, 0)) for c, p in rows])
        merged.layers.append(layer)
    if states[0] is not None:
        merged._clusterattn = _CacheState(
            next_pos=torch.cat([state.next_pos for state in states]), lengths=lengths, kept_real=kept_real
        )
    return merged


def stack_caches(caches: list[Cache]) -> Cache:
    """One cache whose batch rows are the rows of ``caches``, in order.

    Every cache must hold the same per-layer lengths (e.g. several PyramidKV presses replayed on one
    prefill), so their rows decode together in one batch; compression state (original next
    positions, kept padding slots) is stacked alongside.
    """
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    shapes = {tuple(layer.keys.shape[2] for layer in cache.layers) for cache in caches}
    if len(shapes) != 1:
        raise ValueError(f"caches of different per-layer lengths cannot share a batch: {sorted(shapes)}")
    states = _states(caches)
    if states[0] is None:
        return _concat(caches, states, [0] * len(caches), None, None)
    widths = [next(iter(state.lengths.values())) for state in states]
    kept_real = _real_slots(caches, states, widths, widths[0])
    return _concat(caches, states, [0] * len(caches), dict(states[0].lengths), kept_real)


def _width(cache: Cache) -> int:
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    if len(lengths) != 1:
        raise ValueError(f"padded stacking needs one length across a cache's layers, got {sorted(lengths)}")
    return lengths.pop()


def stack_padded(caches: list[Cache]) -> tuple[Cache, torch.Tensor | None]:
    """One batch from caches of different lengths, each with one length across its layers.

    Shorter caches are left-padded with zero keys and values; the returned ``(batch, width)`` mask
    is False on those slots (and on kept padding slots), or None when nothing is padded. Compressed
    caches (every layer compressed, e.g. uniform-budget presses at several budgets) carry the mask
    as their kept-slot state, so decoding under a press masks the slots by itself; plain caches
    (kvpress's) need the mask passed as ``attention_mask`` with the new tokens' columns appended.
    Softmax gives masked slots exactly zero weight: rows decode as they would alone, up to float
    rounding.
    """
    if not caches:
        raise ValueError("stack_padded needs at least one cache")
    widths = [_width(cache) for cache in caches]
    width = max(widths)
    states = _states(caches)
    if states[0] is not None and any(
        len(s.lengths) != len(c.layers) for s, c in zip(states, caches, strict=True)
    ):
        raise ValueError("padded stacking needs every layer compressed (no sliding-window layers)")
    kept_real = _real_slots(caches, states, widths, width)
    lengths = None if states[0] is None else {layer: width for layer in states[0].lengths}
    return _concat(caches, states, [width - w for w in widths], lengths, kept_real), kept_real


@contextlib.contextmanager
def masked_gqa(active: bool = True) -> Iterator[None]:
    """Let sdpa take grouped KV heads together with an attention mask while decoding a padded batch.

    With a mask, transformers' sdpa path copies every KV head to each of its query heads (the whole
    cache, per layer and step: 2.0 s per step for 25 SmolLM2 rows at 2k against 0.36 s without the
    copy). torch's CPU kernels accept grouped heads with a mask directly, with the same arithmetic,
    so on CPU this swaps transformers' ``use_gqa_in_sdpa`` predicate for one that says yes (the same
    in transformers 5.2 and 5.24; 5.24's ``TRANSFORMERS_SDPA_FORCE_GQA`` does not exist in 5.2). On
    accelerators the copy is the fast path, and a user's own ``TRANSFORMERS_SDPA_FORCE_GQA`` is
    respected: both leave transformers unchanged.
    """
    from transformers.integrations import sdpa_attention

    if not active or torch.cuda.is_available() or os.environ.get(_FORCE_GQA) is not None:
        yield
        return
    original = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original
