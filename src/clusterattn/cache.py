"""A compressed KV cache that carries its own truth: transformers' cache-layer contract.

A :class:`CompressedLayer` is a full-attention cache layer whose prompt part was compressed. It
knows two lengths, the way transformers' sliding-window layers do:

- *physical*: the entries it holds, ``keys.shape[2]`` = kept prompt tokens + tokens appended later;
- *logical*: the tokens the model has seen, physical + ``dropped`` (prompt tokens evicted).

``get_seq_length`` reports the logical length, so positions, ``cache_position``, "tokens already
seen" (``generate``'s slicing of a second turn) come out right through transformers' own code;
``get_mask_sizes`` reports the physical length with ``kv_offset = dropped``, so the causal mask of
the tokens after the prompt is placed at their true positions. Kept slot ``j`` then stands at
logical column ``j + dropped``; for a left-padded prompt that maps exactly the kept padding slots
onto padding columns, because a press keeps padding only when a row has fewer real tokens than
the budget, and then in its first slots (checked at compression). Batches stacked from caches of
different widths (:mod:`clusterattn.batching`) carry an explicit ``slot_mask`` instead.

A cache is *armed* with a press (:func:`arm`, or :class:`CompressedCache`): its first prefill is
compressed layer by layer inside the model's attention (:mod:`clusterattn.integration`), each
layer before the next one runs. Everything a decode step needs stays on the layers: no state on
the model, so a compressed cache decodes correctly in any call, thread or turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clusterattn.chunked import current as current_chunk
from clusterattn.hf import (
    Cache,
    DynamicCache,
    DynamicLayer,
    StaticCache,
    StaticLayer,
    extend_layers,
    fill_layer,
    rope_frequencies,
    text_config,
)
from clusterattn.rope import reads_unrotated_keys
from clusterattn.timing import timer

_local = threading.local()


def announce(layer: CompressedLayer, keys: torch.Tensor) -> None:
    """Tell this thread's next attention call that ``keys`` come from ``layer`` (see :func:`take`)."""
    _local.pending = (layer, keys)


def take(keys: torch.Tensor) -> CompressedLayer | None:
    """The layer that announced ``keys`` in this thread (the attention call right after its update),
    or None for keys of any other cache. Identity of the tensor, so a stale entry never matches."""
    pending = getattr(_local, "pending", None)
    if pending is None or pending[1] is not keys:
        return None
    _local.pending = None
    return pending[0]


@dataclass
class CompressionStats:
    """What a cache's compression did.

    ``prompt_tokens``: prompt length (padded); ``kept_tokens``: ``{layer_idx: tokens kept per KV
    head}`` for compressed layers; ``full_bytes`` / ``kept_bytes``: KV bytes of the compressed layers
    before and after; ``seconds``: time spent scoring, selecting and gathering;
    ``decode_compressions`` / ``decode_seconds``: layer re-selections while decoding and their time
    (:class:`~clusterattn.presses.decoding.DecodingPress`).
    """

    prompt_tokens: int = 0
    kept_tokens: dict[int, int] = field(default_factory=dict)
    full_bytes: int = 0
    kept_bytes: int = 0
    seconds: float = 0.0
    decode_compressions: int = 0
    decode_seconds: float = 0.0


@dataclass
class Plan:
    """What an armed cache will do to its first prefill: ``press`` on the ``layers`` (their order
    gives each layer's rank, as per-layer budgets need), recording into ``stats``. ``inv_freq``:
    layer index -> that layer's RoPE inverse frequencies, for a press that reads keys before RoPE
    (:attr:`~clusterattn.presses.base.BasePress.reads_unrotated_keys`); None for the others."""

    press: object
    layers: list[int]
    stats: CompressionStats = field(default_factory=CompressionStats)
    inv_freq: Callable[[int], torch.Tensor] | None = None

    def rank(self, layer_idx: int) -> int:
        return self.layers.index(layer_idx)


