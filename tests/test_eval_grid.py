"""answer_all: one recorded prefill, replayed presses, batched decoding == the live path per press."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import clusterattn as ca
from clusterattn.batching import (
    PADDED,
    batch_key,
    is_padded,
    stack_caches,
    stack_padded,
)
from clusterattn.cache import CompressedLayer
from clusterattn.eval.grid import answer_all
from clusterattn.hf import cache_kwarg, masked_gqa, new_cache
from clusterattn.replay import replay
from conftest import tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES


def recorded(model, seed: int):
    """A 150-token context and a 3-token question, query-agnostic, and its recorded prefill."""
    from clusterattn.steps import prepare_inputs, record_prefill

    inputs = prepare_inputs(
        model, TOK, ids_text(150, seed=seed), "3 4 5", max_new_tokens=4, query_aware=False, answer_prefix="",
        chat=False,
    )  # fmt: skip
    return inputs, record_prefill(model, inputs)[0]


@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_batched_answers_equal_live_generate(family_model, setting):
    family, model = family_model
    presses = {name: PRESS_FACTORIES[name](40) for name in PRESS_FACTORIES}
    # several budgets: uniform presses decode as one left-padded batch, PyramidKV by exact shape
    presses.update(
        full=None,
        snap_48=PRESS_FACTORIES["snapkv"](48),
        cluster_64=PRESS_FACTORIES["clusterattn"](64),
        h2o_24=PRESS_FACTORIES["h2o"](24),
        pyramid_56=PRESS_FACTORIES["pyramidkv"](56),
    )
    context, question = ids_text(150, seed=21), "3 4 5"
    batched, prefill_s = answer_all(
        model, TOK, context=context, question=question, answer_prefix="", presses=presses,
        setting=setting, max_new_tokens=6,
    )  # fmt: skip
    single, _ = answer_all(
        model, TOK, context=context, question=question, answer_prefix="", presses=presses,
        setting=setting, max_new_tokens=6, batch=False,
    )  # fmt: skip
    assert prefill_s > 0
    for name, press in presses.items():
        live = ca.generate(
            model, TOK, context, question, press=press, max_new_tokens=6, query_aware=setting == "query_aware"
        )
        assert batched[name].text == live.text == single[name].text, (family, name)
        assert batched[name].kv_bytes == live.stats["kv_bytes"]
        kept = live.stats["kept_tokens"]
        assert batched[name].kept == (max(kept.values()) if kept else live.stats["compressed_tokens"])


def test_answer_all_rejects_bad_setting(llama):
    with pytest.raises(ValueError, match="setting"):
        answer_all(
            llama, TOK, context=ids_text(50), question="1", answer_prefix="", presses={"full": None},
            setting="aware", max_new_tokens=2,
        )  # fmt: skip


def test_stack_caches_checks_shapes(llama):
    a, b = new_cache(llama), new_cache(llama)
    with torch.no_grad():
        llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{cache_kwarg(llama): a})
        llama(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=True, **{cache_kwarg(llama): b})
    with pytest.raises(ValueError, match="different per-layer lengths"):
        stack_caches([a, b])
    with pytest.raises(ValueError, match="at least one"):
        stack_caches([])
    merged = stack_caches([a, a])
    assert merged.layers[0].keys.shape[0] == 2
    assert torch.equal(merged.layers[1].values[1], a.layers[1].values[0])


def test_stack_caches_padded_decode_like_alone(llama):
    """Caches of different widths in one left-padded batch: each row's next logits equal its own."""
    inputs, record = recorded(llama, seed=8)
    presses = [PRESS_FACTORIES["snapkv"](24), PRESS_FACTORIES["clusterattn"](64), PRESS_FACTORIES["h2o"](40)]
    caches = [replay(record, press)[0] for press in presses]
    assert len({batch_key(cache) for cache in caches}) == 1 and is_padded(batch_key(caches[0]))
    merged, kept_real = stack_padded(caches)
    assert kept_real is None  # compressed layers carry their slot masks themselves
    assert [layer.keys.shape[2] for layer in merged.layers] == [64] * len(merged.layers)
    assert merged.layers[0].slot_mask.sum(-1).tolist() == [24, 64, 40]
    assert merged.get_seq_length() == caches[0].get_seq_length()  # the prompt's logical length
    rest = inputs.rest
    alone = []
    with torch.no_grad():  # no press needed: the caches carry their state
        for cache in caches:
            alone.append(llama(input_ids=rest, use_cache=True, **{cache_kwarg(llama): cache}).logits[:, -1])
        mask = torch.ones(3, merged.get_seq_length() + rest.shape[1], dtype=torch.long)
        batch = llama(
            input_ids=rest.repeat(3, 1), attention_mask=mask, use_cache=True, **{cache_kwarg(llama): merged}
        ).logits[:, -1]
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_stack_padded_checks(llama):
    a, b = new_cache(llama), new_cache(llama)
    with torch.no_grad():
        llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{cache_kwarg(llama): a})
        llama(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True, **{cache_kwarg(llama): b})
    merged, kept_real = stack_padded([a, b])  # plain caches: the mask is the caller's to pass
    assert kept_real.tolist() == [[False, False, True, True, True], [True] * 5]
    assert torch.equal(merged.layers[0].keys[0, :, 2:], a.layers[0].keys[0])
    assert not merged.layers[0].keys[0, :, :2].any()
    assert stack_padded([a, a])[1] is None
    with pytest.raises(ValueError, match="at least one"):
        stack_padded([])
    uneven = stack_caches([a])
    uneven.layers[1] = b.layers[1]
    with pytest.raises(ValueError, match="one length"):
        stack_padded([uneven])


