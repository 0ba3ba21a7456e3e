"""compact(): the same kept tokens as the transformers integration, laid out for vLLM's slots."""

from __future__ import annotations

import torch

import clusterattn as ca
from clusterattn.integration import gather_kv
from clusterattn.vllm.compaction import compact, gather_tokens


def _qkv(seq: int, q_heads: int = 6, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, q_heads, dim, generator=gen) * 3
    k = torch.randn(seq, kv_heads, dim, generator=gen) * 3
    v = torch.randn(seq, kv_heads, dim, generator=gen)
    return q, k, v


def test_gather_tokens_picks_per_head_rows():
    _, k, _ = _qkv(10)
    idx = torch.tensor([[0, 3, 9], [1, 2, 8]])
    out = gather_tokens(k, idx)
    assert out.shape == (3, 2, 16)
    assert torch.equal(out[1, 0], k[3, 0]) and torch.equal(out[2, 1], k[8, 1])


def test_compact_matches_the_transformers_gather():
    q, k, v = _qkv(300)
    press = ca.ClusterAttnPress(budget=96, window_size=16)
    keys, values = compact(press, q, k, v, 0.25, prompt_len=300, layer=3, n_layers=8)
    bq, bk, bv = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    idx = press.select(bq, bk, 0.25, layer=3, n_layers=8)
    ref_k, ref_v = gather_kv(bk, bv, idx)
    assert torch.equal(keys, ref_k[0].transpose(0, 1)) and torch.equal(values, ref_v[0].transpose(0, 1))
    assert keys.shape == (96, 2, 16)


def test_tokens_after_the_prompt_are_kept_whole():
    q, k, v = _qkv(310)
    press = ca.SnapKVPress(budget=64, window_size=8)
    head, _ = compact(press, q[:300], k[:300], v[:300], 0.25, prompt_len=300, layer=0, n_layers=1)
    keys, values = compact(press, q, k, v, 0.25, prompt_len=300, layer=0, n_layers=1)
    assert keys.shape == (74, 2, 16)
    assert torch.equal(keys[:64], head)
    assert torch.equal(keys[64:], k[300:]) and torch.equal(values[64:], v[300:])


def test_short_prompt_is_left_alone():
    q, k, v = _qkv(50)
    assert compact(ca.ClusterAttnPress(budget=64), q, k, v, 0.25, prompt_len=50, layer=0, n_layers=1) is None
