"""MLP chunking (``mlp_chunk``): the MLPs over slices of the prompt give the unchunked
prefill's logits, kept tokens and generated tokens, every family, padded batches, every press
kind; the wrapper is inert outside the block and leaves the state dict unchanged."""

from __future__ import annotations

import threading

import pytest
import torch

import clusterattn as ca
from clusterattn.chunked import install_chunking, mlp_chunks, mlp_modules, uninstall_chunking
from clusterattn.hf import cache_kwarg
from conftest import FAMILIES, tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES

MODELS = {family: tiny_model(family) for family in FAMILIES}
CONTEXTS = {"one": ids_text(110, seed=3), "padded": [ids_text(110, seed=3), ids_text(70, seed=4)]}
CASES = [(None, "padded"), ("clusterattn", "padded"), ("snapkv", "one"), ("pyramidkv", "one")]


def _kept(cache) -> list[torch.Tensor]:
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_equals_one_pass(family):
    model = MODELS[family]
    for press, layout in CASES:
        built = None if press is None else PRESS_FACTORIES[press](40)
        kwargs = dict(press=built, max_new_tokens=6)
        one = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", **kwargs)
        for chunk in (1, 16, 37):
            chunked = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", mlp_chunk=chunk, **kwargs)
            assert torch.equal(chunked.tokens, one.tokens), (family, press, layout, chunk)
            assert chunked.stats["kept_tokens"] == one.stats["kept_tokens"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_prefill_keeps_the_same_cache_and_logits(family):
    """The kept keys and the prompt's logits themselves, not only the argmax."""
    model = MODELS[family]
    ids = torch.tensor([[int(t) for t in ids_text(120, seed=8).split()]])
    outputs = []
    for chunk in (None, 13):
        cache = ca.CompressedCache(model, PRESS_FACTORIES["clusterattn"](40))
        with torch.no_grad(), mlp_chunks(model, chunk):
            logits = model(ids, **{cache_kwarg(model): cache}).logits
        outputs.append((logits, _kept(cache)))
    (logits, keys), (chunked_logits, chunked_keys) = outputs
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-5, atol=1e-5)
    assert [k.shape for k in chunked_keys] == [k.shape for k in keys]
    for a, b in zip(chunked_keys, keys, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_wrapper_is_inert_outside_the_block_and_in_other_threads():
    model = tiny_model("llama", seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 120, (1, 50))
    calls = []
    for mlp in mlp_modules(model):
        mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    with torch.no_grad():
        reference = model(ids).logits
        install_chunking(model)
        install_chunking(model)  # idempotent
        assert set(model.state_dict()) == set(state)
        calls.clear()
        assert torch.equal(model(ids).logits, reference)  # not asked for chunks: one pass
        assert calls == [50, 50]
        seen = []
        with mlp_chunks(model, 8):
            worker = threading.Thread(target=lambda: seen.append(model(ids).logits))
            worker.start()
            worker.join()
        assert torch.equal(seen[0], reference)  # another thread's call: one pass
        uninstall_chunking(model)
        assert all("forward" not in mlp.__dict__ for mlp in mlp_modules(model))
        assert torch.equal(model(ids).logits, reference)


def test_a_bad_chunk_is_refused_before_any_prefill():
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="mlp_chunk"):
            ca.generate(MODELS["llama"], TOK, ids_text(60), max_new_tokens=2, mlp_chunk=bad)
