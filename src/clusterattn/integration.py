"""How a press runs inside a Hugging Face model: the attention side.

The cache side is :mod:`clusterattn.cache` (a compressed layer reports its logical and physical
lengths, so positions and masks follow from transformers' own code). This module:

- :func:`install` (once per model, idempotent) routes the model's attention through a wrapper
  around its own (sdpa or eager), registered with transformers through :mod:`clusterattn.hf` (the
  one module that touches transformers' internals), and adds a forward pre-hook. Both are inert
  for calls that carry no press: the wrapper calls the model's own attention with the same
  arguments.
- The wrapper acts only for a :class:`~clusterattn.cache.CompressedLayer` that announced its keys
  in this thread (:func:`clusterattn.cache.take`): at the end of an armed prefill it hands the
  post-RoPE queries and the layer's full keys to the press and keeps the selection in that layer,
  before the next layer runs; for a layer with an explicit slot mask (a stacked batch) it builds
  that layer's mask.
- ``with press(model):`` (:func:`apply_press`) applies a press to the calls *of this thread*
  inside the block: the pre-hook arms each call's empty cache (or supplies a
  :class:`~clusterattn.cache.CompressedCache` when the call brings none), and refuses what it
  cannot compress (``use_cache=False``, static, quantized or offloaded caches, chunked prefill
  into a non-empty cache) instead of leaving it silently uncompressed.

Sliding-window layers (Gemma3) are never compressed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from clusterattn import decoding
from clusterattn.cache import (  # noqa: F401 (re-exported)
    CompressedCache,
    CompressedLayer,
    CompressionStats,
    arm,
    compress_layer,
    gather_kv,
    holds_tokens,
    is_compressed,
    take,
)
from clusterattn.cache import compressible_layers as _config_layers
from clusterattn.capture import QueryCapture
from clusterattn.chunked import current as current_chunk
from clusterattn.hf import (  # noqa: F401 (cache_kwarg, kv_bytes, masked_gqa, new_cache re-exported)
    DynamicCache,
    attn_implementation,
    base_attention,
    cache_kwarg,
    find_cache,
    is_registered,
    is_sliding,
    kv_bytes,
    masked_gqa,
    new_cache,
    prompt_mask,
    register_attention,
    set_attn_implementation,
    text_config,
)
from clusterattn.presses.decoding import DecodingPress

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_ATTENTION = ("sdpa", "eager")
_PREFIX = "clusterattn_"
_local = threading.local()  # this thread's active sessions and captures, by id(model)
_install_lock = threading.Lock()


def check_model(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a supported causal LM."""
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


def compressible_layers(model) -> list[int]:
    """Indices of the full-attention layers (the only ones a press compresses)."""
    return _config_layers(text_config(model))


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: self_attn module}`` for every decoder layer."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            found[module.layer_idx] = module
    return found


def _active(kind: str) -> dict:
    """This thread's ``{id(model): object}`` of the given kind ("sessions" or "captures")."""
    found = getattr(_local, kind, None)
    if found is None:
        found = {}
        setattr(_local, kind, found)
    return found


