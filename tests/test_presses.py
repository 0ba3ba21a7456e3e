"""Every press through one matrix of invariants, plus validation of every parameter."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca

PRESS_FACTORIES = {
    "clusterattn": lambda b: ca.ClusterAttnPress(budget=b, window_size=8),
    "clusterattn_recent": lambda b: ca.ClusterAttnPress(budget=b, window_size=8, recent_ratio=0.5),
    "clusterattn_leverage": lambda b: ca.ClusterAttnPress(budget=b, window_size=8, scorer="leverage"),
    "clusterattn_b": lambda b: ca.ClusterAttnPress(budget=b, window_size=8, variant="B", num_block=6),
    "snapkv": lambda b: ca.SnapKVPress(budget=b, window_size=8),
    "chunkkv": lambda b: ca.ChunkKVPress(budget=b, window_size=8, chunk_size=8),
    "streamingllm": lambda b: ca.StreamingLLMPress(budget=b),
    "h2o": lambda b: ca.H2OPress(budget=b, window_size=8, chunk_size=16),
    "pyramidkv": lambda b: ca.PyramidKVPress(budget=b, window_size=8),
    "random": lambda b: ca.RandomPress(budget=b, window_size=8),
}


def qk(batch=2, seq=120, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, seq, 16, generator=generator), torch.randn(
        batch, 2, seq, 16, generator=generator
    )


@pytest.mark.parametrize("name", list(PRESS_FACTORIES))
@pytest.mark.parametrize("layer", [0, 3])
def test_invariants(name, layer):
    press = PRESS_FACTORIES[name](40)
    query, key = qk()
    idx = press.select(query, key, 0.25, layer=layer, n_layers=4)
    budget = press.layer_budget(120, layer, 4)
    assert idx.shape == (2, 2, budget)  # budget honoured per layer and head
    assert idx.dtype == torch.long
    assert (idx[..., 1:] > idx[..., :-1]).all()  # unique, ascending
    assert idx.min() >= 0 and idx.max() < 120
    if name != "streamingllm":
        window = set(range(120 - press.window_size, 120))
        assert all(window <= set(row.tolist()) for row in idx.flatten(0, 1))
    else:
        assert all({0, 1, 2, 3} <= set(row.tolist()) for row in idx.flatten(0, 1))
    # batch rows are independent: row 1 alone gives the same selection
    alone = press.select(query[1:], key[1:], 0.25, layer=layer, n_layers=4)
    assert torch.equal(alone[0], idx[1])


@pytest.mark.parametrize("name", list(PRESS_FACTORIES))
def test_untouched_when_prompt_fits(name):
    press = PRESS_FACTORIES[name](120)
    query, key = qk()
    assert all(press.select(query, key, 0.25, layer=i, n_layers=4) is None for i in range(4))


@pytest.mark.parametrize("name", list(PRESS_FACTORIES))
def test_compression_ratio(name):
    factory = PRESS_FACTORIES[name]
    press = type(factory(40))(**{**factory(40).__dict__, "budget": None, "compression_ratio": 0.5})
    query, key = qk()
    idx = press.select(query, key, 0.25, layer=0, n_layers=1)
    assert idx.shape[-1] == 60


def test_pyramid_budgets_average_to_budget():
    press = ca.PyramidKVPress(budget=72, window_size=8)
    budgets = [press.layer_budget(10_000, i, 30) for i in range(30)]
    assert budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 30 - 72) <= 1


@pytest.mark.parametrize(
    ("build", "error", "word"),
    [
        (lambda: ca.ClusterAttnPress(budget=32), ValueError, "budget"),  # budget <= window
        (lambda: ca.ClusterAttnPress(budget=10, window_size=10), ValueError, "budget"),
        (lambda: ca.ClusterAttnPress(budget=64, window_size=0), ValueError, "window_size"),
        (lambda: ca.ClusterAttnPress(budget=64, num_block=0), ValueError, "num_block"),
        (lambda: ca.ClusterAttnPress(compression_ratio=1.0), ValueError, "compression_ratio"),
        (lambda: ca.ClusterAttnPress(compression_ratio=-0.1), ValueError, "compression_ratio"),
        (lambda: ca.ClusterAttnPress(), ValueError, "budget or compression_ratio"),
        (
            lambda: ca.ClusterAttnPress(budget=64, compression_ratio=0.5),
            ValueError,
            "budget or compression_ratio",
        ),
        (lambda: ca.ClusterAttnPress(budget="64"), TypeError, "budget"),
        (lambda: ca.ClusterAttnPress(budget=64, aggregation="median"), ValueError, "aggregation"),
        (lambda: ca.ClusterAttnPress(budget=64, variant="C"), ValueError, "variant"),
        (lambda: ca.ClusterAttnPress(budget=64, span_before=1.5), ValueError, "span_before"),
        (lambda: ca.ClusterAttnPress(budget=64, max_clusters=0), ValueError, "max_clusters"),
        (lambda: ca.ClusterAttnPress(budget=64, recent_ratio=1.5), ValueError, "recent_ratio"),
        (lambda: ca.ClusterAttnPress(budget=64, recent_ratio=float("nan")), ValueError, "recent_ratio"),
        (lambda: ca.ClusterAttnPress(budget=64, recent_ratio="0.5"), TypeError, "recent_ratio"),
        (lambda: ca.ClusterAttnPress(budget=64, scorer="keys"), ValueError, "scorer"),
        (lambda: ca.SnapKVPress(budget=64, kernel_size=4), ValueError, "kernel_size"),
        (lambda: ca.SnapKVPress(budget=64, pooling="min"), ValueError, "pooling"),
        (lambda: ca.StreamingLLMPress(budget=4), ValueError, "budget"),
        (lambda: ca.ChunkKVPress(budget=64, chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_parameters(build, error, word):
    with pytest.raises(error, match=word):
        build()


def test_default_clusters_widen_past_the_cap():
    """16-token spans up to 16 clusters; a larger budget widens the spans (max_clusters=None: no cap)."""
    scores = torch.softmax(torch.randn(1, 3, 2000, generator=torch.Generator().manual_seed(0)) * 3, -1) * 32
    for budget, clusters in ((128, 6), (256, 14), (512, 16), (1024, 16)):
        b = budget - 32
        press = ca.ClusterAttnPress(budget=budget)
        expected = ca.dbac(scores, b, num_block=clusters, relative_theta=32.0)
        assert torch.equal(press.select_prefix(scores, b), expected)
    uncapped = ca.ClusterAttnPress(budget=1024, max_clusters=None).select_prefix(scores, 992)
    assert torch.equal(uncapped, ca.dbac(scores, 992, num_block=62, relative_theta=32.0))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("n_sink", [0, 4])
def test_recent_ratio_matches_reference(ratio, n_sink):
    """``recent_ratio`` keeps the last ``round(ratio * b)`` prefix tokens outright and clusters the
    earlier ones with the rest of the budget; a left-padded row keeps what it keeps alone."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.softmax(torch.randn(2, 3, 300, generator=generator) * 3, -1) * 32
    b = 90
    press = ca.ClusterAttnPress(budget=b + 32, recent_ratio=ratio, n_sink=n_sink)
    kept = press.select_prefix(scores, b)
    for row, got in zip(scores.flatten(0, 1), kept.flatten(0, 1), strict=True):  # naive, by row
        recent = min(round(ratio * b), b - n_sink)
        head = set()
        if recent < b:
            head = set(ca.dbac(row[: 300 - recent], b - recent, relative_theta=32.0, n_sink=n_sink).tolist())
        assert got.tolist() == sorted(head | set(range(300 - recent, 300)))
    padded = torch.cat([torch.full((2, 3, 50), float("-inf")), scores], dim=-1)
    assert torch.equal(press.select_prefix(padded, b), kept + 50)


