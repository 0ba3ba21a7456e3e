"""Everything clusterattn uses of transformers beyond its Auto classes, in one module.

Supported: transformers 5.2 through 5.24 (both ends are tested). What differs between them is
handled here and nowhere else:

- the name of ``model.forward``'s cache argument (``cache`` from 5.24, ``past_key_values`` before);
- a static cache's prefill mask, which transformers < 5.8 sizes for the whole preallocated cache
  (:func:`prompt_mask`);
- sdpa's grouped-query handling behind :func:`masked_gqa`: the ``use_gqa_in_sdpa`` predicate (both;
  ``TRANSFORMERS_SDPA_FORCE_GQA`` exists only in 5.24) and 5.24's one-token ``pack_gqa`` branch.

The rest of the package reaches transformers through these names: the cache and layer classes the
compressed cache builds on (:mod:`clusterattn.cache` and :mod:`clusterattn.static_cache` subclass
the layers and override their public protocol: ``update``, ``get_seq_length``, ``get_mask_sizes``,
...), the attention-function registry (:func:`register_attention`, :func:`base_attention`), the
model's attention implementation, the rotary module's inverse frequencies
(:func:`rope_frequencies`), and the few layer internals a copied or stacked cache needs
(:func:`fill_layer`, :func:`extend_layers`). ``tests/test_packaging.py`` checks that no other module
imports transformers' submodules or touches these internals.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "Cache",
    "DynamicCache",
    "DynamicLayer",
    "StaticCache",
    "StaticLayer",
    "attn_implementation",
    "base_attention",
    "cache_kwarg",
    "extend_layers",
    "fill_layer",
    "find_cache",
    "is_registered",
    "is_sliding",
    "is_static_sliding",
    "kv_bytes",
    "masked_gqa",
    "new_cache",
    "prompt_mask",
    "register_attention",
    "rope_frequencies",
    "set_attn_implementation",
    "text_config",
]


def text_config(model_or_config):
    """The text part of a model's (or a config's) configuration (Gemma3's multimodal config has one)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attn_implementation(model) -> str:
    """The name of the attention function ``model`` runs (``"sdpa"``, ``"eager"``, a registered one)."""
    return text_config(model)._attn_implementation


def set_attn_implementation(model, name: str) -> None:
    """Make ``model`` run the attention function registered as ``name``."""
    model.set_attn_implementation(name)


def is_registered(name: str) -> bool:
    """True when an attention function ``name`` is registered."""
    return name in ALL_ATTENTION_FUNCTIONS


def register_attention(name: str, function: Callable, like: str) -> None:
    """Register ``function`` as attention implementation ``name``, masks built as for ``like``."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[like])


def base_attention(module, implementation: str) -> Callable:
    """The attention function ``implementation`` (``"sdpa"`` or ``"eager"``) of ``module``'s model
    family (eager attention is defined per modeling file)."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def is_sliding(module) -> bool:
    """True for the attention module of a sliding-window layer (``config.layer_types``)."""
    kinds = getattr(getattr(module, "config", None), "layer_types", None)
    return bool(kinds) and kinds[module.layer_idx] == "sliding_attention"


def is_static_sliding(layer) -> bool:
    """True for a static cache's sliding-window layer (a ring buffer of the last window's keys)."""
    return isinstance(layer, StaticLayer) and bool(getattr(layer, "is_sliding", False))


def prompt_mask(mask, kv_len: int):
    """The prefill's 4-D mask cut to the ``kv_len`` prompt keys: a static cache's prefill runs under
    a mask sized for the whole preallocated cache in transformers < 5.8 (built before the forward);
    its columns past the prompt are the future. Other masks are returned as they are."""
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] > kv_len:
        return mask[..., :kv_len]
    return mask


def cache_kwarg(model) -> str:
    """Name of ``model.forward``'s cache argument (``cache`` from 5.24, ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(model) -> Cache:
    """An empty dynamic cache with the right layer type per layer (sliding layers for Gemma3)."""
    return DynamicCache(config=model.config)


def find_cache(args, kwargs) -> Cache | None:
    """The first :class:`Cache` among a call's arguments, or None."""
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


def fill_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make the empty ``layer`` hold ``keys`` and ``values`` ``(batch, kv_heads, seq, head_dim)``
    (the tensors themselves, not copies), as if a prefill had written them."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def extend_layers(cache: Cache, n_layers: int) -> None:
    """Give a cache built without a config (which adds layers lazily) its ``n_layers`` layers now,
    so that individual layers can be replaced before the first forward."""
    if len(cache.layers) < n_layers:
        cache.layers.extend(DynamicLayer() for _ in range(n_layers - len(cache.layers)))
        cache.layer_class_to_replicate = None


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


_gqa = threading.local()  # .depth / .pack: masked_gqa blocks of each kind this thread is in
_gqa_lock = threading.Lock()
GQA_MODES = ("enable_gqa", "pack")


def _install_gqa_predicate() -> None:
    """Wrap transformers' ``use_gqa_in_sdpa`` once: yes inside an ``enable_gqa`` block of the
    calling thread, transformers' own answer everywhere else (other threads, outside blocks)."""
    from transformers.integrations import sdpa_attention

    with _gqa_lock:
        original = sdpa_attention.use_gqa_in_sdpa
        if getattr(original, "_clusterattn", False):
            return

        @functools.wraps(original)
        def use_gqa_in_sdpa(*args, **kwargs):
            return True if getattr(_gqa, "depth", 0) else original(*args, **kwargs)

        use_gqa_in_sdpa._clusterattn = True
        sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa


