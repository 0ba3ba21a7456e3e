"""The mass-vs-spans ablation's per-head choice (benchmarks/mass_vs_spans.py) against a naive
per-head reference, and its two fixed modes against the presses they stand for."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import clusterattn as ca


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mass_vs_spans.py"
    spec = importlib.util.spec_from_file_location("mass_vs_spans", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def qk(seed=0, batch=2, q_heads=4, kv_heads=2, seq=120, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, q_heads, seq, dim, generator=g)
    k = 2 * torch.randn(batch, kv_heads, seq, dim, generator=g)
    return q, k


def naive_rows(q, k, scaling, rows, n):
    """Summed causal attention of query positions ``rows`` over keys ``:n``, one head at a time,
    max over each KV head's query heads."""
    batch, q_heads, _, _ = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(batch, kv_heads, n)
    for b in range(batch):
        for h in range(kv_heads):
            per_q = []
            for g in range(group):
                total = [0.0] * n
                for p in rows:
                    logits = [float(q[b, h * group + g, p] @ k[b, h, j]) * scaling for j in range(p + 1)]
                    top = max(logits)
                    z = sum(math.exp(x - top) for x in logits)
                    for j in range(n):
                        total[j] += math.exp(logits[j] - top) / z
                per_q.append(total)
            out[b, h] = torch.tensor(per_q).amax(0)
    return out


def test_validated_choice_matches_naive(bench):
    q, k = qk()
    w, budget, scaling = 8, 40, 8**-0.5
    seq, n, prefix = q.shape[2], q.shape[2] - 8, 32
    press = bench.HeadChoicePress(budget=budget, window_size=w, mode="validated")
    early = naive_rows(q, k, scaling, range(seq - w, seq - w // 2), n)
    late = naive_rows(q, k, scaling, range(seq - w // 2, seq), n)
    scores = press.prefix_scores(q, k, scaling, layer=0, pad_mask=None)
    kept = press.select(q, k, scaling, layer=0, n_layers=1)
    heads = press.span_heads(q, k, scaling, budget)
    assert heads.any() and not heads.all()  # seed 0 exercises both choices
    for b in range(2):
        for h in range(2):
            spans = press.select_prefix(early[b : b + 1, h : h + 1], prefix)[0, 0].tolist()
            top = sorted(range(n), key=lambda j: -float(early[b, h, j]))[:prefix]
            mass = lambda idx: sum(float(late[b, h, j]) for j in idx)  # noqa: E731, B023
            assert bool(heads[b, h]) == (mass(spans) > mass(top))
            chosen = press.select_prefix(scores, prefix) if heads[b, h] else ca.topk_indices(scores, prefix)
            assert kept[b, h].tolist() == chosen[b, h].tolist() + list(range(n, seq))


def test_fixed_modes_are_the_presses_they_name(bench):
    q, k = qk(seed=1)
    scaling = 8**-0.5
    spans = bench.HeadChoicePress(budget=40, window_size=8, mode="spans").select(
        q, k, scaling, layer=0, n_layers=1
    )
    reference = ca.ClusterAttnPress(budget=40, window_size=8).select(q, k, scaling, layer=0, n_layers=1)
    assert torch.equal(spans, reference)
    top = bench.HeadChoicePress(budget=40, window_size=8, mode="topk")
    scores = top.prefix_scores(q, k, scaling, layer=0, pad_mask=None)
    kept = top.select(q, k, scaling, layer=0, n_layers=1)
    assert torch.equal(kept[..., :32], ca.topk_indices(scores, 32))
    with pytest.raises(ValueError, match="mode"):
        bench.HeadChoicePress(budget=40, mode="nope")
