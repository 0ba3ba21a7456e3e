"""Decode many caches of one prompt as one batch: stacking, padding and the batch key.

An evaluation grid answers one prompt under many presses and budgets. Decoding a small model on
CPU reads every weight once per step whatever the batch size, so rows decode far cheaper together:
caches of equal per-layer lengths stack as they are (:func:`stack_caches`); caches of different
widths are left-padded and masked (:func:`stack_padded`), as one mask for caches with one length
across their layers, or one mask per compressed layer for compressed caches whose layers differ
(PyramidKV; every press on Gemma3, whose sliding-window layers stay whole and are never padded).
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
PADDED_LAYERS = ("padded", "per layer")
"""The :func:`batch_key` of compressed caches whose layers kept different lengths (PyramidKV): one
batch padded layer by layer, masked per layer by the press."""

_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def batch_key(cache: Cache, *, plain: bool = False) -> tuple:
    """Which decode batch ``cache`` can join: :data:`PADDED`, :data:`PADDED_LAYERS`, a padded key of
    its own (below), or its exact per-layer lengths.

    A cache compressed by one of our presses on every layer joins a padded batch (the press masks
    the padding itself): :data:`PADDED` with one length across its layers, :data:`PADDED_LAYERS`
    with per-layer lengths (PyramidKV). A cache compressed on some layers only (the full-attention
    layers of a model with sliding-window layers, Gemma3) is padded per compressed layer too, and
    joins the caches whose other layers hold the same lengths (those layers are never padded): its
    key is :data:`PADDED_LAYERS` followed by those lengths. With ``plain=True``, a cache without
    compression state and one length across its layers joins :data:`PADDED` too (its decode passes
    the mask as ``attention_mask``, as kvpress's pipeline does). Any other plain cache batches only
    with caches of the very same shape. :func:`is_padded` tells the padded keys apart.
    """
    lengths = tuple(layer.keys.shape[2] for layer in cache.layers)
    state = getattr(cache, "_clusterattn", None)
    if state is not None and state.lengths:
        if len(state.lengths) == len(lengths):
            return PADDED if len(set(lengths)) == 1 else PADDED_LAYERS
        return (*PADDED_LAYERS, *(n for i, n in enumerate(lengths) if i not in state.lengths))
    if plain and state is None and len(set(lengths)) == 1:
        return PADDED
    return ("exact", state is not None, *lengths)


def is_padded(key: tuple) -> bool:
    """True for the :func:`batch_key` of caches that decode as one padded batch (:func:`stack_padded`)."""
    return key[: len(PADDED)] == PADDED


def _states(caches: list[Cache]) -> list[_CacheState | None]:
    states = [getattr(cache, "_clusterattn", None) for cache in caches]
    if len({state is None for state in states}) != 1:
        raise ValueError("cannot stack compressed and uncompressed caches")
    return states


def _real_slots(caches, states, widths: list[int], width: int, everywhere=False) -> torch.Tensor | None:
    """``(rows, width)``: True on each row's real kept slots, False on its left padding and on
    padding it kept from a padded prompt; None when every slot is real (unless ``everywhere``)."""
    rows = []
    for cache, state, w in zip(caches, states, widths, strict=True):
        kept = None if state is None else state.kept_real
        if kept is None:
            kept = torch.ones(cache.layers[0].keys.shape[0], w, dtype=torch.bool)
        rows.append(F.pad(kept.to(cache.layers[0].keys.device), (width - w, 0), value=False))
    real = torch.cat(rows)
    return None if not everywhere and bool(real.all()) else real


def _concat(caches, states, widths: list[int], lengths: dict | None, kept_real, layer_real=None) -> Cache:
    """The caches' rows in order, every layer ``i`` left-padded to ``widths[i]`` slots."""
    merged = copy.copy(caches[0])
    merged.layers = []
    for i, layer in enumerate(caches[0].layers):
        layer = copy.copy(layer)
        pads = [(0, 0, widths[i] - c.layers[i].keys.shape[2], 0) for c in caches]
        layer.keys = torch.cat([F.pad(c.layers[i].keys, p) for c, p in zip(caches, pads, strict=True)])
        layer.values = torch.cat([F.pad(c.layers[i].values, p) for c, p in zip(caches, pads, strict=True)])
        merged.layers.append(layer)
    if states[0] is not None:
        merged._clusterattn = _CacheState(
            next_pos=torch.cat([state.next_pos for state in states]), lengths=lengths, kept_real=kept_real,
            layer_real=layer_real,
        )  # fmt: skip
    return merged


def stack_caches(caches: list[Cache]) -> Cache:
    """One cache whose batch rows are the rows of ``caches``, in order.

    Every cache must hold the same per-layer lengths (e.g. presses on a model whose sliding-window
    layers stay uncompressed, at one budget), so their rows decode together in one batch without
    padding; compression state (original next positions, kept padding slots) is stacked alongside.
    """
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    shapes = {tuple(layer.keys.shape[2] for layer in cache.layers) for cache in caches}
    if len(shapes) != 1:
        raise ValueError(f"caches of different per-layer lengths cannot share a batch: {sorted(shapes)}")
    states = _states(caches)
    layer_widths = [layer.keys.shape[2] for layer in caches[0].layers]
    if states[0] is None:
        return _concat(caches, states, layer_widths, None, None)
    widths = [next(iter(state.lengths.values())) for state in states]
    kept_real = _real_slots(caches, states, widths, widths[0])
    return _concat(caches, states, layer_widths, dict(states[0].lengths), kept_real)


def stack_padded(caches: list[Cache]) -> tuple[Cache, torch.Tensor | None]:
    """One batch from caches of different lengths.

    Shorter caches are left-padded with zero keys and values, layer by layer. Caches with one length
    across their layers, every layer compressed, give one ``(batch, width)`` mask, False on the
    padding slots (and on kept padding slots), or None when nothing is padded: compressed caches
    (e.g. uniform-budget presses at several budgets) carry it as their kept-slot state, so decoding
    under a press masks the slots by itself; plain caches (kvpress's) need it passed as
    ``attention_mask`` with the new tokens' columns appended. Other compressed caches (PyramidKV at
    several budgets; any press on a model whose sliding-window layers stay uncompressed) are padded
    to each compressed layer's widest row and carry one mask per compressed layer, which the press's
    attention applies layer by layer; their uncompressed layers must hold equal lengths and are
    stacked as they are. The returned mask is then None. Softmax gives masked slots exactly zero
    weight: rows decode as they would alone, up to float rounding.
    """
    if not caches:
        raise ValueError("stack_padded needs at least one cache")
    states = _states(caches)
    compressed = None if states[0] is None else set(states[0].lengths)
    if compressed is not None and any(set(state.lengths) != compressed for state in states):
        raise ValueError("caches compressed on different layers cannot share a padded batch")
    lengths = [[layer.keys.shape[2] for layer in cache.layers] for cache in caches]
    every_layer = compressed is None or len(compressed) == len(lengths[0])
    if every_layer and all(len(set(row)) == 1 for row in lengths):
        widths = [row[0] for row in lengths]
        width = max(widths)
        kept_real = _real_slots(caches, states, widths, width)
        layers = None if states[0] is None else {layer: width for layer in states[0].lengths}
        return _concat(caches, states, [width] * len(lengths[0]), layers, kept_real), kept_real
    if states[0] is None:
        raise ValueError(
            "padded stacking of plain caches needs one length across each cache's layers, got "
            f"{sorted({tuple(row) for row in lengths})}"
        )
    columns = list(zip(*lengths, strict=True))
    uneven = [i for i, column in enumerate(columns) if i not in compressed and len(set(column)) > 1]
    if uneven:
        raise ValueError(f"uncompressed layers {uneven} hold different lengths: no shared batch")
    layer_widths = [max(column) for column in columns]
    layer_real = {
        i: _real_slots(caches, states, [row[i] for row in lengths], layer_widths[i], everywhere=True)
        for i in sorted(compressed)
    }
    layers = {i: layer_widths[i] for i in states[0].lengths}
    return _concat(caches, states, layer_widths, layers, None, layer_real), None


def select_rows(cache: Cache, rows: torch.Tensor) -> None:
    """Keep only the batch ``rows`` (a 1-D index tensor, in the order given) of ``cache``, in place:
    every layer's keys and values and the compression state (next positions, kept-slot masks).

    Greedy decoding drops the rows that reached EOS this way, so that a batch whose other rows are
    done stops paying for them (an evaluation grid's weak presses often run to the token limit
    while most rows answer in a few tokens). Rows are independent in a batch, so each row keeps
    decoding as it would have, up to float rounding.
    """
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    state = getattr(cache, "_clusterattn", None)
    if state is None:
        return
    pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
    state.next_pos, state.kept_real = pick(state.next_pos), pick(state.kept_real)
    if state.layer_real is not None:
        state.layer_real = {layer: pick(real) for layer, real in state.layer_real.items()}


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