@functools.cache
def _install_pack_switch() -> bool:
    """Let transformers' sdpa path pack a one-token query's grouped heads under ``torch.compile``.

    transformers >= 5.24 decodes one token under a mask by reshaping the query heads of each KV head
    into rows of one head (``pack_gqa``: ``(batch, heads, 1, d)`` -> ``(batch, kv_heads, group, d)``),
    so the fused kernels read each KV head once; it skips that while dynamo traces and copies the KV
    heads instead. Inside a ``pack`` block of the calling thread, the sdpa module's
    ``is_torchdynamo_compiling`` (which gates only that branch there) says no. False (nothing
    installed) when transformers has no ``pack_gqa`` or uses the predicate elsewhere in the module.
    """
    from transformers.integrations import sdpa_attention

    try:
        source = inspect.getsource(sdpa_attention)
    except (OSError, TypeError):
        return False
    if not hasattr(sdpa_attention, "pack_gqa") or source.count("is_torchdynamo_compiling()") != 1:
        return False
    with _gqa_lock:
        original = sdpa_attention.is_torchdynamo_compiling
        if getattr(original, "_clusterattn", False):
            return True

        @functools.wraps(original)
        def is_torchdynamo_compiling():
            return False if getattr(_gqa, "pack", 0) else original()

        is_torchdynamo_compiling._clusterattn = True
        sdpa_attention.is_torchdynamo_compiling = is_torchdynamo_compiling
    return True


def _default_gqa_mode() -> str:
    return "pack" if torch.cuda.is_available() else "enable_gqa"


@contextlib.contextmanager
def masked_gqa(active: bool = True, how: str | None = None) -> Iterator[None]:
    """Keep grouped KV heads whole when sdpa attends under a mask (padded batches, static caches).

    With a mask, transformers' sdpa path copies every KV head to each of its query heads (the whole
    cache, per layer and step: 2.0 s per step for 25 SmolLM2 rows at 2k against 0.36 s without the
    copy). Inside the block, for the calling thread only, it does not:

    - ``how="enable_gqa"`` (the default on CPU): transformers' ``use_gqa_in_sdpa`` predicate says
      yes, so sdpa takes the grouped heads with the mask (torch's CPU kernels accept both, with the
      same arithmetic; the predicate is the same in transformers 5.2 and 5.24).
    - ``how="pack"`` (the default on CUDA machines, where ``enable_gqa`` with a mask falls back to
      sdpa's math kernel): a one-token query's heads are packed per KV head
      (:func:`_install_pack_switch`), in compiled steps too; longer queries keep transformers' copy.
      Needs transformers' ``pack_gqa`` (5.24); with 5.2 the block changes nothing.

    A user's own ``TRANSFORMERS_SDPA_FORCE_GQA`` (5.24) is respected: the block changes nothing.
    """
    how = _default_gqa_mode() if how is None else how
    if how not in GQA_MODES:
        raise ValueError(f"how must be one of {GQA_MODES}, got {how!r}")
    if not active or os.environ.get(_FORCE_GQA) is not None or (how == "pack" and not _install_pack_switch()):
        yield
        return
    if how == "enable_gqa":
        _install_gqa_predicate()
    counter = "pack" if how == "pack" else "depth"
    setattr(_gqa, counter, getattr(_gqa, counter, 0) + 1)
    try:
        yield
    finally:
        setattr(_gqa, counter, getattr(_gqa, counter) - 1)


@dataclass(frozen=True)
class RopeFrequencies:
    """Each layer's RoPE inverse frequencies, read from the model's rotary module when asked (a
    dynamic RoPE updates them during the forward). ``layer_types``: per layer, the name under
    which a module with several RoPE bases (Gemma-3's local and global layers) keeps that layer's
    frequencies, ``<type>_inv_freq``; None when one ``inv_freq`` serves every layer."""

    rotary: torch.nn.Module
    layer_types: tuple[str, ...] | None = None

    def __call__(self, layer_idx: int) -> torch.Tensor:
        """``(r / 2,)`` inverse frequencies of layer ``layer_idx``."""
        if self.layer_types is None:
            return self.rotary.inv_freq
        return getattr(self.rotary, f"{self.layer_types[layer_idx]}_inv_freq")


def rope_frequencies(model) -> RopeFrequencies:
    """The RoPE inverse frequencies of ``model``'s layers. Raises ``ValueError`` for a model whose
    rotary module is not found (no RoPE, or a layout this reader does not know)."""
    layer_types = getattr(text_config(model), "layer_types", None)
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return RopeFrequencies(module)
        if layer_types and all(
            isinstance(getattr(module, f"{t}_inv_freq", None), torch.Tensor) for t in layer_types
        ):
            return RopeFrequencies(module, tuple(layer_types))
    raise ValueError(
        f"{type(model).__name__} has no rotary module with an inv_freq buffer: keys cannot be turned back "
        "to before RoPE (a press with unrotate_keys=True needs them)"
    )
