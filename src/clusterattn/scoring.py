"""Token-importance scores from post-RoPE queries and keys, without ``output_attentions``.

Every function here imports only torch and works on one layer at a time:

- ``query``: ``(batch, q_heads, q_len, head_dim)``, after RoPE (and q-norm where the model has one);
- ``key``:   ``(batch, kv_heads, seq, head_dim)``, the layer's full cached keys after RoPE;
- ``pad_mask``: optional ``(batch, seq)`` bool, True on real tokens (left padding only).

Scores are returned per KV head, ``(batch, kv_heads, seq)``, so that selection happens per KV head
and the memory saving under grouped-query attention is real.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "sum", "max")


def _group_reduce(scores: torch.Tensor, kv_heads: int, aggregation: str) -> torch.Tensor:
    """Reduce ``(batch, q_heads, seq)`` scores to ``(batch, kv_heads, seq)`` over each GQA group."""
    batch, q_heads, seq = scores.shape
    grouped = scores.view(batch, kv_heads, q_heads // kv_heads, seq)
    if aggregation == "mean":
        return grouped.mean(dim=2)
    if aggregation == "sum":
        return grouped.sum(dim=2)
    if aggregation == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    q_positions: torch.Tensor,
    pad_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Causal softmax attention of a block of queries over all keys, fp32.

    ``query`` ``(batch, q_heads, n, d)`` sits at absolute positions ``q_positions`` ``(n,)``; returns
    ``(batch, q_heads, n, seq)``. Only this ``n x seq`` block is ever built.
    """
    batch, q_heads, n, dim = query.shape
    kv_heads, seq = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, n, dim)
    logits = torch.einsum("bhgnd,bhsd->bhgns", q, key.float()) * scaling
    future = torch.arange(seq, device=key.device)[None, :] > q_positions[:, None]  # (n, seq)
    invalid = future[None, None, None]
    if pad_mask is not None:
        invalid = invalid | ~pad_mask[:, None, None, None, :]
    logits = logits.masked_fill(invalid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see only pads give zeros
    return probs.view(batch, q_heads, n, seq)


def _column_sums(
    scaled: torch.Tensor, keys_t: torch.Tensor, start: int, pad_mask: torch.Tensor | None
) -> torch.Tensor:
    """``sum_i softmax(l_i)`` over the causal attention rows of queries ``start .. start + n``.

    ``scaled``: ``(batch, kv_heads, group, n, dim)`` queries already multiplied by the scale;
    ``keys_t``: ``(batch, kv_heads, dim, seq)``. Returns ``(batch, kv_heads, group, start + n)``:
    only keys up to the last query exist in a causal row. The probabilities are never
    materialised: the one ``n x (start + n)`` logits block per head becomes
    ``exp(logit - row max)`` in place and the column sums are a vector-matrix product with the
    rows' ``1 / row sum`` weights, so the block is allocated once and read twice.
    """
    batch, kv_heads, group, n, dim = scaled.shape
    stop = start + n
    q = scaled.reshape(batch, kv_heads, group * n, dim)
    logits = torch.matmul(q, keys_t[..., :stop]).view(batch, kv_heads, group, n, stop)
    # causal: only the block's own n x n corner holds future keys (keys after it are not built)
    future = torch.ones(n, n, dtype=torch.bool, device=scaled.device).triu_(1)
    logits[..., start:stop].masked_fill_(future, float("-inf"))
    if pad_mask is not None:
        logits.masked_fill_(~pad_mask[:, None, None, None, :stop], float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(torch.isinf(row_max), 0.0)  # a query that sees only pads: all zeros
    logits.sub_(row_max).exp_()
    weight = logits.sum(dim=-1, keepdim=True).reciprocal_().nan_to_num_(posinf=0.0)
    return torch.matmul(weight.transpose(-1, -2), logits).squeeze(-2)


def window_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    window_size: int,
    *,
    aggregation: str = "mean",
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Observation-window scores (SnapKV / ClusterAttn feature aggregation).

    ``A = softmax(Q_w K^T * scaling)`` for the last ``window_size`` queries, with the causal mask
    inside the window, summed over the window rows and aggregated over each GQA group. Only one
    ``window_size x seq`` block per query head is ever allocated (see :func:`_column_sums`).

    Args:
        query: ``(batch, q_heads, q_len, head_dim)``; only its last ``window_size`` rows are used.
        key: ``(batch, kv_heads, seq, head_dim)``; the window is the last ``window_size`` keys.
        scaling: the attention scale the model uses (``head_dim ** -0.5`` for most models).
        window_size: number of observation queries ``w``.
        aggregation: ``"mean"``, ``"sum"`` or ``"max"`` over the query heads of a KV group.
        pad_mask: ``(batch, seq)`` True on real tokens; pads score ``-inf``.

    Returns:
        ``(batch, kv_heads, seq - window_size)`` fp32 scores for the prefix tokens.
    """
    seq = key.shape[2]
    if not 0 < window_size < seq:
        raise ValueError(f"window_size must be in (0, {seq}), got {window_size}")
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    window = query[:, :, -window_size:].float() * scaling  # (batch, q_heads, w, dim), small
    scaled = window.view(batch, kv_heads, q_heads // kv_heads, window_size, dim)
    summed = _column_sums(scaled, key.float().transpose(-1, -2), seq - window_size, pad_mask)
    prefix = summed[..., : seq - window_size].reshape(batch, q_heads, seq - window_size)
    scores = _group_reduce(prefix, kv_heads, aggregation)
    if pad_mask is not None:
        scores = scores.masked_fill(~pad_mask[:, None, : seq - window_size], float("-inf"))
    return scores


def accumulated_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    *,
    aggregation: str = "mean",
    pad_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """H2O heavy-hitter scores: attention received from *every* observed query, summed.

    Computed in query chunks of ``chunk_size`` so at most ``chunk_size x seq`` scores per head exist
    at once. ``query`` ``(batch, q_heads, q_len, head_dim)`` holds the queries of the last ``q_len``
    of the ``seq`` key positions: the whole prompt at prefill (``q_len == seq``), the last observed
    tokens while decoding. Each chunk goes through :func:`_column_sums`, which never materialises
    probabilities (a 4-5x saving over softmax + sum on CPU at 2k-4k tokens).

    Returns:
        ``(batch, kv_heads, seq)`` fp32 scores; pads score ``-inf``.
    """
    batch, q_heads, q_len, dim = query.shape
    seq = key.shape[2]
    if not 0 < q_len <= seq:
        raise ValueError(f"accumulated_scores needs 1 to {seq} queries (one per key at most), got {q_len}")
    offset = seq - q_len  # key position of the first query
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    scaled = (query.float() * scaling).view(batch, kv_heads, group, q_len, dim)
    keys_t = key.float().transpose(-1, -2)  # (batch, kv_heads, dim, seq)
    total = torch.zeros(batch, kv_heads, group, seq, dtype=torch.float32, device=key.device)
    for start in range(0, q_len, chunk_size):  # chunks bound memory; the work inside is vectorised
        stop = min(start + chunk_size, q_len)
        total[..., : offset + stop] += _column_sums(
            scaled[:, :, :, start:stop], keys_t, offset + start, pad_mask
        )
    scores = _group_reduce(total.view(batch, q_heads, seq), kv_heads, aggregation)
    if pad_mask is not None:
        scores = scores.masked_fill(~pad_mask[:, None, :], float("-inf"))
    return scores


def key_leverage_scores(key: torch.Tensor, *, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Statistical leverage of each key among its head's keys: a query-agnostic score.

    With ``X`` a head's real keys centred on their mean, token ``i`` scores
    ``h_i = x_i^T (X^T X)^{-1} x_i``, the diagonal of the projection onto ``X``'s column space: how
    far a key lies outside the directions most keys share (Chari & Van Durme, *Compactor: Calibrated
    Query-Agnostic KV Cache Compression with Approximate Leverage Scores*, 2025, on pre-RoPE keys with
    a random sketch; here exact, on the cached post-RoPE keys a press sees). A haystack's repeated
    prose lies in shared directions; a needle's names and numbers stand out. The scores lie in
    ``[0, 1]`` and sum to the keys' rank (``head_dim`` or less). Cost: ``O(seq * head_dim^2)`` per
    head, no queries read.

    Args:
        key: ``(batch, kv_heads, seq, head_dim)`` post-RoPE keys.
        pad_mask: ``(batch, seq)`` True on real tokens; pads neither count in the mean nor the Gram
            matrix, and score ``-inf``.

    Returns:
        ``(batch, kv_heads, seq)`` fp32 scores.
    """
    x = key.float()
    if pad_mask is None:
        x = x - x.mean(dim=-2, keepdim=True)
    else:
        real = pad_mask[:, None, :, None].to(x.dtype)  # (batch, 1, seq, 1)
        mean = (x * real).sum(dim=-2, keepdim=True) / real.sum(dim=-2, keepdim=True).clamp_min(1)
        x = (x - mean) * real
    # the head_dim x head_dim Gram matrix in fp64, with a ridge of 1e-6 of its mean eigenvalue
    # (keys of a rank-deficient head, or a prompt shorter than head_dim, stay well defined)
    gram = x.double().transpose(-1, -2) @ x.double()
    dim = gram.shape[-1]
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
    gram = gram + ridge[..., None, None] * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram)).to(x.dtype)
    scores = ((x @ inverse) * x).sum(dim=-1).clamp_min_(0.0)
    if pad_mask is not None:
        scores = scores.masked_fill(~pad_mask[:, None, :], float("-inf"))
    return scores
