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

from clusterattn import dbac_compiled

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


def _spans_variant_a(scores: torch.Tensor, budget: int, num_block: int, theta, span_before: float, length):
    n = scores.shape[-1]
    blk, before = _span_geometry(budget, num_block, span_before)
    n_blocks = math.ceil(n / blk)
    padded = scores.float()
    if n_blocks * blk != n:
        padded = F.pad(padded, (0, n_blocks * blk - n), value=float("-inf"))
    peaks, arg = padded.view(*scores.shape[:-1], n_blocks, blk).max(dim=-1)
    centres = torch.arange(n_blocks, device=scores.device) * blk + arg
    if theta is not None:
        peaks = peaks.masked_fill(peaks < theta, float("-inf"))
    top_blocks = _top_blocks(_order_key(peaks), min(num_block, n_blocks))
    top_peaks = peaks.gather(-1, top_blocks)
    start = (centres.gather(-1, top_blocks) - before).clamp_min(0)
    if isinstance(length, torch.Tensor):  # per-row real lengths (left-padded rows)
        start = torch.minimum(start, (length - blk).clamp_min(0))
    else:
        start = start.clamp_max(max(length - blk, 0))
    span = (start.unsqueeze(-1) + torch.arange(blk, device=scores.device)).clamp_max(n - 1)  # (..., k, blk)
    span = torch.where(
        torch.isfinite(top_peaks).unsqueeze(-1), span, n
    )  # noise centres write to a spare slot
    mask = torch.zeros((*scores.shape[:-1], n + 1), dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, span.flatten(-2), True)[..., :n]


