"""``generate(..., compile=...)``: a static cache and a compiled decode step give the eager path's
tokens in fp32, for the full cache and the presses, every family, padded batches, both settings."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca
from conftest import FAMILIES, tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES

MODELS = {family: tiny_model(family) for family in FAMILIES}
CONTEXTS = {"one": ids_text(110, seed=3), "padded": [ids_text(110, seed=3), ids_text(70, seed=4)]}


# (press, layout, query-aware): the full cache and per-layer budgets too; PyramidKV refuses padding
CASES = [
    (None, "padded", True),
    ("clusterattn", "padded", False),
    ("snapkv", "one", True),
    ("pyramidkv", "one", False),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_decode_equals_eager(family):
    model = MODELS[family]
    torch._dynamo.reset()
    for press, layout, query_aware in CASES:
        built = None if press is None else PRESS_FACTORIES[press](40)
        kwargs = dict(press=built, max_new_tokens=6, query_aware=query_aware)
        eager = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", **kwargs)
        with torch._dynamo.config.patch(recompile_limit=64):  # Gemma3's own static sliding layers
            compiled = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", compile="eager", **kwargs)
        assert torch.equal(compiled.tokens, eager.tokens), (family, press, layout, query_aware)
        assert compiled.text == eager.text
        assert compiled.stats["kept_tokens"] == eager.stats["kept_tokens"]


def test_compiled_decode_with_inductor():
    model = MODELS["llama"]
    press = PRESS_FACTORIES["clusterattn"](40)
    eager = ca.generate(model, TOK, CONTEXTS["padded"], press=press, max_new_tokens=6)
    torch._dynamo.reset()
    compiled = ca.generate(model, TOK, CONTEXTS["padded"], press=press, max_new_tokens=6, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)


def test_a_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        ca.generate(MODELS["llama"], TOK, ids_text(60), max_new_tokens=2, compile="tensorrt")


@pytest.mark.parametrize("how", ["enable_gqa", "pack"])
def test_compiled_step_attends_grouped_heads_whole(monkeypatch, how):
    """The compiled step hands sdpa each KV head once, in one graph, with the eager path's tokens:
    with ``enable_gqa`` under its mask (the CPU default), or with the query heads packed per KV head
    (the CUDA default; transformers 5.24), instead of transformers' copy of every KV head per query
    head (a full 8k cache copied 7x per layer and step on Qwen2.5-Coder-0.5B). With transformers 5.2,
    which has no packing, ``pack`` leaves the copy."""
    from transformers.integrations import sdpa_attention

    from clusterattn import compiled, hf

    monkeypatch.setattr(hf, "_default_gqa_mode", lambda: how)
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    graphs, calls = [], set()

    def backend(gm, example_inputs):  # records (query heads, query rows, key heads, enable_gqa)
        graphs.append(gm)
        for node in gm.graph.nodes:
            if getattr(node.target, "__name__", "") == "scaled_dot_product_attention":
                query, key = (arg.meta["example_value"].shape for arg in node.args[:2])
                calls.add((query[1], query[2], key[1], node.kwargs.get("enable_gqa", False)))
        return gm.forward

    model = tiny_model("qwen2")  # its own instance: the step compiled here is cached on the model
    model.__dict__["_clusterattn_steps"] = {
        "inductor": torch.compile(compiled._step, backend=backend, dynamic=False)
    }
    torch._dynamo.reset()
    out = ca.generate(model, TOK, CONTEXTS["padded"], max_new_tokens=4, compile=True)
    assert torch.equal(out.tokens, ca.generate(model, TOK, CONTEXTS["padded"], max_new_tokens=4).tokens)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert kv < heads and len(graphs) == 1
    if how == "enable_gqa":
        assert calls == {(heads, 1, kv, True)}
    elif hasattr(sdpa_attention, "pack_gqa"):
        assert calls == {(kv, heads // kv, kv, False)}
    else:
        assert calls == {(heads, 1, heads, False)}
