"""The one module that knows transformers internals.

How a press runs inside a Hugging Face model (transformers 5.2 through 5.24):

- An attention function registered with ``AttentionInterface`` wraps the model's own (sdpa or
  eager). It computes the attention as usual, and at the end of prefill (``q_len == kv_len``) hands
  the post-RoPE queries and the layer's full keys to the press, which returns kept indices
  ``(batch, kv_heads, budget)``; the gathered keys/values wait on the session.
- A forward hook on each ``self_attn`` module swaps them into that layer's cache before the next
  layer runs, so the full-length KV of all layers never coexists. The cache is found among the
  hook's kwargs by type, never by the kwarg's name.
- A forward pre-hook on the model records the padding of the prompt and, once a cache has been
  compressed, rewrites ``position_ids`` (tokens after the prompt keep positions ``L, L+1, ...``)
  and the 2-D ``attention_mask`` (its length follows the compressed cache).

Sliding-window layers (Gemma3) are never compressed.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from clusterattn.capture import QueryCapture
from clusterattn.timing import timer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_ATTENTION = ("sdpa", "eager")
_PREFIX = "clusterattn_"


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_model(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a supported causal LM."""
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


def compressible_layers(model) -> list[int]:
    """Indices of the full-attention layers (the only ones a press compresses)."""
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return []
    return list(range(config.num_hidden_layers))


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: self_attn module}`` for every decoder layer."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            found[module.layer_idx] = module
    return found


def _base_attention(module, implementation: str):
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _register(implementation: str) -> str:
    name = _PREFIX + implementation
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        session = getattr(module, "_clusterattn_session", None)
        layer_mask = getattr(session, "layer_mask", None)  # sessions that only capture have none
        own = (
            None
            if layer_mask is None
            else layer_mask(module.layer_idx, query.shape[2], key.shape[2], query.device)
        )
        if own is not None:  # a batch padded per layer (batching.stack_padded): this layer's own mask
            attention_mask = own if implementation == "sdpa" else _additive(own, query.dtype)
        elif not _sliding(module):  # full-attention layers: their own cache length (PyramidKV)
            attention_mask = fit_mask(attention_mask, key.shape[2])
        output = _base_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
        if session is not None:
            session.on_attention(module, query, key, value, kwargs.get("scaling", module.scaling))
        return output

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive float mask eager attention expects."""
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill_(~mask, torch.finfo(dtype).min)


def _sliding(module) -> bool:
    """True for the attention module of a sliding-window layer (``config.layer_types``)."""
    kinds = getattr(getattr(module, "config", None), "layer_types", None)
    return bool(kinds) and kinds[module.layer_idx] == "sliding_attention"


def fit_mask(mask, kv_len: int):
    """A 4-D attention mask fitted to a full-attention layer holding ``kv_len`` keys.

    transformers builds one mask per forward (per layer type) from the first such layer's cache
    length. A press that leaves layers at different lengths (PyramidKV) is never used on padded
    prompts, so the columns by which another layer is longer or shorter are prompt tokens every
    query sees: drop the leading ones, or prepend visible ones (``True`` / ``0.0``). The causal part
    at the end is unchanged. Sliding-window layers are never compressed and keep transformers' mask.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[-1] == kv_len:
        return mask
    extra = kv_len - mask.shape[-1]
    if extra < 0:
        return mask[..., -kv_len:]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([visible((*mask.shape[:-1], extra), dtype=mask.dtype, device=mask.device), mask], -1)


