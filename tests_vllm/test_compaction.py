"""compact(): the same kept tokens as the transformers integration, laid out for vLLM's slots; reading
the paged cache back and a re-prefill's decode eviction (:mod:`clusterattn.vllm.decode_eviction`)."""

from __future__ import annotations

import types

import pytest
import torch

import clusterattn as ca
from clusterattn.integration import gather_kv
from clusterattn.vllm.compaction import compact, gather_tokens
from clusterattn.vllm.decode_eviction import Track, _Item, _prefill_indices, read_cache
from clusterattn.vllm.spec import physical_length


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


@pytest.mark.parametrize(
    ("isa", "dtype", "block_size", "head_dim"),
    [("vec", torch.float32, 128, 64), ("vec16", torch.float32, 16, 64), ("vec", torch.bfloat16, 128, 64),
     ("vec16", torch.bfloat16, 128, 80)],
)  # fmt: skip
def test_read_cache_returns_what_the_backend_wrote(isa, dtype, block_size, head_dim):
    """The paged cache's packing differs by ISA (keys transposed in a block with ``vec``): read back
    through the probed layout, every slot's keys and values come back exact."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = types.SimpleNamespace(attn_type=AttentionType.DECODER, kv_cache_dtype="auto")
    impl.do_kv_cache_update = types.MethodType(CPUAttentionBackendImpl.do_kv_cache_update, impl)
    layer = types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    cache = torch.zeros(6, 3, block_size, 2 * head_dim, dtype=dtype)
    slots = torch.randperm(6 * block_size, generator=torch.Generator().manual_seed(0))[:90]
    k, v = (torch.randn(90, 3, head_dim).to(dtype) for _ in range(2))
    impl.do_kv_cache_update(layer, k, v, cache, slots)
    keys, values = read_cache(impl, layer, cache, slots)
    assert torch.equal(keys, k) and torch.equal(values, v)


def test_a_preempted_prefill_lands_on_the_formula_length():
    """Prompt 300 kept to 64, then 57 earlier output tokens re-prefilled with decode budget 40 and
    interval 16: the prompt's selection, one re-selection to 40 after output token 49 (the last
    point the schedule re-selects: 1, 17, 33, 49), then the 8 tokens fed after it, unchanged."""
    q, k, _ = _qkv(357)
    press = ca.DecodingPress(ca.SnapKVPress(budget=64, window_size=8), budget=40, interval=16)
    track = Track("r", press, prompt_len=300, kept=64, n_layers=1)
    after = track.physical(357)
    assert after == physical_length(300, 64, 57, 40, 16) == 48
    item = _Item(track, row=0, start=0, count=357, before=0, after=after, prefill=True)
    idx = _prefill_indices(item, q, k, 0.25, 0)
    assert idx.shape == (2, 48)
    assert torch.equal(idx[:, 40:], torch.arange(349, 357).expand(2, -1))
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending, as the slots hold them
    prompt_kept = compact(press.press, q[:300], k[:300], k[:300], 0.25, prompt_len=300, layer=0, n_layers=1)[
        0
    ]
    chosen = gather_tokens(k, idx[:, :40])
    assert all(
        any(torch.equal(row, kept) for kept in prompt_kept[:, 0]) for row in chosen[idx[0, :40] < 300, 0]
    )
