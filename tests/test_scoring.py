"""Window and accumulated scores against eager attention probabilities (the naive reference), key
leverage against the hat matrix."""

from __future__ import annotations

import pytest
import torch

from clusterattn.scoring import accumulated_scores, key_leverage_scores, window_scores


def naive_probs(query, key, scaling, pad_mask=None):
    """Full L x L causal softmax attention, repeated KV heads (what output_attentions would return)."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    logits = query @ key.transpose(-1, -2) * scaling
    seq = key.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None]
    if pad_mask is not None:
        allowed = allowed & pad_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0)


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
def test_window_scores_match_full_attention(aggregation):
    torch.manual_seed(0)
    query, key = torch.randn(2, 6, 50, 8), torch.randn(2, 3, 50, 8)
    probs = naive_probs(query, key, 0.3)[:, :, -10:, :40].sum(2)  # (b, 6, 40)
    grouped = probs.view(2, 3, 2, 40)
    expected = {"mean": grouped.mean(2), "sum": grouped.sum(2), "max": grouped.amax(2)}[aggregation]
    got = window_scores(query, key, 0.3, 10, aggregation=aggregation)
    torch.testing.assert_close(got, expected)


def test_accumulated_scores_match_full_attention_in_chunks():
    torch.manual_seed(1)
    query, key = torch.randn(1, 4, 70, 8), torch.randn(1, 2, 70, 8)
    expected = naive_probs(query, key, 0.35).sum(2).view(1, 2, 2, 70).mean(2)
    for chunk in (7, 64, 512):
        torch.testing.assert_close(accumulated_scores(query, key, 0.35, chunk_size=chunk), expected)


@pytest.mark.parametrize("observed", [1, 9, 70])
def test_accumulated_scores_of_the_last_queries_only(observed):
    """While decoding only the last queries exist: their causal attention rows, summed."""
    torch.manual_seed(4)
    query, key = torch.randn(1, 4, 70, 8), torch.randn(1, 2, 70, 8)
    expected = naive_probs(query, key, 0.35)[:, :, -observed:].sum(2).view(1, 2, 2, 70).mean(2)
    for chunk in (4, 128):
        got = accumulated_scores(query[:, :, -observed:], key, 0.35, chunk_size=chunk)
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="queries"):
        accumulated_scores(torch.randn(1, 4, 71, 8), key, 0.35)


def test_padding_scores_minus_inf_and_real_rows_unchanged():
    torch.manual_seed(2)
    query, key = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    pad = torch.ones(1, 40, dtype=torch.bool)
    pad[:, :5] = False
    scores = window_scores(query, key, 0.3, 8, pad_mask=pad)
    assert torch.isinf(scores[..., :5]).all()
    expected = naive_probs(query, key, 0.3, pad)[:, :, -8:, :32].sum(2).view(1, 2, 2, 32).mean(2)
    torch.testing.assert_close(scores[..., 5:], expected[..., 5:])
    unpadded = window_scores(query[:, :, 5:], key[:, :, 5:], 0.3, 8)
    torch.testing.assert_close(scores[..., 5:], unpadded)


def test_window_size_checked():
    with pytest.raises(ValueError, match="window_size"):
        window_scores(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 1.0, 8)


@pytest.mark.parametrize("chunk", [5, 16, 128])
def test_accumulated_scores_with_left_padding_match_full_attention(chunk):
    """Rows padded differently in one batch: pads score -inf, pad queries add nothing, and the real
    tokens score as the naive full-attention column sums."""
    torch.manual_seed(3)
    query, key = torch.randn(2, 6, 37, 8), torch.randn(2, 3, 37, 8)
    pad = torch.ones(2, 37, dtype=torch.bool)
    pad[0, :9] = False
    expected = naive_probs(query, key, 0.3, pad).sum(2).view(2, 3, 2, 37).amax(2)
    got = accumulated_scores(query, key, 0.3, aggregation="max", pad_mask=pad, chunk_size=chunk)
    assert torch.isinf(got[0, :, :9]).all() and torch.isfinite(got[0, :, 9:]).all()
    torch.testing.assert_close(got[0, :, 9:], expected[0, :, 9:])
    torch.testing.assert_close(got[1], expected[1])
    alone = accumulated_scores(query[:1, :, 9:], key[:1, :, 9:], 0.3, aggregation="max", chunk_size=chunk)
    torch.testing.assert_close(got[:1, :, 9:], alone)


def naive_leverage(key):
    """Diagonal of the hat matrix ``X pinv(X)`` of one head's centred keys ``(seq, dim)``, fp64."""
    x = key.double() - key.double().mean(dim=0)
    return (x @ torch.linalg.pinv(x)).diagonal().float()


def test_key_leverage_scores_match_the_hat_matrix():
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(2, 3, 200, 16, generator=generator)
    key[0, 1, 77] += 6.0  # an outlier key
    scores = key_leverage_scores(key)
    assert scores.shape == (2, 3, 200)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(scores[b, h], naive_leverage(key[b, h]), atol=1e-5, rtol=1e-4)
    assert scores[0, 1].argmax() == 77
    torch.testing.assert_close(scores.sum(dim=-1), torch.full((2, 3), 16.0), atol=1e-3, rtol=0)


def test_key_leverage_scores_left_padding_scores_each_row_as_if_alone():
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(2, 2, 120, 8, generator=generator)
    pad_mask = torch.ones(2, 120, dtype=torch.bool)
    pad_mask[1, :30] = False
    key[1, :, :30] = 1e3  # whatever sits in the padding must not matter
    scores = key_leverage_scores(key, pad_mask=pad_mask)
    assert torch.isinf(scores[1, :, :30]).all() and (scores[1, :, :30] < 0).all()
    for h in range(2):
        torch.testing.assert_close(scores[1, h, 30:], naive_leverage(key[1, h, 30:]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores[0, h], naive_leverage(key[0, h]), atol=1e-5, rtol=1e-4)


def test_key_leverage_scores_of_a_rank_deficient_head_stay_finite():
    """Fewer keys than dimensions, or keys in a subspace: the ridge keeps the solve defined."""
    key = torch.randn(1, 1, 5, 16, generator=torch.Generator().manual_seed(2))
    flat = torch.zeros(1, 1, 40, 16)
    flat[..., 0] = torch.arange(40.0)
    for k in (key, flat):
        scores = key_leverage_scores(k)
        assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1 + 1e-4).all()
