"""The press inside real transformers models: every family, positions, layer-wise compression, batches."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca
from clusterattn.hf import new_cache
from conftest import tiny_model
from test_presses import PRESS_FACTORIES


class IdTokenizer:
    """A tokenizer stand-in for tiny models: text is a space-separated list of token ids."""

    chat_template = None
    bos_token = None
    pad_token_id = 0
    eos_token_id = 127

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


TOK = IdTokenizer()


def ids_text(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return " ".join(str(int(t)) for t in torch.randint(1, 120, (n,), generator=generator))


def capture_positions(model):
    """Record the position ids every rotary-embedding call sees."""
    seen = []
    rotary = next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))

    def record(module, args, kwargs):
        positions = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        if not seen or not torch.equal(seen[-1], positions):  # Gemma3 calls it once per layer type
            seen.append(positions.clone())

    return seen, rotary.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("name", list(PRESS_FACTORIES))
def test_budget_at_least_prompt_is_identical(family_model, name):
    family, model = family_model
    context = ids_text(60)
    reference = ca.generate(model, TOK, context, "5 6 7", max_new_tokens=6)
    out = ca.generate(model, TOK, context, "5 6 7", press=PRESS_FACTORIES[name](64), max_new_tokens=6)
    assert torch.equal(out.tokens, reference.tokens)
    assert out.stats["kept_tokens"] == {}
    ids = torch.tensor([[int(t) for t in context.split()]])
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with PRESS_FACTORIES[name](64)(model):
        pressed = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, pressed)


@pytest.mark.parametrize("name", ["clusterattn", "snapkv", "pyramidkv", "h2o", "streamingllm"])
def test_compressed_generate_matches_model_generate(family_model, name):
    family, model = family_model
    context = ids_text(150, seed=3)
    press = PRESS_FACTORIES[name](40)
    out = ca.generate(model, TOK, context, press=press, max_new_tokens=6)
    full_layers = [
        i for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if t == "full_attention"
    ]
    assert set(out.stats["kept_tokens"]) == set(full_layers or range(model.config.num_hidden_layers))
    assert out.stats["kv_bytes"] < out.stats["kv_bytes_full"]
    ids = torch.tensor([[int(t) for t in context.split()]])
    with press(model) as session:
        pressed = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert session.stats.kept_tokens == out.stats["kept_tokens"]
    assert torch.equal(pressed[0, 150:], out.tokens[0])


def test_positions_after_the_prompt_are_original(family_model):
    family, model = family_model
    context = ids_text(150, seed=4)
    press = ca.ClusterAttnPress(budget=40, window_size=8)
    seen, handle = capture_positions(model)
    try:
        ca.generate(model, TOK, context, press=press, max_new_tokens=3)
        assert seen[0].shape[-1] == 150
        assert [int(p[0, -1]) for p in seen[1:]] == [150, 151]
        seen.clear()
        ids = torch.tensor([[int(t) for t in context.split()]])
        with press(model):
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert [int(p[0, -1]) for p in seen[1:]] == [150, 151]
        seen.clear()
        ca.generate(model, TOK, context, "9 9 9", press=press, max_new_tokens=2, query_aware=False)
        assert seen[1][0].tolist() == [150, 151, 152] and int(seen[2][0, -1]) == 153
    finally:
        handle.remove()


def test_layer_wise_compression_inside_prefill(llama):
    """When layer 1 runs, layer 0's cache is already compressed: full KV of all layers never coexists."""
    lengths = []
    attn1 = llama.model.layers[1].self_attn

    def record(module, args, kwargs):
        cache = next(v for v in kwargs.values() if isinstance(v, ca.hf.Cache))
        lengths.append(cache.layers[0].keys.shape[2])

    handle = attn1.register_forward_pre_hook(record, with_kwargs=True)
    try:
        cache = new_cache(llama)
        with ca.ClusterAttnPress(budget=40, window_size=8)(llama), torch.no_grad():
            llama(torch.randint(1, 120, (1, 150)), **{ca.hf.cache_kwarg(llama): cache})
    finally:
        handle.remove()
    assert lengths == [40]
    assert [layer.keys.shape[2] for layer in cache.layers] == [40, 40]


