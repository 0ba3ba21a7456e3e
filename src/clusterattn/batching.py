"""Decode many caches of one prompt as one batch: stacking, padding and the batch key.

An evaluation grid answers one prompt under many presses and budgets. Decoding a small model on
CPU reads every weight once per step whatever the batch size, so rows decode far cheaper together:
caches of equal per-layer lengths stack as they are (:func:`stack_caches`); caches of different
widths are left-padded and masked (:func:`stack_padded`). A compressed layer of the stacked cache
carries its own slot mask (False on the padding), which the attention wrapper applies layer by
layer, so presses with per-layer budgets (PyramidKV) and models whose sliding-window layers stay
whole (Gemma3) pad the same way. :func:`batch_key` says which caches can share a batch, for our
presses and kvpress's alike.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from clusterattn.cache import CompressedLayer
from clusterattn.hf import Cache, fill_layer

PADDED = ("padded",)
"""The :func:`batch_key` of plain caches that share one left-padded batch (the prefix of every
padded key: :func:`is_padded`)."""


def _compressed(cache: Cache) -> frozenset[int]:
    return frozenset(i for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer))


def batch_key(cache: Cache, *, plain: bool = False) -> tuple:
    """Which decode batch ``cache`` can join.

    A compressed cache (our presses) joins any compressed cache of the same prompt whose other
    (uncompressed, sliding-window) layers hold the same lengths: its key is
    ``("padded", "compressed", those lengths...)``. A cache that compresses while decoding
    (``DecodingPress``) decodes alone. With ``plain=True``, a cache without compression
    and one length across its layers joins :data:`PADDED` (its decode passes the padding mask as
    ``attention_mask``, as kvpress's pipeline does). Any other plain cache batches only with caches
    of the very same shape. :func:`is_padded` tells the padded keys apart.
    """
    lengths = tuple(layer.keys.shape[2] for layer in cache.layers)
    compressed = _compressed(cache)
    if any(cache.layers[i].decoder is not None for i in compressed):
        return ("alone", id(cache))  # it re-selects while decoding, on its own budget and schedule
    if compressed:
        return (*PADDED, "compressed", *(n for i, n in enumerate(lengths) if i not in compressed))
    if plain and len(set(lengths)) == 1:
        return PADDED
    return ("exact", *lengths)


def is_padded(key: tuple) -> bool:
    """True for the :func:`batch_key` of caches that decode as one padded batch (:func:`stack_padded`)."""
    return key[: len(PADDED)] == PADDED


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, width - tensor.shape[2], 0))


def _stack_compressed(caches: list[Cache]) -> Cache:
    """Compressed caches of one prompt as one batch: each compressed layer left-padded to its widest
    row, with a slot mask; the uncompressed layers, which must match, stacked as they are."""
    compressed = _compressed(caches[0])
    if any(_compressed(cache) != compressed for cache in caches):
        raise ValueError("caches compressed on different layers cannot share a padded batch")
    logical = {cache.get_seq_length() for cache in caches}
    if len(logical) != 1:
        raise ValueError(
            f"caches of different prompts cannot share a batch (logical lengths {sorted(logical)})"
        )
    merged = copy.copy(caches[0])
    merged.layers = []
    for i, first in enumerate(caches[0].layers):
        sources = [cache.layers[i] for cache in caches]
        widths = [layer.keys.shape[2] for layer in sources]
        if i not in compressed:
            if len(set(widths)) != 1:
                raise ValueError(
                    f"uncompressed layer {i} holds different lengths {sorted(set(widths))}: no shared batch"
                )
            layer = copy.copy(first)
            layer.keys = torch.cat([source.keys for source in sources])
            layer.values = torch.cat([source.values for source in sources])
            merged.layers.append(layer)
            continue
        width = max(widths)
        layer = CompressedLayer(i)
        fill_layer(
            layer,
            torch.cat([_pad(source.keys, width) for source in sources]),
            torch.cat([_pad(source.values, width) for source in sources]),
        )
        layer.dropped = first.get_seq_length() - width
        layer.prompt_slots = width - (widths[0] - first.prompt_slots) if first.prompt_slots else 0
        layer.armed = first.armed
        rows = []
        for source, w in zip(sources, widths, strict=True):
            own = source.slot_mask
            if own is None:
                own = torch.ones(source.keys.shape[0], w, dtype=torch.bool, device=source.keys.device)
            rows.append(F.pad(own, (width - w, 0), value=False))
        real = torch.cat(rows)
        layer.slot_mask = None if bool(real.all()) else real
        if any(source.decoder is not None for source in sources):
            raise ValueError("a cache that compresses while decoding decodes alone (see batch_key)")
        merged.layers.append(layer)
    return merged


def _stack_plain(caches: list[Cache], widths: list[int]) -> Cache:
    merged = copy.copy(caches[0])
    merged.layers = []
    for i, first in enumerate(caches[0].layers):
        layer = copy.copy(first)
        layer.keys = torch.cat([_pad(cache.layers[i].keys, widths[i]) for cache in caches])
        layer.values = torch.cat([_pad(cache.layers[i].values, widths[i]) for cache in caches])
        merged.layers.append(layer)
    return merged


def stack_caches(caches: list[Cache]) -> Cache:
    """One cache whose batch rows are the rows of ``caches``, in order.

    Every cache must hold the same per-layer lengths (e.g. presses on a model whose sliding-window
    layers stay uncompressed, at one budget), so their rows decode together in one batch without
    padding; compressed layers keep their logical lengths and slot masks.
    """
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    shapes = {tuple(layer.keys.shape[2] for layer in cache.layers) for cache in caches}
    if len(shapes) != 1:
        raise ValueError(f"caches of different per-layer lengths cannot share a batch: {sorted(shapes)}")
    if _compressed(caches[0]):
        return _stack_compressed(caches)
    return _stack_plain(caches, list(next(iter(shapes))))


def stack_padded(caches: list[Cache]) -> tuple[Cache, torch.Tensor | None]:
    """One batch from caches of different lengths.

    Shorter caches are left-padded with zero keys and values, layer by layer. Compressed caches
    (ours) carry the padding as each compressed layer's slot mask, applied by the attention wrapper
    layer by layer; the returned mask is then None. Plain caches (kvpress's) must hold one length
    across their layers; the returned ``(batch, width)`` mask, False on the padding (None when
    nothing is padded), must be passed as ``attention_mask`` with the new tokens' columns appended.
    Softmax gives masked slots exactly zero weight: rows decode as they would alone, up to float
    rounding.
    """
    if not caches:
        raise ValueError("stack_padded needs at least one cache")
    if any(_compressed(cache) for cache in caches):
        if not all(_compressed(cache) for cache in caches):
            raise ValueError("cannot stack compressed and uncompressed caches")
        return _stack_compressed(caches), None
    lengths = [[layer.keys.shape[2] for layer in cache.layers] for cache in caches]
    if any(len(set(row)) != 1 for row in lengths):
        raise ValueError(
            "padded stacking of plain caches needs one length across each cache's layers, got "
            f"{sorted({tuple(row) for row in lengths})}"
        )
    widths = [row[0] for row in lengths]
    width = max(widths)
    merged = _stack_plain(caches, [width] * len(lengths[0]))
    rows = [
        F.pad(torch.ones(c.layers[0].keys.shape[0], w, dtype=torch.bool), (width - w, 0), value=False)
        for c, w in zip(caches, widths, strict=True)
    ]
    real = torch.cat(rows).to(caches[0].layers[0].keys.device)
    return merged, None if bool(real.all()) else real


def select_rows(cache: Cache, rows: torch.Tensor) -> None:
    """Keep only the batch ``rows`` (a 1-D index tensor, in the order given) of ``cache``, in place:
    every layer's keys and values, and the slot masks of compressed layers.

    Greedy decoding drops the rows that reached EOS this way, so that a batch whose other rows are
    done stops paying for them (an evaluation grid's weak presses often run to the token limit
    while most rows answer in a few tokens). Rows are independent in a batch, so each row keeps
    decoding as it would have, up to float rounding.
    """
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.batch_select_indices(rows.to(layer.keys.device))
