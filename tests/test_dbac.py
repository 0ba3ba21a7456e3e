"""DBAC against a naive loop reference, and its defining properties."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterattn.dbac import dbac, default_num_block, topk_indices

dbac_module = importlib.import_module("clusterattn.dbac")  # the package exports the function as `dbac`


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


def test_default_num_block_caps_the_cluster_count():
    assert [default_num_block(b, 16) for b in (10, 96, 224, 271, 272, 480, 992)] == [1, 6, 14, 16, 16, 16, 16]
    assert default_num_block(992, 16, None) == 62 and default_num_block(992, 16, 8) == 8
    scores = torch.rand(2, 3, 1500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dbac(scores, 992), dbac(scores, 992, num_block=16))
    assert torch.equal(dbac(scores, 992, max_clusters=None), dbac(scores, 992, num_block=62))


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": 11}, ValueError, "budget"),
        ({"budget": 2.0}, TypeError, "budget"),
        ({"budget": 4, "num_block": 0}, ValueError, "num_block"),
        ({"budget": 4, "max_clusters": 0}, ValueError, "max_clusters"),
        ({"budget": 4, "max_clusters": 2.0}, TypeError, "max_clusters"),
        ({"budget": 4, "span_before": 1.0}, ValueError, "span_before"),
        ({"budget": 4, "variant": "C"}, ValueError, "variant"),
        ({"budget": 4, "n_sink": 5}, ValueError, "n_sink"),
        ({"budget": 4, "theta": 0.1, "relative_theta": 2.0}, ValueError, "relative_theta"),
        ({"budget": 4, "relative_theta": -1.0}, ValueError, "relative_theta"),
        ({"budget": 4, "relative_theta": float("nan")}, ValueError, "relative_theta"),
    ],
)
def test_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        dbac(torch.rand(1, 10), **kwargs)


def test_an_int_threshold_is_the_same_number_as_a_float():
    scores = torch.rand(2, 3, 300) * 2
    for kwargs in ({}, {"n_sink": 2}):
        assert torch.equal(dbac(scores, 60, theta=1, **kwargs), dbac(scores, 60, theta=1.0, **kwargs))
    padded = scores.clone()
    padded[0, :, :40] = float("-inf")
    assert torch.equal(dbac(padded, 60, theta=1), dbac(padded, 60, theta=1.0))
    assert torch.equal(dbac(scores, 60, theta=torch.tensor(1)), dbac(scores, 60, theta=1.0))


def test_float64_scores_rank_like_float32():
    scores = torch.rand(3, 4, 500)
    for kwargs in ({}, {"n_sink": 2}, {"variant": "B", "num_block": 7}):
        assert torch.equal(dbac(scores.double(), 90, **kwargs), dbac(scores, 90, **kwargs))
    assert torch.equal(topk_indices(scores.double(), 50), topk_indices(scores, 50))


def naive_padded(scores: torch.Tensor, budget, num_block, theta, span_before, n_sink=0) -> list[int]:
    """:func:`naive_dbac` on one row with left padding: the real tokens alone (the block grid and
    the span clamping start at the first real one); when the budget exceeds them, every real token
    and then the first padding slots (exact ties go to the earlier token)."""
    row = scores.float().tolist()
    lead = next((i for i, v in enumerate(row) if v != float("-inf")), len(row))
    real = row[lead:]
    if budget >= len(real):
        return list(range(budget - len(real))) + list(range(lead, len(row)))
    return [i + lead for i in naive_dbac(real, budget, num_block, theta, span_before, n_sink)]


def naive_topk(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Plain top-k by score, one row at a time; a stable sort: exact ties go to the earlier token."""
    rows = [
        sorted(sorted(range(len(row)), key=lambda i, row=row: row[i], reverse=True)[:budget])
        for row in scores.float().reshape(-1, scores.shape[-1]).tolist()
    ]
    return torch.tensor(rows, dtype=torch.long).view(*scores.shape[:-1], budget)


def naive_batch(scores, budget, num_block, theta, span_before, n_sink=0) -> torch.Tensor:
    """The naive reference over ``(..., n)`` rows; ``theta`` a float, None, or a per-row tensor."""
    rows = scores.reshape(-1, scores.shape[-1])
    thetas = (
        [theta] * len(rows)
        if not isinstance(theta, torch.Tensor)
        else theta.expand(*scores.shape[:-1], 1).reshape(-1).tolist()
    )
    kept = [
        naive_padded(row, budget, num_block, t, span_before, n_sink)
        for row, t in zip(rows, thetas, strict=True)
    ]
    return torch.tensor(kept, dtype=torch.long).view(*scores.shape[:-1], budget)