def test_leverage_scorer_clusters_the_keys_leverage_rescaled_to_the_window_mass():
    """``scorer="leverage"``: DBAC's input is each key's leverage among its head's keys, times
    ``window_size / sum``; an outlier key's span is kept; the queries play no part."""
    query, key = qk(seq=300)
    key[0, 1, 100:104] += 8.0  # a short run of outlier keys, far from the end
    press = ca.ClusterAttnPress(budget=72, window_size=8, scorer="leverage")
    idx = press.select(query, key, 0.25, layer=0, n_layers=1)
    assert {100, 101, 102, 103} <= set(idx[0, 1].tolist())
    assert torch.equal(press.select(torch.zeros_like(query), key, 0.25, layer=0, n_layers=1), idx)
    lev = ca.scoring.key_leverage_scores(key)
    expected_scores = (lev * 8 / lev.sum(dim=-1, keepdim=True))[..., :292]
    scores = press.prefix_scores(query, key, 0.25, layer=0, pad_mask=None)
    torch.testing.assert_close(scores, expected_scores)
    prefix = ca.dbac(expected_scores, 64, num_block=4, relative_theta=8.0)
    assert torch.equal(idx[..., :64], prefix)
    # left padding: a padded row keeps what it keeps alone, shifted
    pad = torch.ones(2, 340, dtype=torch.bool)
    pad[:, :40] = False
    padded_q = torch.cat([torch.zeros(2, 4, 40, 16), query], dim=2)
    padded_k = torch.cat([torch.full((2, 2, 40, 16), 5.0), key], dim=2)
    got = press.select(padded_q, padded_k, 0.25, layer=0, n_layers=1, pad_mask=pad)
    assert torch.equal(got, idx + 40)