def _top_blocks(peaks: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` highest int32 ``peaks`` ``(..., n_blocks)`` (an order key of
    the block peaks), in no particular order. Equal peaks go to the later block: the top-k runs on
    the unique int64 code ``peak * 2**32 + block``, as the compiled path ranks them, so the choice
    does not depend on how ``topk`` breaks ties on a device."""
    code = torch.add(_offsets(peaks.shape[-1], peaks.device), peaks, alpha=1 << 32)  # int64, one op
    return code.topk(k, dim=-1, sorted=False).indices


_FINITE_BITS = 0x7F800000  # float32 bit patterns below this with the sign bit clear: +0.0 .. max finite
_INT32_MIN = -(2**31)


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


def _dbac_plain(scores, bits, budget: int, num_block: int, theta, span_before: float) -> torch.Tensor:
    """Variant A without sinks for float32 ``scores`` ``(..., n)`` and their ``bits``, from :func:`_plain`.

    The same selection as :func:`_spans_variant_a` + :func:`rank_and_select` on such scores (no
    padding to roll, every token finite), in fewer and cheaper passes over ``n``. Everything runs on
    the int32 bits, which order exactly like the values here (an int32 ``amax`` over short blocks is
    2-4x faster than a float32 one on CPU): block peaks by a values-only ``amax``, the arg-max found
    inside the ``k`` top blocks only, and an int32 ranking key, ``bits - 2**31`` outside the clusters
    and the raw ``bits >= 0`` inside them (a scatter over the ``(..., k * blk)`` span positions),
    which orders tokens exactly like the int64 ``(in cluster, score)`` key of :func:`rank_and_select`.
    """
    n = scores.shape[-1]
    blk, before = _span_geometry(budget, num_block, span_before)
    n_blocks = math.ceil(n / blk)
    int_min = _int32_min(bits.device)
    # the short last block is padded with INT32_MIN, below every plain score's bits
    padded = F.pad(bits, (0, n_blocks * blk - n), value=_INT32_MIN) if n % blk else bits
    # amax, not max / max_pool1d: those also fork threads, which stall for ms on a busy machine
    peaks = padded.view(*scores.shape[:-1], n_blocks, blk).amax(dim=-1)
    if theta is not None:  # masked before the top-k, as in _spans_variant_a: ties break the same way
        if isinstance(theta, float) and theta == theta:  # float32(theta)'s bits order like its value
            peaks.masked_fill_(peaks < _theta_bits(theta, bits.device), int_min)
        else:  # a tensor: the float comparison itself, on a free bit view (a peak is never padding)
            peaks.masked_fill_(peaks.view(torch.float32) < theta, int_min)
    top_blocks = _top_blocks(peaks, min(num_block, n_blocks))
    top_peaks = peaks.gather(-1, top_blocks)
    offsets = _offsets(blk, bits.device)
    cells = torch.add(offsets, top_blocks.unsqueeze(-1), alpha=blk)  # (..., k, blk) top blocks' tokens
    if n % blk:
        cells = cells.clamp_max_(n - 1)  # the short last block repeats its last token
    arg = bits.gather(-1, cells.flatten(-2)).view(cells.shape).argmax(dim=-1, keepdim=True)
    start = cells.gather(-1, arg)  # (..., k, 1) centres: first arg-max of each top block
    start = start.sub_(before).clamp_(0, n - blk) if before else start.clamp_max_(n - blk)
    span = (start + offsets).flatten(-2)  # (..., k * blk)
    key = torch.bitwise_xor(bits, int_min)  # a 0-dim tensor: a Python int operand costs 2x here
    src = bits.gather(-1, span)
    if theta is not None and top_peaks.amin().item() == _INT32_MIN:  # noise centres: no span
        src.view(*top_peaks.shape, blk).masked_fill_((top_peaks == _INT32_MIN).unsqueeze(-1), _INT32_MIN)
        return _select(key.scatter_reduce_(-1, span, src, "amax"), budget)
    return _select(key.scatter_(-1, span, src), budget)


def _compiled_key(scores, budget: int, num_block: int, theta, span_before: float) -> torch.Tensor | None:
    """The plain path's int32 key from :func:`clusterattn.dbac_compiled.plain_key`, or None where it
    does not apply (a tensor threshold included: those stay on the tensor path). Turned off, it
    returns at once."""
    if not dbac_compiled.enabled() or isinstance(theta, torch.Tensor):
        return None
    blk, before = _span_geometry(budget, num_block, span_before)
    return dbac_compiled.plain_key(scores, blk, num_block, _theta_int(theta), before)


@functools.lru_cache(maxsize=256)
def _theta_int(theta: float | None) -> int:
    """``float32(theta)``'s bits as a Python int, ``-2**31`` (nothing below it) for None or NaN."""
    if theta is None or theta != theta:
        return _INT32_MIN
    return _theta_bits(float(theta), torch.device("cpu")).item()


@functools.lru_cache(maxsize=256)
def _theta_bits(theta: float, device: torch.device) -> torch.Tensor:
    """The int32 bits of ``float32(theta)`` as a 0-dim tensor, cached. For scores with the sign bit
    clear, ``bits < _theta_bits(theta)`` is ``scores < theta`` (a negative theta has the sign bit set:
    nothing is below it, as nothing is below it as a float)."""
    return torch.tensor(theta, dtype=torch.float32, device=device).view(torch.int32)


@functools.lru_cache(maxsize=8)
def _int32_min(device: torch.device) -> torch.Tensor:
    """``-2**31`` as a 0-dim int32 tensor on ``device``, cached (read only)."""
    return torch.tensor(_INT32_MIN, dtype=torch.int32, device=device)


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
    if variant == "A" and n_sink == 0:
        # plain scores have every score finite: m = n in every row
        plain_theta = theta if relative_theta is None else _relative_theta(relative_theta, n)
        if (key := _compiled_key(scores, budget, num_block, plain_theta, span_before)) is not None:
            return _select(key, budget)
        if (plain := _plain(scores)) is not None:
            return _dbac_plain(*plain, budget, num_block, plain_theta, span_before)
    if relative_theta is not None:
        finite = torch.isfinite(scores).sum(dim=-1, keepdim=True).clamp_min_(1)
        theta = relative_theta / finite
    # Left padding (leading -inf) is rolled to the end, so that every row's block grid and span
    # clamping start at its first real token: a padded row selects what it would select alone.
    padded = not bool(torch.isfinite(scores[..., 0]).all())
    lead = 0
    if padded:
        lead = (~torch.isfinite(scores)).long().cumprod(dim=-1).sum(dim=-1, keepdim=True)
        scores = scores.gather(-1, (torch.arange(n, device=scores.device) + lead) % n)
    if variant == "A":
        clusters = _spans_variant_a(scores, budget, num_block, theta, span_before, n - lead)
    else:
        clusters = _blocks_variant_b(scores, num_block, theta, expand)
    kept = rank_and_select(scores, budget, sink_mask(scores, n_sink), clusters)
    return ((kept + lead) % n).sort(dim=-1).values if padded else kept


def topk_indices(scores: torch.Tensor, budget: int, n_sink: int = 0) -> torch.Tensor:
    """Plain top-``budget`` of ``scores`` ``(..., n)`` (SnapKV's selection), sorted ascending."""
    _check_int("budget", budget, 1)
    if budget > scores.shape[-1]:
        raise ValueError(f"budget ({budget}) must be <= the number of scored tokens ({scores.shape[-1]})")
    return rank_and_select(scores, budget, sink_mask(scores, n_sink))