def _scores(kind: str, shape: tuple, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        return torch.softmax(torch.randn(shape, generator=generator) * 3, dim=-1) * 32
    if kind == "ties":  # few distinct values: ties everywhere, inside blocks and at the budget boundary
        return torch.randint(0, 4, shape, generator=generator).float() / 4
    if kind == "bf16":  # coarse values from a low-precision model, many ties
        return torch.rand(shape, generator=generator).bfloat16()
    scores = torch.rand(shape, generator=generator)
    if kind == "padded":  # left padding, as ClusterAttnPress scores a padded batch
        scores[0, ..., : shape[-1] // 3] = float("-inf")
    elif kind == "signed":  # negative values and -0.0 leave the fast path
        scores = scores - 0.5
        scores[..., 0] = -0.0
    return scores


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 700),
    budget_share=st.floats(0.0, 1.0),
    span_width=st.sampled_from([1, 2, 7, 16, 24]),
    theta_mode=st.sampled_from([None, "quantile", "press", "relative", "all"]),
    span_before=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    n_sink=st.sampled_from([0, 0, 2]),
    kind=st.sampled_from(["softmax", "ties", "bf16", "rand", "padded", "signed"]),
    seed=st.integers(0, 2**16),
)
def test_dbac_matches_the_naive_reference_on_ties_padding_and_low_precision(
    n, budget_share, span_width, theta_mode, span_before, n_sink, kind, seed
):
    """The one fast path (int32 plain scores, int64 otherwise) against the spec's loop transcription, ties,
    padding, bf16 and signed scores included (equal block peaks: the later block; equal scores: the
    earlier token)."""
    scores = _scores(kind, (2, 3, n), seed)
    budget = max(n_sink, 1, min(n, round(n * budget_share)))
    num_block = max(1, budget // span_width)
    theta = None
    if theta_mode == "quantile":  # a float32 value: the fast paths compare in float32
        theta = float(scores.float().clamp_min(0).quantile(0.7))
    elif theta_mode in ("press", "relative"):  # uniform mass over each row's real tokens
        theta = 32 / torch.isfinite(scores[:, :1].float()).sum(dim=-1, keepdim=True).clamp_min(1)
    elif theta_mode == "all":  # every block is noise: no cluster at all
        theta = float("inf")
    kwargs = {"num_block": num_block, "theta": theta, "span_before": span_before, "n_sink": n_sink}
    expected = naive_batch(scores, budget, **kwargs)
    if theta_mode == "relative":  # the same threshold, found by dbac itself (a float when unpadded)
        kwargs = {**kwargs, "theta": None, "relative_theta": 32.0}
    assert torch.equal(dbac(scores, budget, **kwargs), expected)
    assert torch.equal(topk_indices(scores, budget), naive_topk(scores, budget))


@pytest.mark.parametrize(("length", "budget"), [(4096, 128), (8192, 512), (16384, 1024)])
def test_dbac_matches_the_naive_reference_at_benchmark_shapes(length, budget):
    """SmolLM2 shapes (batch 1, 3 KV heads, window 32) with the press's relative threshold."""
    scores = _scores("softmax", (1, 3, length - 32), length)
    theta = 32 / torch.isfinite(scores[:, :1]).sum(dim=-1, keepdim=True)
    for num_block in (max(1, (budget - 32) // 16), 1, budget - 32):
        kwargs = {"num_block": num_block, "theta": theta}
        expected = naive_batch(scores, budget - 32, num_block, theta, 0.0)
        assert torch.equal(dbac(scores, budget - 32, **kwargs), expected)
        assert torch.equal(dbac(scores, budget - 32, num_block=num_block, relative_theta=32.0), expected)
    assert dbac_module._plain(scores) is not None  # the int32 key is the one exercised
    assert dbac_module._plain(_scores("padded", (2, 3, 50), 0)) is None


def test_non_contiguous_and_batched_rows_match():
    """A transposed (non-contiguous) view and extra leading dimensions select what each row alone does."""
    scores = _scores("softmax", (3, 2, 4, 300), 5).transpose(1, 2)
    whole = dbac(scores, 40, relative_theta=32.0)
    for index in ((0, 0), (2, 3), (1, 1)):
        alone = dbac(scores[index].contiguous(), 40, relative_theta=32.0)
        assert torch.equal(whole[index], alone)


def test_equal_block_peaks_go_to_the_later_block():
    """Three blocks share the top peak and two clusters fit: the later two win, on every path (plain,
    padded, with a threshold) and whatever ``topk`` would do with the tie on a device."""
    scores = torch.full((64,), 0.1)
    scores[torch.arange(64) % 8 == 2] = 0.2
    for block in (1, 3, 5):
        scores[block * 8 + 2] = 0.9
    expected = list(range(26, 34)) + list(range(42, 50))  # spans of 8 from the arg-max at 26 and 42
    padded = torch.cat([torch.full((5,), float("-inf")), scores])
    assert dbac(scores, 16, num_block=2).tolist() == expected
    assert dbac(scores, 16, num_block=2, theta=0.5).tolist() == expected
    assert dbac(scores.bfloat16(), 16, num_block=2).tolist() == expected
    assert dbac(padded, 16, num_block=2).tolist() == [i + 5 for i in expected]
    assert naive_dbac(scores.tolist(), 16, 2, None, 0.0) == expected
