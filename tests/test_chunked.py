"""Chunked prefill (``prefill_chunk``): each decoder layer over slices of the prompt gives the one-pass
prefill's logits, kept tokens and generated tokens, for every family (Gemma3's sliding-window layers
included), padded batches, every press kind (H2O reads every query, DecodingPress a window),
dynamic and static caches; bit-identical at multiples of 512 tokens with sdpa on CPU; the wrapper is
inert outside the block and leaves the state dict unchanged."""

from __future__ import annotations

import threading

import pytest
import torch

import clusterattn as ca
from clusterattn.chunked import decoder_layers, install_chunking, prefill_chunks, uninstall_chunking
from clusterattn.hf import cache_kwarg
from conftest import FAMILIES, tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES

MODELS = {family: tiny_model(family) for family in FAMILIES}
CONTEXTS = {"one": ids_text(110, seed=3), "padded": [ids_text(110, seed=3), ids_text(70, seed=4)]}
CASES = [
    (None, "padded"),
    ("clusterattn", "padded"),
    ("snapkv", "one"),
    ("pyramidkv", "one"),
    ("h2o", "padded"),
    ("streamingllm", "one"),
    ("decoding", "one"),
]


def _press(name):
    if name == "decoding":  # re-selects every 4 tokens once 24 are held: during these 6 tokens too
        return ca.DecodingPress(PRESS_FACTORIES["clusterattn"](40), budget=24, interval=4)
    return None if name is None else PRESS_FACTORIES[name](40)


def _kept(cache) -> list[torch.Tensor]:
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_equals_one_pass(family):
    model = MODELS[family]
    for press, layout in CASES:
        kwargs = dict(press=_press(press), max_new_tokens=6)
        one = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", **kwargs)
        for chunk in (1, 16, 37):
            chunked = ca.generate(model, TOK, CONTEXTS[layout], "3 4 5", prefill_chunk=chunk, **kwargs)
            assert torch.equal(chunked.tokens, one.tokens), (family, press, layout, chunk)
            assert chunked.stats["kept_tokens"] == one.stats["kept_tokens"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("press", ["clusterattn", "h2o"])
def test_chunked_prefill_keeps_the_same_cache_and_logits(family, press):
    """The kept keys and the prompt's logits themselves, not only the argmax."""
    model = MODELS[family]
    ids = torch.tensor([[int(t) for t in ids_text(120, seed=8).split()]])
    outputs = []
    for chunk in (None, 13):
        cache = ca.CompressedCache(model, PRESS_FACTORIES[press](40))
        with torch.no_grad(), prefill_chunks(model, chunk):
            logits = model(ids, **{cache_kwarg(model): cache}).logits
        outputs.append((logits, _kept(cache)))
    (logits, keys), (chunked_logits, chunked_keys) = outputs
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-5, atol=1e-5)
    assert [k.shape for k in chunked_keys] == [k.shape for k in keys]
    for a, b in zip(chunked_keys, keys, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_overwrite_keeps_one_residual_stream_and_the_same_outputs(family):
    """``overwrite=True``: each chunk's output replaces its input rows, so the final norm reads the
    embeddings' own storage; logits and kept keys are those of chunks without it."""
    model = MODELS[family]
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    ids = torch.tensor([[int(t) for t in ids_text(120, seed=4).split()]])
    pointers = {}
    hooks = [
        inner.embed_tokens.register_forward_hook(lambda m, a, out: pointers.update(embed=out.data_ptr())),
        inner.norm.register_forward_pre_hook(lambda m, a: pointers.update(norm=a[0].data_ptr())),
    ]
    outputs = []
    try:
        for overwrite in (False, True):
            cache = ca.CompressedCache(model, PRESS_FACTORIES["clusterattn"](40))
            with torch.no_grad(), prefill_chunks(model, 13, overwrite=overwrite):
                logits = model(ids, **{cache_kwarg(model): cache}).logits
            outputs.append((logits, _kept(cache)))
            assert (pointers["norm"] == pointers["embed"]) == overwrite
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1], strict=True))


def test_hidden_states_stay_right_without_overwrite():
    """The default keeps every layer's input: ``output_hidden_states`` equals one pass's."""
    model = MODELS["llama"]
    ids = torch.tensor([[int(t) for t in ids_text(90, seed=6).split()]])
    states = []
    for chunk in (None, 16):
        with torch.no_grad(), prefill_chunks(model, chunk):
            states.append(model(ids, output_hidden_states=True, use_cache=True).hidden_states)
    for a, b in zip(*states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunks_of_512_are_bit_identical_with_sdpa():
    """torch's CPU sdpa kernel splits keys in blocks of 512: chunks on that grid give the same bits."""
    model = tiny_model("llama", seed=5)
    ids = torch.randint(1, 120, (1, 1300), generator=torch.Generator().manual_seed(0))
    outputs = []
    for chunk in (None, 512):
        cache = ca.CompressedCache(model, ca.ClusterAttnPress(budget=200, window_size=16))
        with torch.no_grad(), prefill_chunks(model, chunk):
            logits = model(ids, **{cache_kwarg(model): cache}).logits
        outputs.append((logits, _kept(cache), cache.stats.kept_tokens))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][2] == outputs[1][2]
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1], strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_into_a_static_cache(family):
    """The compiled path: a compressed static cache, and the full cache's plain static layers."""
    model = MODELS[family]
    for press in (None, "clusterattn"):
        kwargs = dict(press=_press(press), max_new_tokens=5, compile="eager")
        one = ca.generate(model, TOK, CONTEXTS["one"], "3 4 5", **kwargs)
        chunked = ca.generate(model, TOK, CONTEXTS["one"], "3 4 5", prefill_chunk=16, **kwargs)
        assert torch.equal(chunked.tokens, one.tokens), (family, press)
        assert chunked.stats["kept_tokens"] == one.stats["kept_tokens"]


def test_a_static_sliding_window_layer_is_refused():
    """Gemma3's static sliding layers are ring buffers whose columns a chunk's mask cannot address."""
    with pytest.raises(ValueError, match="sliding-window layers"):
        ca.generate(MODELS["gemma3"], TOK, CONTEXTS["one"], "3 4 5", compile="eager", prefill_chunk=16)


def test_the_wrapper_is_inert_outside_the_block_in_other_threads_and_for_decode_steps():
    model = tiny_model("llama", seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 120, (1, 50))
    calls = []
    for mlp in (layer.mlp for layer in decoder_layers(model)):
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
        with prefill_chunks(model, 8):
            worker = threading.Thread(target=lambda: seen.append(model(ids).logits))
            worker.start()
            worker.join()
            calls.clear()
            cache = ca.CompressedCache(model, PRESS_FACTORIES["snapkv"](20))
            model(ids, **{cache_kwarg(model): cache})
            assert calls == [8] * 6 + [2] + [8] * 6 + [2]  # two layers, 50 tokens in chunks of 8
            calls.clear()
            model(ids[:, :10], **{cache_kwarg(model): cache})  # a second turn: one pass
            assert calls == [10, 10]
        assert torch.equal(seen[0], reference)  # another thread's call: one pass
        uninstall_chunking(model)
        assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
        assert torch.equal(model(ids).logits, reference)


def test_a_bad_chunk_or_no_cache_is_refused():
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="prefill_chunk"):
            ca.generate(MODELS["llama"], TOK, ids_text(60), max_new_tokens=2, prefill_chunk=bad)
    model = MODELS["llama"]
    with torch.no_grad(), prefill_chunks(model, 8), pytest.raises(ValueError, match="use_cache=True"):
        model(torch.randint(1, 120, (1, 30)), use_cache=False)
