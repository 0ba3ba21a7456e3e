"""DBAC: density-based attention clustering, as pure tensor functions (imports only torch).

ClusterAttn (Zhang et al., *ClusterAttn: KV Cache Compression under Intrinsic Attention Clustering*,
ACL 2025) keeps the contiguous spans ("clusters") of prompt tokens that each head attends to, instead
of SnapKV's scattered top-k tokens. Given per-token scores ``(..., n)`` (typically ``(batch, kv_heads,
prefix)``), :func:`dbac` returns exactly ``budget`` unique, sorted token indices per row, vectorised
over all leading dimensions and linear in ``n``.

Variant ``"A"`` (centre expansion, the default; reconstructed from the paper's description):

1. ``blksize = max(1, budget // num_block)``; block max-pool of the scores (kernel = stride =
   ``blksize``) gives one density peak and its arg-max position per block.
2. Blocks whose peak is below ``theta`` cannot seed a cluster (noise).
3. The ``num_block`` highest surviving peaks are the cluster centres (equal peaks: the later block
   first).
4. Each centre ``c`` claims the span ``[c - before, c - before + blksize)`` with
   ``before = round(span_before * blksize)``, shifted to fit inside ``[0, n)``.
5. Union of the spans; rank tokens by (in a cluster, score) and keep the top ``budget``: over-full
   clusters are trimmed by score, spare budget goes to the best tokens between clusters.

Variant ``"B"`` (prompt blocks, another public reading of the paper's Algorithm 1): cut the row into
``num_block`` equal blocks, every block whose peak is ``>= theta`` is a centre, expand each by
``expand`` neighbouring blocks, rank tokens by (inside a candidate block, score), keep the top
``budget``. With a permissive ``theta`` it collapses into top-k.

``num_block == budget`` (span width 1) reduces variant A to plain top-k of the scores.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

VARIANTS = ("A", "B")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


MAX_CLUSTERS = 16
"""Default cap on the number of clusters: above it, larger budgets widen the spans instead."""


def default_num_block(budget: int, span_width: int, max_clusters: int | None = MAX_CLUSTERS) -> int:
    """Number of clusters for spans of about ``span_width`` tokens, ``max(1, budget // span_width)``,
    at most ``max_clusters`` (None: no cap). With the defaults, spans are 16 tokens wide up to
    ``budget = 271`` and widen beyond (``budget // 16``: 30 tokens at 480, 62 at 992)."""
    count = max(1, budget // span_width)
    return count if max_clusters is None else min(count, max_clusters)


def rank_and_select(scores: torch.Tensor, budget: int, *tiers: torch.Tensor | None) -> torch.Tensor:
    """Top-``budget`` indices by lexicographic key ``(tiers..., score)``, sorted ascending.

    ``tiers`` are bool masks shaped like ``scores`` (None: empty); an earlier tier outranks a later
    one, and within a tier tokens are ordered by score. Non-finite (``-inf``, e.g. padding) scores
    stay last whatever their tier. The key is exact: float32 scores are mapped to order-preserving
    32-bit integers and the tiers sit in the bits above them (float64 scores use float64 offsets).
    """
    if scores.dtype == torch.float64:
        return _rank_float64(scores, budget, torch.isfinite(scores), tiers)
    if all(tier is None for tier in tiers):  # scores alone: their bits already rank plain scores
        plain = _plain(scores)
        return _select(_order_key(scores) if plain is None else plain[1], budget)
    finite = torch.isfinite(scores)
    key = _order_key(scores).to(torch.int64)
    level = 1 << 32
    for tier in reversed(tiers):
        if tier is not None:
            key.add_(tier & finite, alpha=level)
        level <<= 1
    return _select(key, budget)


def _order_key(scores: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` int32 keys ordered like the float32 values of ``scores`` (``-0.0 < 0.0``; NaN with
    the sign bit clear above ``inf``, with it set below ``-inf``): the float bits, with the 31 low
    bits flipped where the sign bit is set."""
    bits = scores.float().contiguous().view(torch.int32)
    return bits ^ (bits >> 31).bitwise_and_(0x7FFFFFFF)


def _select(key: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` largest ``key`` values along the last dimension, sorted ascending.

    Exact ties go to the earlier token: the key is widened to ``key * n + (n - 1 - index)``, so the
    choice depends only on the tokens' order, never on their absolute index (a left-padded row
    keeps what it keeps alone; ``topk`` alone breaks ties by an unspecified rule). ``sorted=False``
    only skips ordering the kept values; it does not change which are kept."""
    n = key.shape[-1]
    order = torch.arange(n - 1, -1, -1, device=key.device)
    wide = key.to(torch.int64).mul_(n).add_(order)
    return wide.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values


def _rank_float64(scores, budget, finite, tiers) -> torch.Tensor:
    s = scores.double()
    hi = torch.where(finite, s, float("-inf")).amax(dim=-1, keepdim=True)
    lo = torch.where(finite, s, float("inf")).amin(dim=-1, keepdim=True)
    step = (hi - lo).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0.0) + 1.0
    rank = s
    for level, tier in enumerate(reversed(tiers)):
        if tier is not None:
            rank = rank + tier.double() * step * (2**level)
    return rank.topk(budget, dim=-1).indices.sort(dim=-1).values


def sink_mask(scores: torch.Tensor, n_sink: int) -> torch.Tensor | None:
    """Bool mask of the first ``n_sink`` tokens with a finite score (the first real tokens);
    None when ``n_sink`` is 0 (an empty tier)."""
    if n_sink == 0:
        return None
    finite = torch.isfinite(scores)
    return finite & (finite.long().cumsum(dim=-1) <= n_sink)


def _span_geometry(budget: int, num_block: int, span_before: float) -> tuple[int, int]:
    """``(blk, before)``: the span (and block) width ``max(1, budget // num_block)`` and the tokens
    of each span placed before its centre, ``round(span_before * blk)``, at most ``blk - 1``."""
    blk = max(1, budget // num_block)
    return blk, min(blk - 1, int(round(span_before * blk)))


def _top_blocks(peaks: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` highest int32 ``peaks`` ``(..., n_blocks)`` (an order key of
    the block peaks), in no particular order. Equal peaks go to the later block: the top-k runs on
    the unique int64 code ``peak * 2**32 + block``, so the choice does not depend on how ``topk``
    breaks ties on a device."""
    code = torch.add(_offsets(peaks.shape[-1], peaks.device), peaks, alpha=1 << 32)  # int64, one op
    return code.topk(k, dim=-1, sorted=False).indices


_FINITE_BITS = 0x7F800000  # float32 bit patterns below this with the sign bit clear: +0.0 .. max finite
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_NEG_INF_KEY = -0x7F800001  # _order_key(-inf): every key at or below it is -inf or a NaN
_IN_CLUSTER = 1 << 32  # the cluster tier of the int64 key, above every order key
_SINK_TIER = 1 << 33  # the sink tier of the int64 key, above every clustered token


def _plain(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, bits)``: ``scores`` ``(..., n)`` as contiguous float32 and their int32 bits, when
    every score is finite with the sign bit clear (``+0.0 <= s < inf``, as softmax-based scores are);
    else None. One pass (``aminmax``). On such scores the bits order exactly like the values."""
    if scores.dtype == torch.float64 or scores.numel() == 0:
        return None
    values = scores.float().contiguous()
    lo, hi = (bits := values.view(torch.int32)).aminmax()
    return (values, bits) if lo.item() >= 0 and hi.item() < _FINITE_BITS else None


@functools.lru_cache(maxsize=64)
def _offsets(width: int, device: torch.device) -> torch.Tensor:
    """``arange(width)`` on ``device``, cached (read only)."""
    return torch.arange(width, device=device)


@functools.lru_cache(maxsize=256)
def _relative_theta(relative_theta: float, n: int) -> float:
    """``relative_theta / n`` rounded as the tensor path rounds it (a float32 division), cached:
    building the tensor costs more than the rest of the threshold's work."""
    return (relative_theta / torch.tensor(n)).item()


@functools.lru_cache(maxsize=256)
def _theta_key(theta: float, device: torch.device) -> torch.Tensor:
    """:func:`_threshold_key` of a float ``theta``, as a cached 0-dim tensor."""
    return _threshold_key(torch.tensor(theta, dtype=torch.float32, device=device))


def _threshold_key(theta: torch.Tensor) -> torch.Tensor:
    """Order key ``t`` of a float threshold such that ``key(peak) < t`` exactly when ``peak < theta``
    in float32: the smallest key of theta's value (``-0.0``'s for a zero, as ``-0.0 == 0.0``), and
    ``INT32_MIN`` (nothing below it) for NaN, which no float is below."""
    theta = theta.float()
    key = _order_key(theta)
    key = torch.where(theta == 0, torch.full_like(key, -1), key)  # _order_key(-0.0) == -1
    return torch.where(theta.isnan(), torch.full_like(key, _INT32_MIN), key)


@functools.lru_cache(maxsize=8)
def _int32_min(device: torch.device) -> torch.Tensor:
    """``-2**31`` as a 0-dim int32 tensor on ``device``, cached (read only)."""
    return torch.tensor(_INT32_MIN, dtype=torch.int32, device=device)


def _leading_padding(finite: torch.Tensor) -> torch.Tensor | None:
    """``(..., 1)`` count of leading non-finite scores per row (left padding), from the scores'
    ``isfinite`` mask ``(..., n)``, or None when no row starts with one."""
    if bool(finite[..., 0].all()):
        return None
    return (~finite).long().cumprod(dim=-1).sum(dim=-1, keepdim=True)


def _dbac_a(scores, budget: int, num_block: int, theta, relative_theta, span_before: float, n_sink: int):
    """Variant A: the one implementation (CPU and GPU, every input). See :func:`dbac` for the args.

    Every comparison runs on int32 order keys of the float32 scores (:func:`_order_key`), which order
    exactly like the values, so block peaks, thresholds and the final ranking are integer ops (an
    int32 ``amax`` over short blocks is 2-4x faster than a float32 one on CPU):

    1. Left-padded rows (leading ``-inf``) are rolled so that their padding sits at the end: each
       row's block grid and span clamping start at its first real token, as if it were alone.
    2. Block peaks are a values-only ``amax``; the top ``num_block`` blocks above ``theta`` are the
       centres, and the first arg-max is found inside those blocks only.
    3. One ranking key per token: the score's key outside the clusters, the score's key plus a
       cluster tier inside them (written by one scatter over the ``(..., k * blk)`` span positions),
       and a sink tier above both; the top ``budget`` keys are kept.

    Plain scores (every score finite and ``>= +0.0``, as softmax-based ones; the common case) keep
    the whole key in int32: their float bits are their order key and the sign bit is free for the
    cluster tier (``bits - 2**31`` outside, ``bits`` inside, ``INT32_MAX`` for a sink). Other scores
    use an int64 key with the tiers above bit 32; ``-inf`` and NaN never enter a cluster.
    """
    n = scores.shape[-1]
    plain = _plain(scores)
    finite = None if plain is not None else torch.isfinite(scores)  # one pass, read three times
    lead = None if finite is None else _leading_padding(finite)
    if lead is not None:
        scores = scores.gather(-1, (_offsets(n, scores.device) + lead) % n)
    order = plain[1] if plain is not None else _order_key(scores)
    if relative_theta is not None:  # the uniform mass over each row's real tokens (roll-invariant)
        if finite is None or bool(finite.all()):
            theta = _relative_theta(relative_theta, n)
        else:
            theta = relative_theta / finite.sum(dim=-1, keepdim=True).clamp_min_(1)
    blk, before = _span_geometry(budget, num_block, span_before)
    n_blocks = math.ceil(n / blk)
    int_min = _int32_min(order.device)
    # the short last block is padded with INT32_MIN, below every key
    padded = F.pad(order, (0, n_blocks * blk - n), value=_INT32_MIN) if n % blk else order
    # amax, not max / max_pool1d: those also fork threads, which stall for ms on a busy machine
    peaks = padded.view(*order.shape[:-1], n_blocks, blk).amax(dim=-1)
    if plain is None:  # a block with no real token (all -inf or NaN) seeds no cluster
        peaks.masked_fill_(peaks <= _NEG_INF_KEY, int_min)
    if theta is not None:  # noise blocks are masked before the top-k: ties break the same way
        if isinstance(theta, torch.Tensor):
            limit = _threshold_key(theta.to(order.device))
        else:  # a Python number (an int too)
            limit = _theta_key(float(theta), order.device)
        peaks.masked_fill_(peaks < limit, int_min)
    top_blocks = _top_blocks(peaks, min(num_block, n_blocks))
    top_peaks = peaks.gather(-1, top_blocks)
    offsets = _offsets(blk, order.device)
    cells = torch.add(offsets, top_blocks.unsqueeze(-1), alpha=blk)  # (..., k, blk) top blocks' tokens
    if n % blk:
        cells = cells.clamp_max_(n - 1)  # the short last block repeats its last token
    arg = order.gather(-1, cells.flatten(-2)).view(cells.shape).argmax(dim=-1, keepdim=True)
    start = cells.gather(-1, arg)  # (..., k, 1) centres: first arg-max of each top block
    if before:
        start = start.sub_(before).clamp_min_(0)
    if lead is None:
        start = start.clamp_max_(n - blk)
    else:  # each row's real length
        start = torch.minimum(start, (n - lead - blk).clamp_min_(0).unsqueeze(-1))
    span = (start + offsets).flatten(-2)  # (..., k * blk), inside each row's real tokens
    src = order.gather(-1, span)
    if plain is not None:
        key = torch.bitwise_xor(order, int_min)  # a 0-dim tensor: a Python int operand costs 2x here
        low, sink = _INT32_MIN, _INT32_MAX
    else:
        key = order.to(torch.int64)
        src = src.to(torch.int64).add_((src > _NEG_INF_KEY).to(torch.int64), alpha=_IN_CLUSTER)
        low, sink = -(1 << 62), _SINK_TIER
    if top_peaks.amin().item() == _INT32_MIN:  # noise centres write no span: their slots take a max
        noise = (top_peaks == _INT32_MIN).unsqueeze(-1)
        src.view(*top_peaks.shape, blk).masked_fill_(noise, low)
        key = key.scatter_reduce_(-1, span, src, "amax")
    else:
        key = key.scatter_(-1, span, src)
    if n_sink:
        key.masked_fill_(sink_mask(scores, n_sink), sink)
    kept = _select(key, budget)
    return kept if lead is None else ((kept + lead) % n).sort(dim=-1).values


def _blocks_variant_b(scores: torch.Tensor, num_block: int, theta, expand: int):
    n = scores.shape[-1]
    blk = math.ceil(n / num_block)
    n_blocks = math.ceil(n / blk)
    padded = F.pad(scores.float(), (0, n_blocks * blk - n), value=float("-inf"))
    peaks = padded.view(*scores.shape[:-1], n_blocks, blk).amax(dim=-1)
    centre = torch.isfinite(peaks) if theta is None else peaks >= theta
    flat = centre.float().reshape(-1, 1, n_blocks)
    dilated = F.max_pool1d(flat, kernel_size=2 * expand + 1, stride=1, padding=expand) > 0
    return dilated.view(*scores.shape[:-1], n_blocks).repeat_interleave(blk, dim=-1)[..., :n]


def dbac(
    scores: torch.Tensor,
    budget: int,
    *,
    num_block: int | None = None,
    theta: float | torch.Tensor | None = None,
    relative_theta: float | None = None,
    span_width: int = 16,
    max_clusters: int | None = MAX_CLUSTERS,
    span_before: float = 0.0,
    n_sink: int = 0,
    variant: str = "A",
    expand: int = 1,
) -> torch.Tensor:
    """Fit contiguous attention clusters and return the kept token indices.

    Args:
        scores: ``(..., n)`` token importance, e.g. window scores ``(batch, kv_heads, prefix)``.
            ``-inf`` marks tokens that must never be kept unless nothing else is left; leading
            ``-inf`` (left padding) is skipped, so a padded row keeps what it would keep alone.
        budget: number of indices to return per row (ClusterAttn passes the prefix budget
            ``B - window``); ``1 <= budget <= n``.
        num_block: number of clusters (variant A) or of equal prompt blocks (variant B). Default
            ``min(max(1, budget // span_width), max_clusters)``: spans of about ``span_width``
            tokens, and wider spans once there would be more than ``max_clusters`` of them.
        theta: absolute density threshold (a float, or a tensor broadcastable to ``(..., 1)``);
            blocks whose peak score is below it seed no cluster. ``None`` admits every block.
        relative_theta: threshold relative to each row's count of finite scores ``m``:
            ``theta = relative_theta / m`` (the uniform share of ``relative_theta``'s mass; the
            :class:`~clusterattn.ClusterAttnPress` passes ``alpha * window``). Exclusive with
            ``theta``. Rows without padding get it as one float32 number, with no pass over ``n``.
        span_width: target span width used when ``num_block`` is None.
        max_clusters: cap on the default ``num_block`` (None: no cap); unused with ``num_block``.
        span_before: share of each span placed before its centre (0.5 = centred). Variant A.
        n_sink: the first ``n_sink`` finite-scored tokens are always kept.
        variant: ``"A"`` (centre expansion) or ``"B"`` (prompt blocks).
        expand: neighbouring blocks added on each side of a centre block (variant B).

    Returns:
        ``(..., budget)`` int64 indices, unique and ascending in every row.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim < 1:
        raise TypeError("scores must be a torch.Tensor with at least one dimension")
    n = scores.shape[-1]
    _check_int("budget", budget, 1)
    if budget > n:
        raise ValueError(f"budget ({budget}) must be <= the number of scored tokens ({n})")
    if max_clusters is not None:
        _check_int("max_clusters", max_clusters, 1)
    if num_block is None:
        num_block = default_num_block(budget, _check_int("span_width", span_width, 1), max_clusters)
    _check_int("num_block", num_block, 1)
    _check_int("n_sink", n_sink, 0)
    _check_int("expand", expand, 0)
    if not 0.0 <= span_before < 1.0:
        raise ValueError(f"span_before must be in [0, 1), got {span_before}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if n_sink > budget:
        raise ValueError(f"n_sink ({n_sink}) must be <= budget ({budget})")
    if relative_theta is not None:
        if theta is not None:
            raise ValueError("give theta or relative_theta, not both")
        if not relative_theta >= 0:
            raise ValueError(f"relative_theta must be >= 0, got {relative_theta}")
    if variant == "A":
        return _dbac_a(scores, budget, num_block, theta, relative_theta, span_before, n_sink)
    finite = torch.isfinite(scores)
    if relative_theta is not None:
        theta = relative_theta / finite.sum(dim=-1, keepdim=True).clamp_min_(1)
    # Left padding is rolled to the end, as in variant A: the blocks start at the first real token.
    lead = _leading_padding(finite)
    if lead is not None:
        scores = scores.gather(-1, (_offsets(n, scores.device) + lead) % n)
    kept = rank_and_select(
        scores, budget, sink_mask(scores, n_sink), _blocks_variant_b(scores, num_block, theta, expand)
    )
    return kept if lead is None else ((kept + lead) % n).sort(dim=-1).values


def topk_indices(scores: torch.Tensor, budget: int, n_sink: int = 0) -> torch.Tensor:
    """Plain top-``budget`` of ``scores`` ``(..., n)`` (SnapKV's selection), sorted ascending."""
    _check_int("budget", budget, 1)
    if budget > scores.shape[-1]:
        raise ValueError(f"budget ({budget}) must be <= the number of scored tokens ({scores.shape[-1]})")
    return rank_and_select(scores, budget, sink_mask(scores, n_sink))
