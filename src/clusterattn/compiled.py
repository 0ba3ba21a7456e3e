"""Compiled greedy decoding from a static cache: ``clusterattn.generate(..., compile=True)``.

Decoding one token at a time from Python launches every layer's kernels from the host; when the
cache is small (compressed), that launch overhead, not memory traffic, sets the time per token.
The remedy is gpt-fast's: a preallocated cache whose tensors never move (a compressed
:class:`~clusterattn.static_cache.CompressedStaticCache`, or transformers' ``StaticCache`` for the
full cache, so both are compared on the same path) and the one-token step compiled with
``torch.compile`` (on CUDA in ``mode="reduce-overhead"``, i.e. captured in a CUDA graph).

Shapes stay fixed across steps: the batch keeps every row (a row past its EOS keeps decoding, and
its tokens are reported as padding, as the eager path reports them), and the 2-D attention mask
covers the whole generation from the start (causality hides the positions not written yet).
The prefill, and the question appended after it in the query-agnostic setting, run eagerly.

Grouped KV heads (GQA) stay whole in the step: under ``torch.compile`` transformers' sdpa path copies
every KV head to each of its query heads once a mask is given (the whole cache, per layer and step),
so the step runs inside :func:`~clusterattn.hf.masked_gqa`: on CPU sdpa takes the grouped heads with
the mask directly (the eager step's arithmetic: ``enable_gqa``); on CUDA each KV head's query heads
are packed as the rows of one head (transformers 5.24's ``pack_gqa``; 5.2 keeps the copy).
"""

from __future__ import annotations

import inspect
import time

import torch

from clusterattn.hf import StaticCache, cache_kwarg, masked_gqa
from clusterattn.static_cache import CompressedStaticCache
from clusterattn.steps import answer_texts, eos_ids, feed_rest

BACKENDS = ("inductor", "eager", "aot_eager")


def static_cache(model, press, max_cache_len: int):
    """A static cache of ``max_cache_len`` tokens: compressed by ``press``, or the full cache."""
    if press is None:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    return CompressedStaticCache(model, press, max_cache_len=max_cache_len)


def static_prompt_bytes(cache) -> int:
    """KV bytes a static cache's prompt occupies after prefill (its buffers also hold the room
    reserved for the new tokens, which a dynamic cache does not count yet)."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor):
            continue
        filled = int(layer.length) if hasattr(layer, "length") else int(layer.get_seq_length())
        total += 2 * keys[:, :, :filled].numel() * keys.element_size()
    return total


def _step(model, token, mask, position, cache, name: str, cache_position):
    extra = {} if cache_position is None else {"cache_position": cache_position}
    return model(
        input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{name: cache}, **extra
    ).logits


def compiled_step(model, backend: str = "inductor"):
    """The one-token decode step of ``model``, compiled (one per model and backend, reused)."""
    if backend not in BACKENDS:
        raise ValueError(f"compile backend must be one of {BACKENDS}, got {backend!r}")
    steps = model.__dict__.setdefault("_clusterattn_steps", {})
    if backend not in steps:
        cuda = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        steps[backend] = torch.compile(_step, backend=backend, mode=mode, dynamic=False)
    return steps[backend]


def compiled_greedy_decode(
    model, tokenizer, inputs, cache, logits, next_pos, *, max_new_tokens: int, backend: str = "inductor",
    ignore_eos: bool = False,
):  # fmt: skip
    """Greedy decoding with the compiled step (see the module docstring); returns
    ``(tokens (batch, n), texts, seconds)`` as :func:`clusterattn.steps.greedy_decode` does."""
    name, device = cache_kwarg(model), inputs.prompt_ids.device
    needs_position = "cache_position" in inspect.signature(model.forward).parameters  # transformers < 5.8
    batch, start = inputs.prompt_ids.shape[0], time.perf_counter()
    logits, mask, next_pos = feed_rest(model, inputs, cache, logits, next_pos)  # eagerly, in one chunk
    logical = mask.shape[1]
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], -1)  # fixed for every step
    step_fn = compiled_step(model, backend)
    out = torch.full((batch, max_new_tokens), inputs.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids(model, tokenizer)) or [-1], device=device)
    with masked_gqa():  # grouped KV heads attended whole under the steps' mask, not copied per head
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            out[:, step] = torch.where(done, inputs.pad_id, token)
            if not ignore_eos:
                done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            cache_position = torch.tensor([logical + step], device=device) if needs_position else None
            logits = step_fn(
                model, token[:, None], full_mask, (next_pos + step)[:, None], cache, name, cache_position
            )
            logits = logits.clone()  # a CUDA graph's output buffer is overwritten by the next replay
    tokens = out[:, : step + 1]
    return tokens, answer_texts(model, tokenizer, tokens, inputs.pad_id), time.perf_counter() - start
