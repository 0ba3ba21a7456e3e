"""How well a kept set of prompt tokens fits the attention of later decode steps (vectorised, torch only).

Shapes used throughout:

- ``attn``: ``(..., q_heads, steps, seq)`` attention that each decode query pays to the ``seq``
  prompt tokens (rows need not sum to 1: the generated tokens take the rest);
- ``mask``: ``(..., kv_heads, seq)`` bool, True on kept tokens; each KV head's set serves the
  ``q_heads // kv_heads`` query heads of its group (grouped-query attention);
- leading ``...`` is typically the layer axis.

Every function returns one value per ``(..., q_heads, steps)``; average with ``.mean()``.
"""

from __future__ import annotations

import torch

from clusterattn.scoring import _attention_probs

_TINY = 1e-30


def kept_mask(indices: torch.Tensor, seq: int) -> torch.Tensor:
    """Bool mask ``(..., seq)`` that is True at ``indices`` ``(..., kept)``."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= seq):
        raise ValueError(f"indices must lie in [0, {seq}), got [{int(indices.min())}, {int(indices.max())}]")
    mask = torch.zeros((*indices.shape[:-1], seq), dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def per_query_head(mask: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``(..., kv_heads, seq)`` -> ``(..., q_heads, 1, seq)``: each KV head's mask for its query heads."""
    kv_heads = mask.shape[-2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    return mask.repeat_interleave(q_heads // kv_heads, dim=-2).unsqueeze(-2)


def _check(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if attn.ndim < 3 or mask.ndim != attn.ndim - 1:
        raise ValueError(
            f"attn (..., q_heads, steps, seq) and mask (..., kv_heads, seq) disagree: "
            f"{tuple(attn.shape)} vs {tuple(mask.shape)}"
        )
    if mask.shape[-1] != attn.shape[-1] or mask.shape[:-2] != attn.shape[:-3]:
        raise ValueError(f"attn {tuple(attn.shape)} and mask {tuple(mask.shape)} disagree")
    return per_query_head(mask, attn.shape[-3]).to(attn.dtype)


def restricted_cosine(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the full attention and the attention restricted to the kept tokens
    and renormalised, per ``(..., q_heads, steps)``.

    Renormalising does not change a cosine, so this is ``||a * m|| / ||a||``: 1 when the kept
    tokens hold all of the attention, the share of its L2 norm otherwise.
    """
    m = _check(attn, mask)
    squared = attn.float().square()
    return ((squared * m).sum(-1) / squared.sum(-1).clamp_min(_TINY)).sqrt()


def fitting_rate(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the attention mass over the ``seq`` tokens that falls on kept tokens."""
    m = _check(attn, mask)
    a = attn.float()
    return (a * m).sum(-1) / a.sum(-1).clamp_min(_TINY)


def hit_rate(attn: torch.Tensor, mask: torch.Tensor, top: int) -> torch.Tensor:
    """Share of each step's ``top`` most-attended tokens that are kept."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    m = _check(attn, mask)
    top = min(top, attn.shape[-1])
    best = attn.topk(top, dim=-1).indices
    return m.expand_as(attn).gather(-1, best).float().mean(-1)


def decode_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, prompt_len: int) -> torch.Tensor:
    """Attention of decode queries over the prompt, from post-RoPE queries and the full cached keys.

    Args:
        query: ``(batch, q_heads, steps, head_dim)``, decode step ``s`` at position ``prompt_len + s``.
        key: ``(batch, kv_heads, seq, head_dim)``, ``seq >= prompt_len + steps`` (prompt, then the
            generated tokens); keys after a query's own position are masked.
        scaling: the model's attention scale.
        prompt_len: number of prompt tokens.

    Returns:
        ``(batch, q_heads, steps, prompt_len)`` fp32: each row is the softmax over every key the
        query sees, restricted to the prompt (so it sums to the prompt's share of the attention).
    """
    steps = query.shape[2]
    if key.shape[2] < prompt_len + steps:
        raise ValueError(f"need {prompt_len + steps} keys for {steps} decode steps, got {key.shape[2]}")
    positions = torch.arange(prompt_len, prompt_len + steps, device=key.device)
    return _attention_probs(query, key[:, :, : prompt_len + steps], scaling, positions, None)[
        ..., :prompt_len
    ]
