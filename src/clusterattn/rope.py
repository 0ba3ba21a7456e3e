"""Keys before RoPE, for presses that score what a key says rather than where it sits.

A cache holds keys after the rotary position embedding: pair ``(x_i, x_{i + r/2})`` of a key at
position ``p`` is turned by the angle ``p * inv_freq[i]`` (transformers' ``rotate_half`` layout,
``r = 2 * len(inv_freq)`` rotated dimensions, the rest untouched). Two keys that say the same thing
at different positions then point in different directions, which blurs statistics taken over all
of a head's keys, such as the leverage of :func:`clusterattn.scoring.key_leverage_scores`.
:func:`unrotate` turns the keys back, given the layer's inverse frequencies, which
:func:`clusterattn.hf.rope_frequencies` reads from the model's own rotary module (so scaled RoPE
variants come out as the model computes them).

Positions are taken as ``0 .. seq - 1``. A left-padded row whose real tokens start later (or at 0,
as ``generate`` numbers them) differs from that by one constant shift, which turns every key of
the row by the same rotation: a statistic that a fixed linear map of all keys leaves unchanged
(leverage is one) is the same either way.
"""

from __future__ import annotations

import torch


def unrotate(key: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``(batch, kv_heads, seq, head_dim)`` after RoPE at positions ``0 .. seq - 1``, turned
    back to before it (fp32). ``inv_freq``: ``(r / 2,)`` the layer's inverse frequencies; the first
    ``r`` dimensions are rotated (``r <= head_dim``), in transformers' ``rotate_half`` layout."""
    half = inv_freq.shape[-1]
    rotated = 2 * half
    if inv_freq.ndim != 1 or not 0 < rotated <= key.shape[-1]:
        raise ValueError(
            f"inv_freq must be 1-D with at most head_dim / 2 = {key.shape[-1] // 2} entries, "
            f"got shape {tuple(inv_freq.shape)}"
        )
    positions = torch.arange(key.shape[2], device=key.device, dtype=torch.float32)
    angle = positions[:, None] * inv_freq.to(key.device, torch.float32)[None, :]  # (seq, r / 2)
    cos, sin = angle.cos(), angle.sin()
    k = key.float()
    first, second = k[..., :half], k[..., half:rotated]
    return torch.cat([first * cos + second * sin, second * cos - first * sin, k[..., rotated:]], dim=-1)


def reads_unrotated_keys(press) -> bool:
    """Whether ``press`` scores the keys before RoPE (and so needs the model's frequencies)."""
    return bool(getattr(press, "reads_unrotated_keys", False))
