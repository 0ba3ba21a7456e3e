"""Keys turned back to before RoPE: against a naive rotation, against the keys a real forward
computes before its rotary embedding (every family), and through the press, the live prefill
and the grid's replay."""

from __future__ import annotations

import math

import pytest
import torch

import clusterattn as ca
from clusterattn.hf import cache_kwarg, rope_frequencies
from clusterattn.replay import replay
from clusterattn.rope import unrotate
from clusterattn.vllm.spec import parse_press
from conftest import tiny_model
from test_eval_grid import recorded
from test_presses import qk


def naive_rotate(x: torch.Tensor, inv_freq: torch.Tensor, start: int = 0) -> torch.Tensor:
    """RoPE pair by pair: dims ``(i, i + r/2)`` of the key at position ``p`` turned by ``p * inv_freq[i]``."""
    out = x.clone().double()
    half = inv_freq.shape[0]
    for p in range(x.shape[2]):
        for i in range(half):
            angle = (start + p) * float(inv_freq[i])
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., p, i].double(), x[..., p, half + i].double()
            out[..., p, i], out[..., p, half + i] = a * c - b * s, b * c + a * s
    return out.float()


def test_unrotate_inverts_a_naive_rotation_including_partial_rotary():
    x = torch.randn(2, 3, 20, 16)
    full = 1.0 / (100.0 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(unrotate(naive_rotate(x, full), full), x, atol=1e-5, rtol=1e-5)
    partial = full[:4]  # 8 of 16 dims rotated, the rest passed through
    back = unrotate(naive_rotate(x, partial), partial)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inv_freq"):
        unrotate(x, torch.ones(9))


def pre_rope_keys(model, input_ids) -> dict[int, torch.Tensor]:
    """Each layer's keys before RoPE, ``(batch, kv_heads, seq, head_dim)``, from a forward hook on
    the last module before the rotary embedding (``k_norm`` where the family has one, else ``k_proj``)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    found: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        module = getattr(attn, "k_norm", None) or attn.k_proj

        def hook(_module, _args, output, i=i):
            if output.ndim == 4 and output.shape[1] == config.num_key_value_heads:  # already heads first
                found[i] = output.detach().clone()
            else:
                batch, seq = output.shape[:2]
                found[i] = output.reshape(batch, seq, -1, head_dim).transpose(1, 2).detach().clone()

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_unrotate_gives_back_the_keys_the_model_computed_before_rope(family):
    """The frequencies read from the model and the layout match what its attention does: the
    cached keys of every full-attention layer, turned back, are the keys before the rotary embedding."""
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(0))
    before = pre_rope_keys(model, ids)
    cache = ca.hf.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_kwarg(model): cache}, use_cache=True)
    frequencies = rope_frequencies(model)
    for i in ca.cache.compressible_layers(model.config):
        back = unrotate(cache.layers[i].keys, frequencies(i))
        torch.testing.assert_close(back, before[i], atol=1e-4, rtol=1e-4)


def test_rope_frequencies_refuses_a_model_without_a_rotary_module():
    with pytest.raises(ValueError, match="inv_freq"):
        rope_frequencies(torch.nn.Linear(2, 2))


def test_unrotating_press_scores_the_keys_before_rope_and_ignores_a_position_shift():
    query, before = qk(seq=300)
    before[0, 1, 100:104] += 8.0  # a short run of outlier keys, far from the end
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    press = ca.ClusterAttnPress(budget=72, window_size=8, scorer="leverage", unrotate_keys=True)
    plain = ca.ClusterAttnPress(budget=72, window_size=8, scorer="leverage")
    expected = plain.select(query, before, 0.25, layer=0, n_layers=1)
    got = press.select(query, naive_rotate(before, inv_freq), 0.25, layer=0, n_layers=1, inv_freq=inv_freq)
    assert torch.equal(got, expected)
    assert {100, 101, 102, 103} <= set(got[0, 1].tolist())
    # positions that start elsewhere (generate's numbering of a left-padded row) select the same
    shifted = naive_rotate(before, inv_freq, start=37)
    assert torch.equal(press.select(query, shifted, 0.25, layer=0, n_layers=1, inv_freq=inv_freq), expected)
    with pytest.raises(ValueError, match="inverse frequencies"):
        press.select(query, shifted, 0.25, layer=0, n_layers=1)


def test_unrotate_keys_validation():
    with pytest.raises(ValueError, match="scorer='leverage'"):
        ca.ClusterAttnPress(budget=64, unrotate_keys=True)
    with pytest.raises(TypeError, match="unrotate_keys"):
        ca.ClusterAttnPress(budget=64, scorer="leverage", unrotate_keys=1)
    press = ca.ClusterAttnPress(budget=64, scorer="leverage", unrotate_keys=True)
    with pytest.raises(ValueError, match="before RoPE"):
        ca.DecodingPress(press, budget=128)
    assert parse_press("clusterattn:budget=64,scorer=leverage,unrotate_keys=true").reads_unrotated_keys
    with pytest.raises(ValueError, match="before RoPE"):  # a 400 in the server
        parse_press("clusterattn:budget=64,scorer=leverage,unrotate_keys=true,decode_budget=128")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_live_chunked_and_replayed_prefills_keep_what_the_press_selects_from_pre_rope_keys(family):
    """Inside the model (padded batch, whole or chunked) and on the grid's recorded prefill alike,
    the kept keys are the post-RoPE keys at the indices the plain leverage press picks from the
    keys before RoPE."""
    model = tiny_model(family)
    tokens = torch.randint(1, 128, (2, 90), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, :20] = 0
    inputs = {"input_ids": tokens, "attention_mask": mask}
    press = ca.ClusterAttnPress(budget=40, window_size=8, scorer="leverage", unrotate_keys=True)
    full = ca.hf.DynamicCache(config=model.config)
    compressed = ca.CompressedCache(model, press)
    with torch.no_grad():
        model(**inputs, **{cache_kwarg(model): full}, use_cache=True)
        model(**inputs, **{cache_kwarg(model): compressed}, use_cache=True)
    chunked = ca.CompressedCache(model, press)  # the layer-by-layer chunked prefill compresses alike
    with torch.no_grad(), ca.prefill_chunks(model, 32):
        model(**inputs, **{cache_kwarg(model): chunked}, use_cache=True)
    frequencies = rope_frequencies(model)
    pad_mask = mask.bool()
    for i in ca.cache.compressible_layers(model.config):
        keys = full.layers[i].keys
        before = unrotate(keys, frequencies(i))
        plain = ca.ClusterAttnPress(budget=40, window_size=8, scorer="leverage")
        idx = plain.select(None, before, 1.0, layer=0, n_layers=1, pad_mask=pad_mask)
        kept, _ = ca.cache.gather_kv(keys, full.layers[i].values, idx)
        torch.testing.assert_close(compressed.layers[i].keys, kept)
        torch.testing.assert_close(chunked.layers[i].keys, kept, atol=1e-5, rtol=1e-5)

    record = recorded(model, seed=2)[1]  # the grid's recorded prefill (query-agnostic, as it is used)
    cache, _ = replay(record, press)
    for i in record.layers:
        keys = record.cache.layers[i].keys
        idx = plain.select(
            None, unrotate(keys, frequencies(i)), 1.0, layer=0, n_layers=1, pad_mask=record.pad_mask
        )
        torch.testing.assert_close(cache.layers[i].keys, ca.cache.gather_kv(keys, keys, idx)[0])
