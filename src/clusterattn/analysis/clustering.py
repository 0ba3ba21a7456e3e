"""Kept sets of the clustering ablation, all at the same budget, from the same window scores.

Every method turns window scores ``(..., n)`` (one row per layer and KV head, ``n`` prefix tokens)
into exactly ``budget`` kept prefix indices per row, so that they differ only in *which* tokens
they keep:

- ``dbac``: ClusterAttn's DBAC (:func:`clusterattn.dbac.dbac`) with the press's threshold;
- ``kmeans``: scikit-learn K-means (``num_block`` clusters) on the positions of the tokens whose
  score reaches the threshold, weighted by their scores; each cluster claims a span of the same
  width as DBAC's (``budget // num_block``) centred on its weighted centroid;
- ``dbscan``: scikit-learn DBSCAN on the same positions (``eps`` tokens, a core point needs
  ``min_samples`` of weight, a token's weight being its score over the threshold); a cluster is
  the range from its first to its last member (noise belongs to none), and the clusters with the
  most score mass are kept whole while they fit the budget;
- ``topk``: plain top-``budget`` of the scores; ``snapkv``: top-``budget`` after SnapKV's 1-D
  max-pooling (kernel 7).

The cluster methods finish the way DBAC does (:func:`clusterattn.dbac.rank_and_select`): tokens in
a claimed span rank first, over-full spans are trimmed by score, spare budget goes to the best
remaining tokens. scikit-learn fits one row at a time (it has no batched API); everything else is
vectorised.
"""

from __future__ import annotations

import numpy as np
import torch

from clusterattn.dbac import dbac, default_num_block, rank_and_select, topk_indices
from clusterattn.presses.snapkv import pool_scores

METHODS = ("dbac", "kmeans", "dbscan", "topk", "snapkv")


def uniform_threshold(scores: torch.Tensor, window_size: int, alpha: float = 1.0) -> torch.Tensor:
    """ClusterAttn's default threshold ``alpha * w / n`` (the uniform mass), ``(..., 1)``."""
    return torch.full((*scores.shape[:-1], 1), alpha * window_size / scores.shape[-1])


def _span_mask(n: int, starts: list[int], width: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for start in starts:
        lo = min(max(0, start), max(0, n - width))
        mask[lo : lo + width] = True
    return mask


def kmeans_clusters(scores: torch.Tensor, budget: int, num_block: int, theta: torch.Tensor, seed: int = 0):
    """Bool ``(..., n)`` spans of K-means clusters of the above-threshold positions (see module doc)."""
    from threadpoolctl import threadpool_limits

    rows = scores.reshape(-1, scores.shape[-1]).double().numpy()
    limits = theta.expand(*scores.shape[:-1], 1).reshape(-1).double().numpy()
    width = max(1, budget // num_block)
    masks = np.zeros(rows.shape, dtype=bool)
    with threadpool_limits(1):  # tiny 1-D fits: thread start-up costs 30x the work (and fights torch)
        _fit_kmeans(rows, limits, num_block, width, seed, masks)
    return torch.from_numpy(masks).view(scores.shape)


def _fit_kmeans(rows, limits, num_block, width, seed, masks) -> None:
    from sklearn.cluster import KMeans

    for r, (row, limit) in enumerate(zip(rows, limits, strict=True)):  # sklearn fits one row at a time
        where = np.flatnonzero(row >= limit)
        if where.size == 0:
            continue
        k = min(num_block, where.size)
        fit = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(
            where[:, None].astype(float), sample_weight=row[where]
        )
        centres = np.rint(fit.cluster_centers_[:, 0]).astype(int)
        masks[r] = _span_mask(row.size, list(centres - width // 2), width)


def dbscan_clusters(
    scores: torch.Tensor, budget: int, theta: torch.Tensor, eps: float = 2.0, min_samples: int = 2
) -> torch.Tensor:
    """Bool ``(..., n)``: the DBSCAN clusters of the above-threshold positions (see module doc) that
    fit the budget whole, densest (most score mass) first."""
    from threadpoolctl import threadpool_limits

    rows = scores.reshape(-1, scores.shape[-1]).double().numpy()
    limits = theta.expand(*scores.shape[:-1], 1).reshape(-1).double().numpy()
    masks = np.zeros(rows.shape, dtype=bool)
    with threadpool_limits(1):
        _fit_dbscan(rows, limits, budget, eps, min_samples, masks)
    return torch.from_numpy(masks).view(scores.shape)


def _fit_dbscan(rows, limits, budget, eps, min_samples, masks) -> None:
    from sklearn.cluster import DBSCAN

    for r, (row, limit) in enumerate(zip(rows, limits, strict=True)):  # sklearn fits one row at a time
        where = np.flatnonzero(row >= limit)
        if where.size == 0:
            continue
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(
            where[:, None].astype(float), sample_weight=row[where] / limit
        )
        ranges = []
        for label in set(labels.tolist()) - {-1}:
            lo, hi = int(where[labels == label].min()), int(where[labels == label].max()) + 1
            ranges.append((float(row[lo:hi].sum()), lo, hi))
        used = 0
        for _, lo, hi in sorted(ranges, reverse=True):
            if used + hi - lo <= budget:
                masks[r, lo:hi] = True
                used += hi - lo


def select_prefix(
    method: str,
    scores: torch.Tensor,
    budget: int,
    *,
    window_size: int,
    num_block: int | None = None,
    span_width: int = 16,
    alpha: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """``(..., budget)`` kept prefix indices of ``method`` (one of :data:`METHODS`), ascending.

    Args:
        scores: ``(..., n)`` window scores, e.g. ``(layers, kv_heads, prefix)``.
        budget: prefix tokens kept per row (the press budget minus the window).
        window_size: the observation window, for the threshold ``alpha * w / n``.
        num_block: clusters for DBAC and K-means; default the press's
            (:func:`~clusterattn.dbac.default_num_block`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= budget <= scores.shape[-1]:
        raise ValueError(f"budget must be in [1, {scores.shape[-1]}], got {budget}")
    num_block = num_block or default_num_block(budget, span_width)
    theta = uniform_threshold(scores, window_size, alpha)
    if method == "dbac":
        return dbac(scores, budget, num_block=num_block, theta=theta)
    if method == "topk":
        return topk_indices(scores, budget)
    if method == "snapkv":
        return topk_indices(pool_scores(scores, 7, "max"), budget)
    if method == "kmeans":
        clusters = kmeans_clusters(scores, budget, num_block, theta, seed)
    else:
        clusters = dbscan_clusters(scores, budget, theta)
    return rank_and_select(scores, budget, clusters)