def test_from_profile(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text('{"config": {"num_block": 4, "span_before": 0.1, "window_size": 16}}')
    press = ca.ClusterAttnPress.from_profile(path, budget=128)
    assert (press.num_block, press.span_before, press.window_size, press.budget) == (4, 0.1, 16, 128)
    path.write_text('{"num_blocks": 4}')
    with pytest.raises(ValueError, match="unknown"):
        ca.ClusterAttnPress.from_profile(path, budget=128)


def test_snapkv_pooling_matches_loop_reference():
    from clusterattn.presses.snapkv import pool_scores

    scores = torch.rand(2, 3, 40)
    scores[0, :, :5] = float("-inf")
    for pooling in ("max", "avg"):
        fast = pool_scores(scores, 7, pooling)
        for b in range(2):
            for h in range(3):
                row = [v if v != float("-inf") else None for v in scores[b, h].tolist()]
                for i in range(40):
                    window = [v for v in row[max(0, i - 3) : i + 4] if v is not None]  # padding: outside
                    if scores[b, h, i] == float("-inf"):
                        assert fast[b, h, i] == float("-inf")
                    else:
                        expected = max(window) if pooling == "max" else sum(window) / len(window)
                        assert abs(fast[b, h, i].item() - expected) < 1e-6


def test_chunkkv_selection_matches_loop_reference():
    press = ca.ChunkKVPress(budget=8 + 8, window_size=8, chunk_size=3)
    scores = torch.rand(2, 2, 23)
    fast = press.select_prefix(scores, 8)
    for b in range(2):
        for h in range(2):
            row = scores[b, h].tolist()
            sums = [sum(row[i : i + 3]) for i in range(0, 23, 3)]
            chunks = sorted(range(len(sums)), key=lambda c: sums[c], reverse=True)[: 8 // 3]
            chosen = {i for c in chunks for i in range(3 * c, min(3 * c + 3, 23))}
            ranked = sorted(range(23), key=lambda i: (i in chosen, row[i]), reverse=True)[:8]
            assert fast[b, h].tolist() == sorted(ranked)