def cache_kwarg(model) -> str:
    """Name of ``model.forward``'s cache argument (``cache`` from 5.24, ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(model) -> Cache:
    """An empty dynamic cache with the right layer type per layer (sliding layers for Gemma3)."""
    return DynamicCache(config=model.config)


def find_cache(args, kwargs) -> Cache | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer of ``cache``."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class CompressionStats:
    """What the last prefill under a press did.

    ``kept_tokens``: ``{layer_idx: tokens kept per KV head}`` for compressed layers;
    ``full_bytes`` / ``kept_bytes``: KV bytes of the compressed layers before and after;
    ``seconds``: time spent scoring, selecting and gathering.
    """

    prompt_tokens: int = 0
    kept_tokens: dict[int, int] = field(default_factory=dict)
    full_bytes: int = 0
    kept_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _CacheState:
    """Attached to a compressed cache: what decode steps need to stay consistent."""

    next_pos: torch.Tensor  # (batch,) position of the first token after the prompt
    lengths: dict[int, int]  # compressed length per layer
    kept_real: torch.Tensor | None  # (batch, kept) False on kept padding slots, None without padding
    # {layer: (batch, lengths[layer])} False on the left padding of a batch padded per layer (caches
    # whose layers kept different lengths, stacked by batching.stack_padded); None otherwise
    layer_real: dict[int, torch.Tensor] | None = None


class PressSession:
    """A press applied to one model; created by ``with press(model) as session``."""

    def __init__(self, model, press) -> None:
        self.model = model
        self.press = press
        self.layers = compressible_layers(model)
        self.rank = {layer: i for i, layer in enumerate(self.layers)}
        self.model_type = text_config(model).model_type
        self.stats = CompressionStats()
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pad_mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None
        self._layer_real: dict[int, torch.Tensor] | None = None
        self._state: _CacheState | None = None
        self._sliding_model = "sliding_attention" in (getattr(text_config(model), "layer_types", None) or ())

    # -- model pre-hook -------------------------------------------------------------------------
    def before_forward(self, module, args, kwargs):
        cache = find_cache(args, kwargs)
        state = getattr(cache, "_clusterattn", None) if cache is not None else None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, q_len = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        self._layer_real = None if state is None else state.layer_real
        self._state = state
        if state is None:
            self._begin_prefill(tokens, q_len, mask, kwargs.get("position_ids"))
            return args, kwargs
        ref = next(iter(state.lengths))
        past = cache.layers[ref].keys.shape[2] - state.lengths[ref]
        steps = torch.arange(past, past + q_len, device=tokens.device)
        kwargs["position_ids"] = state.next_pos.to(tokens.device)[:, None] + steps[None, :]
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            if state.kept_real is None:
                kwargs["attention_mask"] = None
            else:
                tail = torch.ones(batch, past + q_len, dtype=torch.bool, device=mask.device)
                kwargs["attention_mask"] = torch.cat([state.kept_real.to(mask.device), tail], -1).to(
                    mask.dtype
                )
        return args, kwargs

    def layer_mask(self, layer: int, q_len: int, kv_len: int, device=None) -> torch.Tensor | None:
        """``(batch, 1, q_len, kv_len)`` bool mask of a compressed layer after the prompt: the
        layer's real kept slots, then every token after the prompt, causal among the new ones.

        Built for a batch padded per layer (its slots differ by layer), and for several new tokens
        at once on a model with sliding-window layers: transformers 5.2 places their causal part by
        the sliding layers' (uncompressed) length, so every new token would see the later ones.
        None otherwise (transformers' own mask serves). On ``device`` when given.
        """
        if self._layer_real is not None and layer in self._layer_real:
            real = self._layer_real[layer]
        elif self._sliding_model and q_len > 1 and self._state is not None and layer in self._state.lengths:
            real = self._state.kept_real
            if real is None:
                real = torch.ones(1, self._state.lengths[layer], dtype=torch.bool)
            real = real.expand(self._state.next_pos.shape[0], -1)
        else:
            return None
        if device is not None:
            real = real.to(device)
        tail = kv_len - real.shape[1]  # tokens after the prompt, the new ones included
        cols = torch.arange(tail, device=real.device)
        rows = torch.arange(tail - q_len, tail, device=real.device)
        causal = (cols[None, :] <= rows[:, None]).expand(real.shape[0], 1, q_len, tail)
        return torch.cat([real[:, None, None, :].expand(-1, 1, q_len, -1), causal], -1)

    def _begin_prefill(self, tokens, q_len, mask, position_ids) -> None:
        self._pending.clear()
        self._pad_mask = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            real = mask.bool()
            if bool((real[:, :-1] & ~real[:, 1:]).any()):
                raise ValueError("attention_mask: only left padding is supported (pads must precede tokens)")
            if not self.press.uniform_layers or self.model_type.startswith("gemma3"):
                raise ValueError(
                    f"padded batches are not supported with {type(self.press).__name__} on "
                    f"{self.model_type}: layers would keep different padding; pass equal-length prompts"
                )
            self._pad_mask = real[:, -q_len:]
        if isinstance(position_ids, torch.Tensor):
            self._next_pos = position_ids.expand(tokens.shape[0], -1)[:, -1] + 1
        else:
            self._next_pos = torch.full((tokens.shape[0],), q_len, dtype=torch.long, device=tokens.device)

    # -- attention wrapper ----------------------------------------------------------------------
    def on_attention(self, module, query, key, value, scaling) -> None:
        layer = module.layer_idx
        q_len, kv_len = query.shape[2], key.shape[2]
        if layer not in self.rank or q_len != kv_len or q_len < 2:
            return
        start = timer(query)
        with torch.no_grad():
            idx = self.press.select(
                query,
                key,
                scaling,
                layer=self.rank[layer],
                n_layers=len(self.layers),
                pad_mask=self._pad_mask,
            )
            self.stats.prompt_tokens = kv_len
            if idx is None:
                return
            self._pending[layer] = (*gather_kv(key, value, idx), idx)
        self.stats.seconds += timer(query) - start

    # -- self_attn forward hook -----------------------------------------------------------------
    def after_attention(self, module, args, kwargs, output):
        pending = self._pending.pop(module.layer_idx, None)
        cache = find_cache(args, kwargs)
        if pending is None or cache is None:
            return output
        start = timer(pending[0])
        install_compressed(cache, module.layer_idx, *pending, self._pad_mask, self._next_pos, self.stats)
        self.stats.seconds += timer(pending[0]) - start
        return output


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


def install_compressed(cache, layer_idx, keys, values, idx, pad_mask, next_pos, stats) -> None:
    """Swap compressed ``keys``/``values`` into ``cache.layers[layer_idx]`` and record what decode
    steps need (original next positions, compressed lengths, kept padding slots)."""
    layer = cache.layers[layer_idx]
    if "Sliding" in type(layer).__name__:
        return
    stats.full_bytes += 2 * layer.keys.numel() * layer.keys.element_size()
    layer.keys, layer.values = keys, values
    stats.kept_bytes += 2 * keys.numel() * keys.element_size()
    stats.kept_tokens[layer_idx] = keys.shape[2]
    state = getattr(cache, "_clusterattn", None)
    if state is None:
        kept_real = None
        if pad_mask is not None:
            real = pad_mask.to(idx.device).gather(1, idx[:, 0, :])
            kept_real = None if bool(real.all()) else real
        state = _CacheState(next_pos=next_pos, lengths={}, kept_real=kept_real)
        cache._clusterattn = state
    state.lengths[layer_idx] = keys.shape[2]


def _plain_attention(model, nesting: str) -> str:
    """The model's own attention implementation; raises unless it is a supported one that no press
    has wrapped yet (``nesting`` says why wrapping twice is refused)."""
    check_model(model)
    implementation = text_config(model)._attn_implementation
    if implementation.startswith(_PREFIX):
        raise RuntimeError(f"a press is already applied to this model; {nesting}")
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; load the model with "
            f"attn_implementation in {SUPPORTED_ATTENTION}"
        )
    return implementation


@contextlib.contextmanager
def _attached(model, session, implementation: str, hooks=()) -> Iterator:
    """Route ``model``'s attention through the wrapper of ``implementation`` with ``session`` on
    every attention module for the duration of the block; then restore the model's own attention
    and remove ``hooks`` (handles registered by the caller)."""
    modules = attention_modules(model)
    for module in modules.values():
        module._clusterattn_session = session
    try:
        model.set_attn_implementation(_register(implementation))
        yield session
    finally:
        model.set_attn_implementation(implementation)
        for handle in hooks:
            handle.remove()
        for module in modules.values():
            del module._clusterattn_session


@contextlib.contextmanager
def apply_press(model, press) -> Iterator[PressSession]:
    """Install ``press`` on ``model`` for the duration of the block; see the module docstring."""
    implementation = _plain_attention(model, "presses do not nest")
    session = PressSession(model, press)
    if not session.layers:
        raise ValueError(
            "this model has no full-attention layer to compress (every layer uses a sliding window: "
            f"sliding_window={getattr(text_config(model), 'sliding_window', None)})"
        )
    press.warm_up()  # e.g. load a compiled kernel now, not inside the first timed compression
    hooks = [model.register_forward_pre_hook(session.before_forward, with_kwargs=True)]
    hooks += [
        module.register_forward_hook(session.after_attention, with_kwargs=True)
        for module in attention_modules(model).values()
    ]
    with _attached(model, session, implementation, hooks):
        yield session


@contextlib.contextmanager
def capturing_queries(model) -> Iterator[QueryCapture]:
    """Record the post-RoPE queries of every compressible layer, prefill and decode steps alike.

    Nothing is compressed and the model computes exactly what it computes without the block (the
    wrapped attention only copies its queries); the keys are those of the model's own cache.
    For analysis: the attention that decode queries pay to the prompt.
    """
    implementation = _plain_attention(model, "queries are captured on the full cache")
    with _attached(model, QueryCapture(compressible_layers(model)), implementation) as capture:
        yield capture