def test_masked_gqa_says_yes_inside_the_block_of_its_own_thread_only(monkeypatch):
    """transformers' GQA predicate answers yes inside a block, for the thread in it; other threads
    and code after the block (nested or overlapping blocks included) get transformers' own answer."""
    import inspect
    import threading

    from transformers.integrations import sdpa_attention

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    mask, key = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    arity = 3 if "value" in inspect.signature(sdpa_attention.use_gqa_in_sdpa).parameters else 2

    def ask():  # (mask, key) in transformers 5.2, (mask, key, value) in 5.24
        return sdpa_attention.use_gqa_in_sdpa(*(mask, key, key)[:arity])

    own = ask()
    assert own is False  # transformers copies KV heads when there is a mask
    inside, entered, done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def other():
        entered.wait()
        seen["other"] = ask()  # while the main thread is inside
        with masked_gqa(how="enable_gqa"):
            inside.set()
            done.wait()  # the main thread leaves its block while this one is still inside
            seen["other inside"] = ask()

    thread = threading.Thread(target=other)
    thread.start()
    with masked_gqa(how="enable_gqa"):
        with masked_gqa(how="enable_gqa"):
            assert ask() is True
        assert ask() is True
        entered.set()
        inside.wait()
    assert ask() is own
    done.set()
    thread.join()
    assert seen == {"other": own, "other inside": True}
    assert ask() is own
    with masked_gqa(active=False, how="enable_gqa"):
        assert ask() is own
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")  # a user's own choice is left alone
    with masked_gqa(how="enable_gqa"):
        assert ask() is own
    with pytest.raises(ValueError, match="how must be one of"), masked_gqa(how="repeat"):
        pass


def test_batch_key(llama):
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), layer)
    assert batch_key(cache) == ("exact", 5, 5)  # a plain cache masks nothing by itself
    assert batch_key(cache, plain=True) == PADDED  # ... unless the decode passes the mask
    cache.layers[1].keys = cache.layers[1].keys[:, :, :3]
    assert batch_key(cache, plain=True) == ("exact", 5, 3)


# (family, presses at budgets 24 / 64 / 40): PyramidKV's layers keep different lengths; on Gemma3
# only the full-attention layers are compressed (the 24-token sliding layers stay whole, and at
# B = 24 a cache holds one length across its layers without being padded like one)
PER_LAYER_CASES = {
    "llama-pyramidkv": ("llama", ["pyramidkv", "pyramidkv", "pyramidkv"]),
    "gemma3-mixed": ("gemma3", ["clusterattn", "snapkv", "pyramidkv"]),
}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(PER_LAYER_CASES))
def test_per_layer_padded_batch_decodes_like_alone(implementation, case):
    """Caches padded layer by layer in one batch (PyramidKV at several budgets; any press on a
    model with uncompressed sliding-window layers): the question chunk and the next decode steps
    give each row the logits it has alone."""
    family, names = PER_LAYER_CASES[case]
    layers = 3 if family == "llama" else 4
    model = tiny_model(family, num_hidden_layers=layers, attn_implementation=implementation)
    inputs, record = recorded(model, seed=9)
    presses = [PRESS_FACTORIES[name](b) for name, b in zip(names, (24, 64, 40), strict=True)]
    caches = [replay(record, press)[0] for press in presses]
    assert len({batch_key(cache) for cache in caches}) == 1
    assert is_padded(batch_key(caches[0])) and batch_key(caches[0])[:2] == (*PADDED, "compressed")
    assert len({tuple(layer.keys.shape[2] for layer in cache.layers) for cache in caches}) == 3
    merged, kept_real = stack_padded(caches)
    assert kept_real is None
    widths = [layer.keys.shape[2] for layer in merged.layers]
    assert widths == [max(c.layers[i].keys.shape[2] for c in caches) for i in range(layers)]
    assert len(set(widths)) > 1  # really padded per layer
    compressed = {i for i, layer in enumerate(caches[0].layers) if isinstance(layer, CompressedLayer)}
    assert {i for i, layer in enumerate(merged.layers) if getattr(layer, "slot_mask", None) is not None} == {
        i for i in compressed if len({c.layers[i].keys.shape[2] for c in caches}) > 1
    }
    for i in set(range(layers)) - compressed:  # uncompressed layers are stacked as they are
        assert torch.equal(merged.layers[i].keys, torch.cat([c.layers[i].keys for c in caches]))
    name, rest, start = cache_kwarg(model), inputs.rest, record.next_pos

    def steps(cache, rows):
        out = []
        with torch.no_grad():  # the question in one chunk, as generation does; no press needed
            pos = start.repeat(rows)[:, None] + torch.arange(rest.shape[1])
            logical = cache.get_seq_length() + rest.shape[1]
            mask = torch.ones(rows, logical, dtype=torch.long)  # the logical length, as generate passes
            ids = rest.repeat(rows, 1)
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, **{name: cache})
            out.append(logits.logits[:, -1])
            token = out[-1].argmax(-1, keepdim=True)
            for _step in range(2):
                pos = pos[:, -1:] + 1
                mask = torch.cat([mask, mask[:, :1]], -1)
                out.append(
                    model(input_ids=token, position_ids=pos, attention_mask=mask, **{name: cache}).logits[
                        :, -1
                    ]
                )
                token = out[-1].argmax(-1, keepdim=True)
        return out

    alone = [steps(cache, 1) for cache in caches]
    batch = steps(merged, 3)
    for step, logits in enumerate(batch):
        torch.testing.assert_close(logits, torch.cat([a[step] for a in alone]), rtol=1e-4, atol=1e-4)