def gather_kv(key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(batch, kv_heads, seq, head_dim)`` at kept indices ``(batch, kv_heads, kept)``.

    One ``index_select`` of whole rows over the flattened ``(batch * kv_heads * seq, head_dim)``
    view: the same result as ``gather`` along ``seq`` with an expanded index, 7x faster on CPU.
    """
    batch, heads, seq, _ = key.shape
    offsets = torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * seq
    rows = (idx + offsets).view(-1)
    shape = (*idx.shape, -1)
    return tuple(t.reshape(batch * heads * seq, -1).index_select(0, rows).view(shape) for t in (key, value))


def _kept_real(pad_mask: torch.Tensor, idx: torch.Tensor, dropped: int, press) -> torch.Tensor | None:
    """``(batch, kept)`` True on the kept slots that hold real tokens, None when all do.

    Raises unless every head of a row kept padding only in its first ``padding - dropped`` slots
    (what the logical-offset mask assumes; every press here keeps padding only when a row has
    fewer real tokens than the budget).
    """
    real = pad_mask.to(idx.device).gather(1, idx.flatten(1)).view(idx.shape)
    if bool(real.all()):
        return None
    pads = (~pad_mask).sum(-1).to(idx.device)
    first_real = (pads - dropped).clamp_min(0)
    expected = torch.arange(idx.shape[-1], device=idx.device)[None, None, :] >= first_real[:, None, None]
    if not torch.equal(real, expected.expand_as(real)):
        raise RuntimeError(
            f"{type(press).__name__} kept padding slots in place of real tokens; a press must keep "
            "padding only when a row has fewer real tokens than the budget"
        )
    return real[:, 0, :]


def compress_layer(layer, plan: Plan, query, key, value, scaling, pad_mask) -> None:
    """Select with ``plan.press`` from one layer's full prompt and keep the selection in ``layer``.

    Shapes: ``query`` ``(batch, q_heads, seq, head_dim)``, ``key``/``value``
    ``(batch, kv_heads, seq, head_dim)`` post-RoPE, ``pad_mask`` ``(batch, seq)`` True on real
    tokens (left padding only) or None.
    """
    stats, start = plan.stats, timer(query)
    with torch.no_grad():
        idx = plan.press.select(
            query,
            key,
            scaling,
            layer=plan.rank(layer.layer_idx),
            n_layers=len(plan.layers),
            pad_mask=pad_mask,
            inv_freq=None if plan.inv_freq is None else plan.inv_freq(layer.layer_idx),
        )
        stats.prompt_tokens = key.shape[2]
        if idx is None:
            layer.slot_mask = None if pad_mask is None or bool(pad_mask.all()) else pad_mask.clone()
            layer.keep(key, value, 0)
        else:
            if idx.ndim != 3 or idx.shape[:2] != key.shape[:2]:
                raise RuntimeError(f"{type(plan.press).__name__}.select returned shape {tuple(idx.shape)}")
            dropped = key.shape[2] - idx.shape[-1]
            layer.slot_mask = None if pad_mask is None else _kept_real(pad_mask, idx, dropped, plan.press)
            stats.full_bytes += 2 * key.numel() * key.element_size()
            layer.keep(*gather_kv(key, value, idx), dropped)
            stats.kept_bytes += 2 * idx.numel() * key.shape[-1] * key.element_size()
            stats.kept_tokens[layer.layer_idx] = idx.shape[-1]
    stats.seconds += timer(query) - start


class CompressedLayer(DynamicLayer):
    """A full-attention layer whose prompt part is (or will be) compressed; see the module docstring.

    ``dropped``: prompt tokens evicted (logical - physical length); ``slot_mask``: ``(batch, slots)``
    False on slots no query may see (kept padding, or the left padding of a stacked batch), None when
    every slot is real; ``plan``: the press still to apply to this layer's first prefill.
    """

    def __init__(self, layer_idx: int, plan: Plan | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.plan = self.armed = plan  # ``armed``: kept, so that ``reset`` re-arms the layer
        self.dropped = 0
        self.slot_mask: torch.Tensor | None = None
        self.prompt_slots = 0  # physical slots of the compressed prompt
        self.awaiting = False  # the prefill is in this layer; the attention call compresses it
        self.collecting = False  # a chunked prefill's earlier chunk is in this layer (not compressed yet)
        self.prefill_queries: torch.Tensor | None = None  # the earlier chunks' last queries
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a chunked prefill's prompt K/V
        self.decoder = None  # a DecodingPress's state after the prefill (clusterattn.decoding)

    @property
    def stats(self) -> CompressionStats | None:
        return None if self.armed is None else self.armed.stats

    def keep(self, keys: torch.Tensor, values: torch.Tensor, dropped: int) -> None:
        """Hold ``keys``/``values`` ``(batch, kv_heads, kept, head_dim)`` as the prompt, ``dropped``
        prompt tokens evicted (called once, at the end of the prefill)."""
        self.keys, self.values = keys, values
        self.dropped, self.prompt_slots = dropped, keys.shape[-2] if dropped else 0

    @property
    def physical_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def prefill_step(self, key_states) -> bool:
        """True when ``key_states`` are (part of) the armed prefill; sets ``awaiting`` (the attention
        call compresses) or ``collecting`` (a chunked prefill's earlier chunk: keys gathered, not
        compressed yet)."""
        chunk = current_chunk()
        if self.plan is not None and chunk is not None:  # chunks only run into an empty cache
            prefill, final = True, chunk.final
        else:
            prefill = self.plan is not None and self.physical_length == 0 and key_states.shape[-2] > 1
            final = True
            if self.plan is not None and not prefill:
                self.plan = None  # a one-token prompt: nothing to compress
        self.awaiting, self.collecting = prefill and final, prefill and not final
        return prefill

    def gather_chunk(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """During a chunked prefill: this chunk's keys and values written into buffers of the whole
        prompt (allocated at its first chunk, so the prompt's keys are never copied as they grow);
        returns the prompt's keys and values so far ``(batch, kv_heads, end, head_dim)`` (views)."""
        chunk = current_chunk()
        if chunk.start == 0:
            self.pending = tuple(
                t.new_empty((*t.shape[:2], chunk.total, t.shape[-1])) for t in (key_states, value_states)
            )
        keys, values = self.pending
        keys[:, :, chunk.start : chunk.end] = key_states
        values[:, :, chunk.start : chunk.end] = value_states
        if chunk.final:
            self.pending = None
        return keys[:, :, : chunk.end], values[:, :, : chunk.end]

    def collect_queries(self, query: torch.Tensor) -> torch.Tensor:
        """The prefill's queries ``(batch, q_heads, seq, head_dim)`` seen so far: ``query`` (this
        call's) after the earlier chunks' kept ones. While collecting, keeps the last ones the press
        reads (``queries_read``) for the next chunk; after the last chunk, drops them."""
        if self.prefill_queries is not None:
            query = torch.cat([self.prefill_queries, query], dim=2)
        self.prefill_queries = None
        if self.collecting:
            read = getattr(self.plan.press, "queries_read", None)
            first = 0 if read is None else query.shape[2] - min(read, query.shape[2])
            self.prefill_queries = query[:, :, first:]
        return query

    def update(self, key_states, value_states, *args, **kwargs):
        prefill = self.prefill_step(key_states)
        if prefill and current_chunk() is not None:  # a chunk of a chunked prefill
            keys, values = self.gather_chunk(key_states, value_states)
            fill_layer(self, keys, values)
        else:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        if prefill or self.slot_mask is not None or self.decoder is not None:
            announce(self, keys)
        return keys, values

    def get_seq_length(self) -> int:
        length = self.physical_length
        return length + self.dropped if length else 0

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """``(physical length + new tokens, dropped)``; ``query`` is the new tokens' count
        (transformers >= 5.8) or their ``cache_position`` (earlier)."""
        q_len = query if isinstance(query, int) else query.shape[0]
        return self.physical_length + q_len, self.dropped

    def slot_attention_mask(self, mask, q_len: int, kv_len: int, dtype: torch.dtype):
        """This layer's ``(batch, 1, q_len, kv_len)`` mask when it has a ``slot_mask``: its slots as
        the slot mask says, then the columns of the tokens after the prompt as transformers' own
        mask has them (its last columns), or causal among the new tokens when it gave none."""
        real = self.slot_mask
        batch, slots = real.shape
        tail = kv_len - slots
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            after = mask[..., mask.shape[-1] - tail :].expand(batch, -1, q_len, -1)
            if after.dtype != torch.bool:
                after = after == 0
        else:
            cols = torch.arange(tail, device=real.device)
            rows = torch.arange(tail - q_len, tail, device=real.device)
            after = (cols[None, :] <= rows[:, None]).expand(batch, 1, q_len, tail)
        full = torch.cat([real[:, None, None, :].expand(-1, 1, q_len, -1).to(after.device), after], -1)
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            return torch.zeros(full.shape, dtype=mask.dtype, device=full.device).masked_fill_(
                ~full, torch.finfo(mask.dtype).min
            )
        return full

    def crop(self, length: int) -> None:
        """Drop tokens appended after the prompt: ``length < 0`` removes that many (transformers
        >= 5.8), ``length >= 0`` keeps that many logical tokens (earlier). The compressed prompt
        itself cannot be cropped."""
        logical = self.get_seq_length()
        target = logical + length if length < 0 else length
        if target >= logical:
            return
        if self.dropped and target < self.dropped + self.prompt_slots:
            raise ValueError("cannot crop into the compressed prompt of a compressed cache")
        keep = target - self.dropped
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]

    def _rows(self, pick) -> None:
        """Apply a batch-row operation to the slot mask and the decode window (per-row state)."""
        if self.slot_mask is not None:
            self.slot_mask = pick(self.slot_mask)
        if self.decoder is not None:
            self.decoder.queries = pick(self.decoder.queries)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        """Empty the layer; an armed cache compresses its next prefill again (fresh stats)."""
        super().reset()
        self._rearm()

    def _rearm(self) -> None:
        self.dropped, self.prompt_slots, self.slot_mask, self.awaiting = 0, 0, None, False
        self.collecting, self.prefill_queries, self.pending = False, None, None
        self.decoder = None
        if self.armed is not None and self.armed.stats.prompt_tokens:
            self.armed.stats = CompressionStats()  # shared by the cache's layers: replaced once
        self.plan = self.armed


def compressible_layers(config) -> list[int]:
    """Indices of the full-attention layers of a model config (the only ones a press compresses)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return []
    return list(range(config.num_hidden_layers))


def _refuse_unsupported(cache: Cache) -> None:
    name = type(cache).__name__
    if not isinstance(cache, (DynamicCache, StaticCache)) or "Quantized" in name:
        raise ValueError(
            f"{name} cannot be compressed by a press; use a DynamicCache (the default of model.generate), "
            "a StaticCache, clusterattn.CompressedCache or clusterattn.CompressedStaticCache"
        )
    if getattr(cache, "offloading", False):
        raise ValueError(f"an offloaded {name} cannot be compressed by a press; pass offloading=False")
    for layer in cache.layers:
        if type(layer).__name__.startswith("Quantized") or not isinstance(layer, (DynamicLayer, StaticLayer)):
            raise ValueError(f"cache layer {type(layer).__name__} cannot be compressed by a press")


def holds_tokens(cache: Cache) -> bool:
    """True when any layer of ``cache`` holds keys (a prefill already went into it)."""
    return cache.get_seq_length() != 0 or any(
        getattr(layer, "keys", None) is not None and layer.keys.numel() for layer in cache.layers
    )


def arm(cache: Cache, press, model) -> CompressionStats:
    """Make the empty ``cache`` compress ``model``'s first prefill with ``press``, in place: its
    full-attention layers become :class:`CompressedLayer` s (sliding-window layers stay as they
    are). Returns the stats the compression will fill in. Raises for a non-empty or unsupported
    cache."""
    _refuse_unsupported(cache)
    if holds_tokens(cache):
        raise ValueError(
            "a press compresses the prefill of an empty cache; this cache already holds tokens "
            "(chunked prefill into a non-empty cache is not supported)"
        )
    text = text_config(model)
    n_layers = text.num_hidden_layers
    layers = compressible_layers(text)
    if not layers:
        raise ValueError(
            "this model has no full-attention layer to compress (every layer uses a sliding window: "
            f"sliding_window={getattr(text, 'sliding_window', None)})"
        )
    inv_freq = rope_frequencies(model) if reads_unrotated_keys(press) else None
    plan = Plan(press=press, layers=layers, inv_freq=inv_freq)
    extend_layers(cache, n_layers)
    for i in layers:
        layer = cache.layers[i]
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                f"layer {i} of this cache is a sliding-window layer, but the config says full attention"
            )
        if isinstance(layer, StaticLayer):
            from clusterattn.static_cache import CompressedStaticLayer

            if hasattr(press, "decode_press"):  # a DecodingPress
                raise ValueError(
                    "DecodingPress shrinks the cache while decoding, which a static cache's fixed "
                    "shapes cannot; use a dynamic cache (no compile=, no cache_implementation='static')"
                )

            cache.layers[i] = CompressedStaticLayer(i, layer.max_cache_len, plan)
        else:
            cache.layers[i] = CompressedLayer(i, plan)
    return plan.stats


def is_compressed(cache) -> bool:
    """True for a cache with at least one :class:`CompressedLayer` (armed or compressed)."""
    return isinstance(cache, Cache) and any(isinstance(layer, CompressedLayer) for layer in cache.layers)


def cache_stats(cache) -> CompressionStats | None:
    """The stats of the press ``cache`` was armed with, or None for a plain cache."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, CompressedLayer):
            return layer.stats
    return None


def prepare(model, press) -> None:
    """Check ``press``, install the attention wrapper that compresses on ``model``, and warm the
    press up (e.g. load a compiled kernel now, not inside the timed compression)."""
    from clusterattn.integration import install

    if press is None or not callable(getattr(press, "select", None)):
        raise TypeError(f"press must be a press object with a select method, got {press!r}")
    install(model)
    warm_up = getattr(press, "warm_up", None)
    if callable(warm_up):
        warm_up()


class CompressedCache(DynamicCache):
    """A dynamic cache whose first prefill is compressed by ``press``.

    ``model(..., past_key_values=CompressedCache(model, press))``, ``model.generate(...,
    past_key_values=...)`` or :func:`clusterattn.generate` compress the prompt with no ``with``
    block: the press travels with the cache, so concurrent calls on one model, each with its own
    cache (or a plain one), never see each other's press. Later calls append to the cache
    uncompressed (decode steps, a second chat turn). ``stats`` describe the compression.
    """

    def __init__(self, model, press) -> None:
        prepare(model, press)
        super().__init__(config=model.config)
        arm(self, press, model)

    @property
    def stats(self) -> CompressionStats:
        """What the compression of the last prefill did (see :class:`CompressionStats`)."""
        return cache_stats(self)