def test_gemma3_sliding_layers_untouched():
    model = tiny_model("gemma3")
    out = ca.generate(
        model, TOK, ids_text(150), press=ca.ClusterAttnPress(budget=40, window_size=8), max_new_tokens=2
    )
    assert set(out.stats["kept_tokens"]) == {1, 3}


@pytest.mark.parametrize("name", ["clusterattn", "snapkv", "streamingllm", "h2o", "random"])
def test_left_padded_batch_rows_match_single_rows(llama, name):
    press = PRESS_FACTORIES[name](40)
    contexts = [ids_text(150, seed=5), ids_text(110, seed=6), ids_text(30, seed=7)]
    batch = ca.generate(llama, TOK, contexts, press=press, max_new_tokens=5)
    for i, context in enumerate(contexts):
        single = ca.generate(llama, TOK, context, press=press, max_new_tokens=5)
        assert batch.text[i] == single.text
    with press(llama):
        rows = [[int(t) for t in c.split()] for c in contexts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
        pressed = llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pressed[:, width:], batch.tokens)


def test_equal_length_batch(llama):
    contexts = [ids_text(150, seed=8), ids_text(150, seed=9)]
    press = ca.ClusterAttnPress(budget=40, window_size=8)
    batch = ca.generate(llama, TOK, contexts, press=press, max_new_tokens=4)
    assert batch.text == [ca.generate(llama, TOK, c, press=press, max_new_tokens=4).text for c in contexts]


def test_refusals(llama):
    press = ca.ClusterAttnPress(budget=40, window_size=8)
    with pytest.raises(ValueError, match="context"):
        ca.generate(llama, TOK, "   ", press=press)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ca.generate(llama, TOK, ids_text(50), press=press, max_new_tokens=0)
    ids = torch.randint(1, 120, (2, 60))
    right = torch.ones(2, 60, dtype=torch.long)
    right[1, -5:] = 0
    with press(llama), pytest.raises(ValueError, match="left padding"):
        llama(ids, attention_mask=right)
    with pytest.raises(ValueError, match="padded batches"):
        ca.generate(llama, TOK, [ids_text(150), ids_text(100)], press=PRESS_FACTORIES["pyramidkv"](40))


