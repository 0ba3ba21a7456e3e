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


@pytest.mark.skipif(torch.cuda.is_available(), reason="masked_gqa leaves CUDA machines to transformers")
def test_compiled_step_attends_grouped_heads_whole():
    """On CPU the compiled step hands sdpa the cache's grouped KV heads with ``enable_gqa`` under its
    mask, instead of transformers' copy of every KV head per query head (a full 8k cache copied 7x
    per layer and step on Qwen2.5-Coder-0.5B), in one graph."""
    from clusterattn import compiled

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    model = tiny_model("qwen2")  # its own instance: the step compiled here is cached on the model
    step = torch.compile(compiled._step, backend=backend, dynamic=False)
    model.__dict__["_clusterattn_steps"] = {"inductor": step}
    torch._dynamo.reset()
    ca.generate(model, TOK, CONTEXTS["padded"], max_new_tokens=4, compile=True)
    assert len(graphs) == 1
    calls = [line for line in graphs[0].splitlines() if "scaled_dot_product_attention(" in line]
    assert calls and all("enable_gqa = True" in line for line in calls)
