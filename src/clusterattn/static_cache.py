"""A compressed *static* cache: preallocated to the kept prompt plus the tokens still to come, for
``torch.compile`` of the decode step (transformers' ``StaticCache`` contract).

A :class:`CompressedStaticLayer` receives the whole prompt at prefill, hands it to the attention
unchanged, and once the press has chosen (:func:`clusterattn.cache.compress_layer`) allocates its
buffers: ``kept + (max_cache_len - prompt length)`` slots per KV head, the kept prompt in the first
ones. Decode steps write in place at ``physical length`` (a 0-d tensor with a static address, as
transformers' own static layers keep theirs), so a compiled step sees fixed shapes and addresses.
Lengths follow :class:`~clusterattn.cache.CompressedLayer`: logical = physical + ``dropped``;
masks are ``capacity`` columns wide at offset ``dropped``, and causality hides the slots not
written yet.
"""

from __future__ import annotations

import torch

from clusterattn.cache import CompressedLayer, CompressionStats, Plan, announce, arm, cache_stats, prepare
from clusterattn.chunked import current as current_chunk
from clusterattn.hf import StaticCache


class CompressedStaticLayer(CompressedLayer):
    """A full-attention layer of a compressed static cache (see the module docstring).

    ``max_cache_len``: the uncompressed cache's length (prompt + new tokens), as transformers'
    ``StaticCache`` gives it; the layer holds ``max_cache_len - dropped`` slots.
    """

    is_compileable = True

    def __init__(self, layer_idx: int, max_cache_len: int, plan: Plan | None = None) -> None:
        super().__init__(layer_idx, plan)
        self.max_cache_len = max_cache_len
        self.length = torch.zeros((), dtype=torch.long)  # physical slots written

    @property
    def physical_length(self) -> int:
        return int(self.length) if self.is_initialized else 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device

    def keep(self, keys: torch.Tensor, values: torch.Tensor, dropped: int) -> None:
        batch, heads, kept, _ = keys.shape
        prompt = kept + dropped
        if prompt > self.max_cache_len:
            raise ValueError(f"the prompt ({prompt} tokens) exceeds the static cache ({self.max_cache_len})")
        capacity = self.max_cache_len - dropped
        self.keys = keys.new_zeros((batch, heads, capacity, keys.shape[-1]))
        self.values = values.new_zeros((batch, heads, capacity, values.shape[-1]))
        self.keys[:, :, :kept], self.values[:, :, :kept] = keys, values
        self.length = torch.tensor(kept, dtype=torch.long, device=keys.device)
        self.dropped, self.prompt_slots = dropped, kept if dropped else 0
        self.is_initialized = True
        if not torch.compiler.is_compiling():
            for tensor in (self.keys, self.values, self.length):
                torch._dynamo.mark_static_address(tensor)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            if self.prefill_step(key_states):  # the armed prefill (or a chunk of it)
                self.device = key_states.device
                if current_chunk() is not None:  # a chunk of a chunked prefill
                    key_states, value_states = self.gather_chunk(key_states, value_states)
                announce(self, key_states)
                return key_states, value_states
            self.keep(key_states[:, :, :0], value_states[:, :, :0], 0)  # unarmed or a one-token prompt
        positions = torch.arange(key_states.shape[-2], device=self.keys.device) + self.length
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        self.length.add_(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self):
        return self.length + self.dropped if self.is_initialized else 0

    def get_mask_sizes(self, query) -> tuple[int, int]:
        if not self.is_initialized:  # the prefill: the whole prompt, as a dynamic layer
            return super().get_mask_sizes(query)
        return self.keys.shape[-2], self.dropped

    def get_max_length(self) -> int:
        return self.max_cache_len

    get_max_cache_shape = get_max_length  # transformers < 5.8

    def crop(self, length: int) -> None:
        raise ValueError("a compressed static cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place: the compiled step keeps the buffers' addresses
            self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.keys.device)))
            self.values.copy_(self.values.index_select(0, beam_idx.to(self.values.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("a compressed static cache cannot change its batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("a compressed static cache cannot change its batch size")

    def reset(self) -> None:
        """Drop the buffers: the next prefill is compressed again (when armed) and allocates anew."""
        self.keys = self.values = None
        self.is_initialized = False
        self.length = torch.zeros((), dtype=torch.long)
        self._rearm()


class CompressedStaticCache(StaticCache):
    """A static cache of ``max_cache_len`` tokens (prompt + new ones, as for ``StaticCache``) whose
    first prefill ``press`` compresses: each full-attention layer then holds only the kept prompt
    plus room for the new tokens. For a compiled decode step (``torch.compile``); otherwise as
    :class:`~clusterattn.cache.CompressedCache`."""

    def __init__(self, model, press, max_cache_len: int) -> None:
        prepare(model, press)
        super().__init__(config=model.config, max_cache_len=max_cache_len)
        arm(self, press, model)

    @property
    def stats(self) -> CompressionStats:
        return cache_stats(self)