def _prompt_padding(mask, batch: int) -> torch.Tensor | None:
    """``(batch, seq)`` True on real prompt tokens, read off the prefill's 4-D mask (the last query
    sees every real token), or None without padding. Raises unless the padding is on the left."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return None
    row = mask[:, 0, -1, :]
    real = (row if row.dtype == torch.bool else row == 0).expand(batch, -1)
    if bool(real.all()):
        return None
    if bool((real[:, :-1] & ~real[:, 1:]).any()):
        raise ValueError("attention_mask: only left padding is supported (pads must precede tokens)")
    return real


def _register(implementation: str) -> str:
    name = _PREFIX + implementation
    if is_registered(name):
        return name

    def attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        # ``dropout`` may come positionally: kvpress wraps every registered attention function at
        # import and calls it as ``func(module, query, key, value, attention_mask, dropout, **kwargs)``
        chunk = current_chunk()
        if chunk is not None:  # one chunk of a chunked prefill: its rows, the layer's keys
            attention_mask = chunk.mask(attention_mask, key.shape[2], query.dtype, query.device)
        layer = take(key)
        if layer is not None and layer.awaiting:  # the prefill (a static cache's mask may be wider)
            attention_mask = fit_mask(prompt_mask(attention_mask, key.shape[2]), key.shape[2])
        elif layer is not None and layer.slot_mask is not None and not layer.awaiting:
            attention_mask = layer.slot_attention_mask(
                attention_mask, query.shape[2], key.shape[2], query.dtype
            )
        elif not is_sliding(module):  # full-attention layers: their own cache length (PyramidKV)
            attention_mask = fit_mask(attention_mask, key.shape[2])
        base = base_attention(module, implementation)
        output = base(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
        scaling = kwargs.get("scaling", module.scaling)
        if layer is not None and layer.collecting:  # not the last chunk: keep what the press reads
            layer.collect_queries(query)
        elif layer is not None and layer.awaiting:
            observed = layer.collect_queries(query)  # with a chunked prefill's earlier ones
            layer.awaiting = False
            plan, layer.plan = layer.plan, None
            pad_mask = _prompt_padding(attention_mask, query.shape[0])
            if pad_mask is not None and not getattr(plan.press, "uniform_layers", True):
                raise ValueError(
                    f"padded batches are not supported with {type(plan.press).__name__}: layers would keep "
                    "different padding; pass equal-length prompts"
                )
            compress_layer(layer, plan, observed, key, value, scaling, pad_mask)
            if isinstance(plan.press, DecodingPress):
                decoding.start(layer, plan.press, observed)
        elif layer is not None and layer.decoder is not None:
            decoding.observe(layer, query, scaling)
        capture = _active("captures").get(getattr(module, "_clusterattn_owner", None))
        if capture is not None:
            capture.on_attention(module, query, key, value, scaling)
        return output

    register_attention(name, attention, like=implementation)
    return name


def fit_mask(mask, kv_len: int):
    """A 4-D attention mask fitted to a full-attention layer holding ``kv_len`` keys.

    transformers builds one mask per forward (per layer type) from the first such layer's cache
    length. A press that leaves layers at different lengths (PyramidKV) is never used on padded
    prompts, so the columns by which another layer is longer or shorter are prompt tokens every
    query sees: drop the leading ones, or prepend visible ones (``True`` / ``0.0``). The causal part
    at the end is unchanged. The same cut serves a compressed static cache decoding under a mask that
    transformers < 5.8 sizes for the whole uncompressed cache: its leading ``dropped`` columns are
    the evicted prompt positions (the layer's ``kv_offset``). Sliding-window layers are never
    compressed and keep transformers' mask.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[-1] == kv_len:
        return mask
    extra = kv_len - mask.shape[-1]
    if extra < 0:
        return mask[..., -kv_len:]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([visible((*mask.shape[:-1], extra), dtype=mask.dtype, device=mask.device), mask], -1)


class PressSession:
    """A press applied to one model's calls in one thread; created by ``with press(model) as session``.

    ``stats``: the compression of the last cache armed in the block (a fresh object per prefill).
    """

    def __init__(self, model, press) -> None:
        self.model = model
        self.press = press
        self.layers = compressible_layers(model)
        self.stats = CompressionStats()


def _token_count(args, kwargs) -> int:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    return 0 if tokens is None else tokens.shape[1]


def _before_forward(model, args, kwargs):
    """The model's pre-hook: checks that an armed cache will really be compressed, and under
    ``with press(model)`` arms the call's cache (see the module docstring)."""
    cache = find_cache(args, kwargs)
    if is_compressed(cache):
        _check_wrapped(model)
    session = _active("sessions").get(id(model))
    if session is None:
        return None
    q_len = _token_count(args, kwargs)
    if cache is None:
        if kwargs.get("use_cache") is False or (
            kwargs.get("use_cache") is None and not text_config(model).use_cache
        ):
            raise ValueError(
                f"use_cache=False under {type(session.press).__name__}: there is no cache to compress; "
                "call the model with use_cache=True (the default) or outside the press"
            )
        cache = DynamicCache(config=model.config)
        session.stats = arm(cache, session.press, model)
        name = next((k for k in ("past_key_values", "cache") if k in kwargs), cache_kwarg(model))
        kwargs[name] = cache
        return args, kwargs
    if is_compressed(cache):
        return None  # an armed or compressed cache carries its own press
    if not holds_tokens(cache):
        session.stats = arm(cache, session.press, model)
    elif q_len > 1:
        raise ValueError(
            f"{type(session.press).__name__} compresses the prefill of an empty cache; this call feeds "
            f"{q_len} tokens into a cache that already holds {cache.get_seq_length()} uncompressed ones "
            "(chunked prefill into a non-empty cache is not supported)"
        )
    return None


def _check_wrapped(model) -> None:
    implementation = attn_implementation(model)
    if not implementation.startswith(_PREFIX):
        raise RuntimeError(
            f"the model's attention implementation was changed to {implementation!r} after clusterattn "
            "installed its wrapper: a compressed cache needs it; call "
            "clusterattn.integration.install(model) again"
        )


def install(model) -> None:
    """Route ``model``'s attention through the press-aware wrapper and add the pre-hook; once per
    model (idempotent, thread-safe). Calls that carry no press compute exactly what they did."""
    with _install_lock:
        implementation = attn_implementation(model)
        if getattr(model, "_clusterattn_hook", None) is not None and implementation.startswith(_PREFIX):
            return
        check_model(model)
        if implementation not in SUPPORTED_ATTENTION and not implementation.startswith(_PREFIX):
            raise ValueError(
                f"attention implementation {implementation!r} is not supported; load the model with "
                f"attn_implementation in {SUPPORTED_ATTENTION}"
            )
        if not implementation.startswith(_PREFIX):
            set_attn_implementation(model, _register(implementation))
        for module in attention_modules(model).values():
            module._clusterattn_owner = id(model)
        if getattr(model, "_clusterattn_hook", None) is None:
            model._clusterattn_hook = model.register_forward_pre_hook(_before_forward, with_kwargs=True)


def uninstall(model) -> None:
    """Undo :func:`install`: the model's own attention again, no hook."""
    with _install_lock:
        implementation = attn_implementation(model)
        if implementation.startswith(_PREFIX):
            set_attn_implementation(model, implementation[len(_PREFIX) :])
        handle = getattr(model, "_clusterattn_hook", None)
        if handle is not None:
            handle.remove()
            model._clusterattn_hook = None


@contextlib.contextmanager
def _scoped(model, kind: str, value, nesting: str) -> Iterator:
    active = _active(kind)
    if id(model) in active:
        raise RuntimeError(f"{nesting} (in this thread)")
    active[id(model)] = value
    try:
        yield value
    finally:
        del active[id(model)]


@contextlib.contextmanager
def apply_press(model, press) -> Iterator[PressSession]:
    """Apply ``press`` to this thread's calls of ``model`` for the duration of the block."""
    install(model)
    if not compressible_layers(model):
        raise ValueError(
            "this model has no full-attention layer to compress (every layer uses a sliding window: "
            f"sliding_window={getattr(text_config(model), 'sliding_window', None)})"
        )
    press.warm_up()  # its one-time set-up now, not inside the first timed compression
    with _scoped(model, "sessions", PressSession(model, press), "a press is already applied to this model"):
        yield _active("sessions")[id(model)]


@contextlib.contextmanager
def capturing_queries(model) -> Iterator[QueryCapture]:
    """Record the post-RoPE queries of every compressible layer, prefill and decode steps alike.

    Nothing is compressed and the model computes exactly what it computes without the block (the
    wrapped attention only copies its queries); the keys are those of the model's own cache.
    For analysis: the attention that decode queries pay to the prompt.
    """
    install(model)
    capture = QueryCapture(compressible_layers(model))
    with _scoped(model, "captures", capture, "queries are already being captured on this model"):
        yield capture