def test_unsupported_model_and_attention():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="model type"), ca.ClusterAttnPress(budget=64)(gpt2):
        pass
    model = tiny_model("llama", attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attention implementation"), ca.ClusterAttnPress(budget=64)(model):
        pass


def test_all_sliding_window_model_is_refused():
    model = tiny_model("mistral", sliding_window=64)
    with pytest.raises(ValueError, match="sliding"), ca.ClusterAttnPress(budget=64)(model):
        pass


def test_eager_attention_matches_sdpa():
    eager = tiny_model("llama", attn_implementation="eager")
    sdpa = tiny_model("llama")
    press = ca.ClusterAttnPress(budget=40, window_size=8)
    context = ids_text(150, seed=10)
    a = ca.generate(eager, TOK, context, press=press, max_new_tokens=5)
    b = ca.generate(sdpa, TOK, context, press=press, max_new_tokens=5)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("query_aware", [True, False])
def test_generate_many_equals_live_generate(family_model, query_aware):
    family, model = family_model
    presses = {name: PRESS_FACTORIES[name](40) for name in PRESS_FACTORIES}
    presses["full"] = None
    context = ids_text(150, seed=11)
    many = ca.generate_many(
        model, TOK, context, "3 4 5", presses=presses, max_new_tokens=5, query_aware=query_aware
    )
    for name, press in presses.items():
        live = ca.generate(
            model, TOK, context, "3 4 5", press=press, max_new_tokens=5, query_aware=query_aware
        )
        assert torch.equal(many[name].tokens, live.tokens), name
        assert many[name].stats["kept_tokens"] == live.stats["kept_tokens"]
        assert many[name].stats["kv_bytes"] == live.stats["kv_bytes"]


def test_generate_many_padded_batch(llama):
    contexts = [ids_text(150, seed=12), ids_text(100, seed=13)]
    presses = {"ca": PRESS_FACTORIES["clusterattn"](40), "snap": PRESS_FACTORIES["snapkv"](40)}
    many = ca.generate_many(llama, TOK, contexts, presses=presses, max_new_tokens=4)
    for name, press in presses.items():
        assert many[name].text == ca.generate(llama, TOK, contexts, press=press, max_new_tokens=4).text


@pytest.mark.parametrize("name", ["pyramidkv", "clusterattn"])
def test_appended_tokens_in_one_chunk_match_token_by_token(family_model, name):
    """Tokens appended after a compressed prompt in one forward see the same keys as one at a time,
    also when the press left layers at different lengths (PyramidKV: masks fitted per layer)."""
    family, model = family_model
    ids = torch.tensor([[int(t) for t in ids_text(150, seed=5).split()]])
    question = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    kwarg = ca.hf.cache_kwarg(model)
    last = {}
    for chunk in (question.shape[1], 1):
        cache = new_cache(model)
        with PRESS_FACTORIES[name](40)(model), torch.no_grad():
            model(ids, **{kwarg: cache})
            for begin in range(0, question.shape[1], chunk):
                logits = model(question[:, begin : begin + chunk], **{kwarg: cache}).logits
        last[chunk] = logits[:, -1]
        if name == "pyramidkv":
            assert len({layer.keys.shape[2] for layer in cache.layers}) > 1
    # Gemma3: the compressed layers' masks follow from their own lengths (cache.CompressedLayer);
    # transformers 5.2's own would let each new token see the later ones
    torch.testing.assert_close(last[question.shape[1]], last[1], rtol=1e-4, atol=1e-4)


def test_fit_mask_drops_or_prepends_visible_prompt_columns():
    causal = torch.ones(4, 9, dtype=torch.bool).tril(diagonal=5)[None, None]  # 4 queries after 5 keys
    shorter = ca.integration.fit_mask(causal, 7)  # a layer holding 3 prompt keys
    assert torch.equal(shorter, torch.ones(4, 7, dtype=torch.bool).tril(diagonal=3)[None, None])
    longer = ca.integration.fit_mask(causal, 12)  # a layer holding 8 prompt keys
    assert torch.equal(longer, torch.ones(4, 12, dtype=torch.bool).tril(diagonal=8)[None, None])
    additive = torch.zeros(1, 1, 4, 9).masked_fill(~causal, float("-inf"))
    assert torch.equal(ca.integration.fit_mask(additive, 12).isinf(), ~longer)
    assert ca.integration.fit_mask(None, 5) is None and ca.integration.fit_mask(causal, 9) is causal


def test_gather_kv_matches_a_naive_per_head_gather():
    torch.manual_seed(0)
    key = torch.randn(2, 40, 3, 8).transpose(1, 2)  # a non-contiguous view, as some caches hold
    value = torch.randn(2, 3, 40, 5)
    idx = torch.stack([torch.randperm(40)[:11].sort().values for _ in range(6)]).view(2, 3, 11)
    keys, values = ca.integration.gather_kv(key, value, idx)
    for b in range(2):
        for h in range(3):
            assert torch.equal(keys[b, h], key[b, h, idx[b, h]])
            assert torch.equal(values[b, h], value[b, h, idx[b, h]])
    assert keys.shape == (2, 3, 11, 8) and values.shape == (2, 3, 11, 5)


def test_a_session_warms_its_press_up_before_compressing(llama, monkeypatch):
    """The press's warm-up (its one-time set-up, if any) runs when the session starts,
    before any compression, so the first prompt's compression time does not include it."""
    events = []
    press = ca.ClusterAttnPress(budget=40, window_size=8)
    monkeypatch.setattr(type(press), "warm_up", lambda self: events.append("warm_up"))
    select = type(press).select_prefix
    monkeypatch.setattr(
        type(press), "select_prefix", lambda self, *a: events.append("select") or select(self, *a)
    )
    with press(llama):
        assert events == ["warm_up"]
        llama(torch.tensor([[int(t) for t in ids_text(60, seed=5).split()]]))
    assert events[0] == "warm_up" and events.count("warm_up") == 1 and "select" in events
