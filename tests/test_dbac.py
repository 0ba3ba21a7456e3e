"""DBAC against a naive loop reference, and its defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterattn.dbac import dbac, topk_indices


def naive_dbac(scores: list[float], budget, num_block, theta, span_before, n_sink=0, variant="A", expand=1):
    """Direct transcription of the DBAC spec, one row at a time with Python loops."""
    n = len(scores)
    sinks = set(range(min(n_sink, n)))
    if variant == "A":
        blk = max(1, budget // num_block)
        peaks = []
        for j in range(math.ceil(n / blk)):
            segment = scores[j * blk : (j + 1) * blk]
            best = max(segment)
            peaks.append((best, j * blk + segment.index(best)))
        seeds = [p for p in peaks if theta is None or p[0] >= theta]
        seeds = sorted(seeds, reverse=True)[:num_block]
        before = min(blk - 1, round(span_before * blk))
        cluster = set()
        for _, centre in seeds:
            start = min(max(centre - before, 0), max(n - blk, 0))
            cluster.update(range(start, start + blk))
    else:
        blk = math.ceil(n / num_block)
        n_blocks = math.ceil(n / blk)
        centre = [theta is None or max(scores[j * blk : (j + 1) * blk]) >= theta for j in range(n_blocks)]
        chosen = {j for j in range(n_blocks) if any(centre[max(0, j - expand) : j + expand + 1])}
        cluster = {i for i in range(n) if i // blk in chosen}
    ranked = sorted(range(n), key=lambda i: (i in sinks, i in cluster, scores[i]), reverse=True)
    return sorted(ranked[:budget])


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(4, 300),
    budget_share=st.floats(0.01, 1.0),
    num_block=st.integers(1, 40),
    theta_q=st.sampled_from([None, 0.2, 0.5, 0.9]),
    span_before=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    variant=st.sampled_from(["A", "B"]),
    n_sink=st.integers(0, 3),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_dbac_matches_naive_reference(
    n, budget_share, num_block, theta_q, span_before, variant, n_sink, rows, seed
):
    budget = max(n_sink, 1, min(n, round(n * budget_share)))
    scores = torch.rand(rows, 2, n, generator=torch.Generator().manual_seed(seed))
    theta = None if theta_q is None else float(scores.quantile(theta_q))
    fast = dbac(
        scores,
        budget,
        num_block=num_block,
        theta=theta,
        span_before=span_before,
        n_sink=n_sink,
        variant=variant,
    )
    assert fast.shape == (rows, 2, budget)
    for r in range(rows):
        for h in range(2):
            expected = naive_dbac(
                scores[r, h].tolist(), budget, num_block, theta, span_before, n_sink, variant
            )
            assert fast[r, h].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_num_block_equal_budget_is_topk(n, share, seed):
    budget = max(1, min(n, round(n * share)))
    scores = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(seed))
    expected = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(dbac(scores, budget, num_block=budget), expected)
    assert torch.equal(dbac(scores, budget, num_block=budget, theta=0.5), expected)
    assert torch.equal(topk_indices(scores, budget), expected)


def test_planted_clusters_recovered_whole_where_topk_fragments():
    """A 7-token 'number' whose first token holds the peak: DBAC keeps it whole, top-k does not."""
    generator = torch.Generator().manual_seed(0)
    n, budget = 1000, 64
    scores = torch.rand(4, n, generator=generator) * 0.01
    spans = []
    for row in range(4):
        start = 100 + 200 * row
        scores[row, start] = 5.0  # the peak, on the first digit
        scores[row, start + 1 : start + 24] = 0.02  # the rest: barely above noise
        spikes = torch.randperm(n, generator=generator)[:80]  # scattered noise spikes
        scores[row, spikes] = torch.maximum(scores[row, spikes], torch.tensor(0.05))
        scores[row, start : start + 24] = torch.maximum(scores[row, start : start + 24], torch.tensor(0.02))
        scores[row, start] = 5.0
        spans.append(set(range(start, start + 24)))
    kept = dbac(scores, budget, num_block=2, span_before=0.0)
    top = topk_indices(scores, budget)
    for row in range(4):
        assert spans[row] <= set(kept[row].tolist())
        assert not spans[row] <= set(top[row].tolist())


@pytest.mark.parametrize("variant", ["A", "B"])
def test_exact_count_unique_sorted(variant):
    scores = torch.rand(3, 5, 777)
    kept = dbac(scores, 100, variant=variant)
    assert kept.shape == (3, 5, 100)
    assert (kept[..., 1:] > kept[..., :-1]).all()
    assert kept.min() >= 0 and kept.max() < 777


def test_padding_never_selected_while_real_tokens_remain():
    scores = torch.rand(2, 1, 50)
    scores[0, :, :20] = float("-inf")
    kept = dbac(scores, 30)
    assert kept[0].min() >= 20
    kept = dbac(scores, 40)  # 10 pads must be kept: they come first, real tokens all kept
    assert (kept[0, 0, :10] < 20).all() and kept[0, 0, 10:].tolist() == list(range(20, 50))


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": 11}, ValueError, "budget"),
        ({"budget": 2.0}, TypeError, "budget"),
        ({"budget": 4, "num_block": 0}, ValueError, "num_block"),
        ({"budget": 4, "span_before": 1.0}, ValueError, "span_before"),
        ({"budget": 4, "variant": "C"}, ValueError, "variant"),
        ({"budget": 4, "n_sink": 5}, ValueError, "n_sink"),
    ],
)
def test_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        dbac(torch.rand(1, 10), **kwargs)


def test_float64_scores_rank_like_float32():
    scores = torch.rand(3, 4, 500)
    for kwargs in ({}, {"n_sink": 2}, {"variant": "B", "num_block": 7}):
        assert torch.equal(dbac(scores.double(), 90, **kwargs), dbac(scores, 90, **kwargs))
    assert torch.equal(topk_indices(scores.double(), 50), topk_indices(scores, 50))