def test_padded_stacking_refuses_mismatched_layers():
    """Caches compressed on different layers, or whose uncompressed layers differ, share no batch."""
    model = tiny_model("gemma3")
    _, record = recorded(model, seed=9)
    a, b = (replay(record, PRESS_FACTORIES["snapkv"](budget))[0] for budget in (40, 64))
    stack_padded([a, b])
    sliding = next(i for i, layer in enumerate(b.layers) if not isinstance(layer, CompressedLayer))
    b.layers[sliding].keys = b.layers[sliding].keys[:, :, 1:]
    b.layers[sliding].values = b.layers[sliding].values[:, :, 1:]
    assert batch_key(a) != batch_key(b)
    with pytest.raises(ValueError, match="uncompressed layer"):
        stack_padded([a, b])
    last = max(i for i, layer in enumerate(b.layers) if isinstance(layer, CompressedLayer))
    b.layers[last] = new_cache(model).layers[last]
    with pytest.raises(ValueError, match="different layers"):
        stack_padded([a, b])


def test_per_layer_padding_refuses_plain_caches(llama):
    a = DynamicCache()
    for layer in range(2):
        a.update(torch.zeros(1, 2, 5 - 2 * layer, 4), torch.zeros(1, 2, 5 - 2 * layer, 4), layer)
    with pytest.raises(ValueError, match="plain caches"):
        stack_padded([a, a])


@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_rows_that_reach_eos_leave_the_batch_and_answer_as_alone(llama, monkeypatch, setting):
    """Greedy decoding drops a row from its batch once it emits EOS (batching.select_rows): every
    row still answers as it would alone, uniform (one padded batch) and PyramidKV (padded per layer)
    rows alike, whether the rows around it stop earlier or later."""
    presses = {"full": None, "snap_48": PRESS_FACTORIES["snapkv"](48), "h2o_24": PRESS_FACTORIES["h2o"](24)}
    for name in ("clusterattn", "pyramidkv"):
        presses |= {f"{name}_{b}": PRESS_FACTORIES[name](b) for b in (40, 64)}
    context, question = ids_text(150, seed=21), "3 4 5"
    run = lambda **kw: answer_all(  # noqa: E731
        llama, TOK, context=context, question=question, answer_prefix="", presses=presses,
        setting=setting, max_new_tokens=8, **kw,
    )[0]  # fmt: skip
    monkeypatch.setattr(llama.generation_config, "eos_token_id", [])
    free = {name: answer.text.split() for name, answer in run().items()}
    # EOS = tokens some rows emit early: those rows stop there, the others run on
    eos = {int(tokens[2 + i % 5]) for i, tokens in enumerate(free.values()) if i % 3 == 1}
    expected = {}
    for name, tokens in free.items():
        stop = next((i for i, t in enumerate(tokens) if int(t) in eos), None)
        expected[name] = tokens if stop is None else tokens[:stop]
    lengths = {len(tokens) for tokens in expected.values()}
    assert min(lengths) < 8 and max(lengths) == 8, "the test needs rows that stop early and rows that run on"
    monkeypatch.setattr(llama.generation_config, "eos_token_id", sorted(eos))
    batched, alone = run(), run(batch=False)
    for name in presses:
        assert batched[name].text.split() == alone[name].text.split() == expected[name], name
        assert batched[name].new_tokens == min(len(expected[name]) + 1, 8), name
