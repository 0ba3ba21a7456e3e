"""What one request keeps when its prompt is evicted inside vLLM (pure torch, no vLLM import).

vLLM hands each attention layer flat token-major tensors: ``query`` ``(tokens, q_heads, head_dim)``
and ``key`` / ``value`` ``(tokens, kv_heads, head_dim)``, keys after RoPE. For one request whose
prefill covers its ``prompt_len`` prompt tokens (plus, after a preemption, tokens it had already
generated), :func:`compact` asks the press which prompt tokens each KV head keeps and returns them
in the order they will occupy the request's first cache slots: the kept prompt tokens of each head,
ascending, then every token after the prompt, unchanged. Each KV head may keep different tokens in
the same slot, which is what vLLM's CPU cache layout ``[blocks, kv_heads, block_size, ...]`` allows.
"""

from __future__ import annotations

import logging

import torch

from clusterattn.presses import BasePress

logger = logging.getLogger("clusterattn.vllm")


def select_kept(
    press: BasePress,
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    *,
    layer: int,
    n_layers: int,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Kept prompt indices ``(kv_heads, budget)`` from token-major prompt ``query`` / ``key``.

    Calls the core library's press on ``(1, heads, seq, head_dim)`` views, exactly as the
    transformers integration does (``inv_freq``: the layer's RoPE inverse frequencies, for a press
    that scores the keys before RoPE); None when the press leaves the layer untouched.
    """
    q = query.transpose(0, 1).unsqueeze(0)
    k = key.transpose(0, 1).unsqueeze(0)
    idx = press.select(q, k, scaling, layer=layer, n_layers=n_layers, pad_mask=None, inv_freq=inv_freq)
    return None if idx is None else idx[0]


def gather_tokens(tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` ``(tokens, kv_heads, d)`` at per-head ``idx`` ``(kv_heads, n)``.

    Returns ``(n, kv_heads, d)``: row ``j`` of head ``h`` is ``tensor[idx[h, j], h]``.
    """
    heads_first = tensor.transpose(0, 1)  # (kv_heads, tokens, d)
    index = idx.to(tensor.device).unsqueeze(-1).expand(-1, -1, tensor.shape[-1])
    return heads_first.gather(1, index).transpose(0, 1).contiguous()


def compact(
    press: BasePress,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    *,
    prompt_len: int,
    layer: int,
    n_layers: int,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values ``(kept + extra, kv_heads, head_dim)`` for the request's first slots.

    ``query``, ``key``, ``value`` hold this request's prefill tokens (positions ``0 ..``); only the
    first ``prompt_len`` are scored. Tokens after the prompt (present when a preempted request is
    prefilled again with its earlier output) are appended whole, after the kept prompt tokens.
    Returns None when the press keeps the whole prompt.
    """
    idx = select_kept(
        press,
        query[:prompt_len],
        key[:prompt_len],
        scaling,
        layer=layer,
        n_layers=n_layers,
        inv_freq=inv_freq,
    )
    if idx is None:
        return None
    keys = gather_tokens(key[:prompt_len], idx)
    values = gather_tokens(value[:prompt_len], idx)
    if key.shape[0] > prompt_len:
        keys = torch.cat([keys, key[prompt_len:]], dim=0)
        values = torch.cat([values, value[prompt_len:]], dim=0)
    return keys, values


def recent(
    key: torch.Tensor, value: torch.Tensor, *, prompt_len: int, kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback when a press fails inside the engine: the last ``kept`` prompt tokens and every
    token after the prompt, ``(tokens - (prompt_len - kept), kv_heads, head_dim)``, the same count
    :func:`compact` returns, so the scheduler's block accounting stays right."""
    start = prompt_len - kept
    return key[start:].contiguous(), value[start:].contiguous()


def compact_or_log(item, query, key, value, scale, layer_idx: int):
    """The press's selection for one request being compressed in this step (``item``: the worker's
    record of it, :class:`clusterattn.vllm.hooks._Compression`), or None (and ``item.failed``) when
    the press raises or keeps the wrong count: one request's fault must not take the engine down."""
    try:
        with torch.no_grad():
            inv_freq = None if item.inv_freq is None else item.inv_freq.get(layer_idx)
            pair = compact(
                item.press, query, key, value, scale,
                prompt_len=item.prompt_len, layer=layer_idx, n_layers=item.n_layers, inv_freq=inv_freq,
            )  # fmt: skip
        if pair is None or pair[0].shape[0] != item.tokens - (item.prompt_len - item.kept):
            raise RuntimeError(f"it did not keep {item.kept} tokens")
        return pair
    except Exception as err:  # noqa: BLE001 (any fault of a press: this request falls back, logged)
        item.failed = True
        logger.error(
            "clusterattn: request %s: press %r failed at layer %d (%s: %s); the request keeps its "
            "most recent %d prompt tokens instead",
            item.req_id, item.press, layer_idx, type(err).__name__, err, item.kept,
        )  # fmt: skip
        return None
