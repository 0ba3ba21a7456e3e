"""The compressed cache carries its own truth: however transformers is driven, it decodes right.

(a) ``ca.generate``, ``model.generate`` under the press and a manual decode loop after the block
give identical tokens; (b) a second turn equals a naive reference that rebuilds the same cache by
hand; (c) threads with different presses (and none) on one model equal the sequential runs;
(d) a compressed static cache, with its decode step compiled, equals the dynamic cache, and what
is not supported is refused with a clear error; (e) padded rows equal single-row runs for every
uniform press; (f) bad press values fail in the constructor.
"""

from __future__ import annotations

import inspect
import math
import threading

import pytest
import torch
from transformers import DynamicCache, StaticCache

import clusterattn as ca
from clusterattn.cache import CompressedCache, CompressedLayer
from clusterattn.hf import cache_kwarg
from clusterattn.integration import capturing_queries, compressible_layers
from clusterattn.static_cache import CompressedStaticCache
from conftest import FAMILIES, tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES

UNIFORM = [name for name in PRESS_FACTORIES if name != "pyramidkv"]
MODELS = {family: tiny_model(family) for family in FAMILIES}
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
KW = cache_kwarg(MODELS["llama"])  # "cache" from transformers 5.24, "past_key_values" before
FORWARD_ARGS = inspect.signature(MODELS["llama"].forward).parameters


def prompt_ids(n=110, seed=3):
    return torch.tensor([[int(t) for t in ids_text(n, seed=seed).split()]])


def greedy_after(model, cache, logits, steps):
    """A manual greedy loop that passes nothing but the token and the cache."""
    tokens = []
    token = logits[:, -1].argmax(-1)
    for _ in range(steps):
        tokens.append(token)
        logits = model(token[:, None], **{KW: cache}, use_cache=True).logits
        token = logits[:, -1].argmax(-1)
    return torch.stack(tokens, 1)


def padded_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def until_eos(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens after a row's first EOS set to the pad id, as ca.generate leaves them."""
    done = (tokens == TOK.eos_token_id).long().cumsum(-1)
    return tokens.masked_fill((done - (tokens == TOK.eos_token_id).long()) > 0, TOK.pad_token_id)


def greedy_padded(model, cache, logits, mask, steps):
    """A manual greedy loop for a left-padded batch: positions from the mask, as generate does."""
    tokens = []
    token = logits[:, -1].argmax(-1)
    for _ in range(steps):
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        position = mask.sum(-1, keepdim=True) - 1
        logits = model(token[:, None], attention_mask=mask, position_ids=position, **{KW: cache}).logits
        token = logits[:, -1].argmax(-1)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "name, layout",  # PyramidKV refuses padded batches (tested in test_integration)
    [(name, "equal") for name in PRESS_FACTORIES] + [(name, "padded") for name in UNIFORM],
)
def test_three_ways_to_decode_agree(family, name, layout):
    """ca.generate, model.generate under the press, and a manual loop after the block."""
    model, press = MODELS[family], PRESS_FACTORIES[name](40)
    rows = [prompt_ids()[0]] if layout == "equal" else [prompt_ids(110, 3)[0], prompt_ids(70, 4)[0]]
    ids, mask = padded_batch(rows)
    texts = [" ".join(str(int(t)) for t in row) for row in rows]
    ours = ca.generate(
        model, TOK, texts if layout == "padded" else texts[0], press=press, max_new_tokens=6
    ).tokens
    with press(model) as session, torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)[:, ids.shape[1] :]
        assert session.stats.kept_tokens  # the last prefill was compressed
        cache = DynamicCache(config=model.config)
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(ids, attention_mask=mask, position_ids=position, **{KW: cache}).logits
    with torch.no_grad():  # after the block: the cache knows its own lengths
        manual = greedy_padded(model, cache, logits, mask, 6)
    ours, generated, manual = (until_eos(t) for t in (ours, generated, manual))
    assert torch.equal(ours, generated) and torch.equal(ours, manual), (family, name, layout)
    assert cache.get_seq_length() == ids.shape[1] + 6  # the loop fed all six tokens
    assert any(isinstance(layer, CompressedLayer) and layer.dropped for layer in cache.layers)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(PRESS_FACTORIES))
def test_query_agnostic_flow_after_the_block(family, name):
    """Compress the context alone inside the block, append the question after it, decode: the
    tokens of ca.generate(query_aware=False)."""
    model, press = MODELS[family], PRESS_FACTORIES[name](40)
    context, question = ids_text(110, seed=4), "3 4 5 6"
    ours = ca.generate(model, TOK, context, question, press=press, max_new_tokens=5, query_aware=False)
    cache = DynamicCache(config=model.config)
    with press(model), torch.no_grad():
        model(prompt_ids(110, seed=4), **{KW: cache}, use_cache=True)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5, 6]]), **{KW: cache}, use_cache=True).logits
        manual = greedy_after(model, cache, logits, 5)
    assert torch.equal(ours.tokens, manual), (family, name)


def naive_compressed(model, ids, press):
    """The compressed prompt cache rebuilt by hand: a plain full prefill with the queries captured,
    the press's indices, a per-head loop of gathers into a plain DynamicCache."""
    full = DynamicCache(config=model.config)
    with capturing_queries(model) as capture, torch.no_grad():
        model(ids, **{KW: full}, use_cache=True)
    layers = compressible_layers(model)
    plain = DynamicCache(config=model.config)
    for rank, i in enumerate(layers):
        keys, values = full.layers[i].keys, full.layers[i].values
        idx = press.select(
            capture.calls[rank][0],
            keys,
            capture.scaling[rank],
            layer=rank,
            n_layers=len(layers),
            pad_mask=None,
        )
        kept = [
            (keys[0, h, idx[0, h]], values[0, h, idx[0, h]]) for h in range(keys.shape[1])
        ]  # one head at a time, on purpose
        plain.update(torch.stack([k for k, _ in kept])[None], torch.stack([v for _, v in kept])[None], i)
    return plain


def naive_continue(model, cache, logical, feed, steps):
    """Greedy decode on a plain cache holding compressed layers, with positions and 4-D masks
    written out by hand (every kept slot visible, causal among the tokens after the prompt):
    feeds ``feed``, then each new token but the last; returns the ``steps`` new tokens."""
    tokens = []
    for _ in range(steps):
        q, past = feed.shape[1], cache.layers[0].keys.shape[2]
        mask = torch.ones(1, 1, q, past + q, dtype=torch.bool)
        mask[..., past:] = torch.tril(torch.ones(q, q, dtype=torch.bool))
        positions = torch.arange(logical, logical + q)[None]
        logits = model(feed, **{KW: cache}, position_ids=positions, attention_mask=mask).logits
        logical += q
        feed = logits[:, -1:].argmax(-1)
        tokens.append(feed[0, 0])
    return torch.stack(tokens), logical


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("name", ["clusterattn", "snapkv", "pyramidkv"])
def test_second_turn_equals_a_naive_reference(family, name):
    model, press, ids = MODELS[family], PRESS_FACTORIES[name](40), prompt_ids()
    cache = CompressedCache(model, press)
    with torch.no_grad():
        turn1 = model.generate(ids, **{KW: cache}, max_new_tokens=4, **GEN)
        physical = cache.layers[0].keys.shape[2]
        follow = torch.tensor([[int(t) for t in ids_text(20, seed=11).split()]])
        turn2_ids = torch.cat([turn1, follow], 1)
        turn2 = model.generate(turn2_ids, **{KW: cache}, max_new_tokens=4, **GEN)
    # the second turn fed only its new tokens (the last answer token and the 20 new ones)
    assert cache.layers[0].keys.shape[2] == physical + 21 + 3
    assert cache.get_seq_length() == turn2_ids.shape[1] + 3
    reference = naive_compressed(model, ids, press)
    length = ids.shape[1]
    with torch.no_grad():  # turn 1: the first answer token comes from the full prefill
        tokens, logical = naive_continue(model, reference, length, turn1[:, length : length + 1], 3)
        assert torch.equal(turn1[0, length + 1 :], tokens)
        tokens, _ = naive_continue(model, reference, logical, torch.cat([turn1[:, -1:], follow], 1), 4)
    assert torch.equal(turn2[0, turn2_ids.shape[1] :], tokens), (family, name)


def test_threads_with_different_presses_equal_sequential_runs():
    model = tiny_model("llama")
    context = ids_text(150, seed=12)
    presses = [None, PRESS_FACTORIES["clusterattn"](40), PRESS_FACTORIES["snapkv"](48), None]
    presses += [PRESS_FACTORIES["streamingllm"](32), PRESS_FACTORIES["h2o"](40)]
    expected = [ca.generate(model, TOK, context, press=p, max_new_tokens=6) for p in presses]
    ids = prompt_ids(150, seed=12)
    with torch.no_grad():
        in_block = []
        for p in presses:
            with p(model) if p is not None else torch.no_grad():
                in_block.append(model.generate(ids, max_new_tokens=6, **GEN)[:, ids.shape[1] :])
    results, errors = {}, []

    def run(i, p, trial):
        try:
            if trial % 2:  # the press travels with the call
                results[i, trial] = ca.generate(model, TOK, context, press=p, max_new_tokens=6).tokens
            else:  # a with-block in this thread only
                with p(model) if p is not None else torch.no_grad(), torch.no_grad():
                    results[i, trial] = model.generate(ids, max_new_tokens=6, **GEN)[:, ids.shape[1] :]
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    for trial in range(6):
        threads = [threading.Thread(target=run, args=(i, p, trial)) for i, p in enumerate(presses)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for (i, trial), tokens in results.items():
        reference = expected[i].tokens if trial % 2 else in_block[i]
        assert torch.equal(tokens, reference), (i, trial)
    assert torch.equal(expected[1].tokens, in_block[1])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", UNIFORM)
def test_padded_rows_equal_single_rows(family, name):
    model, press = MODELS[family], PRESS_FACTORIES[name](40)
    contexts = [ids_text(150, seed=8), ids_text(100, seed=9), ids_text(30, seed=3)]
    batch = ca.generate(model, TOK, contexts, press=press, max_new_tokens=5)
    assert batch.text == [ca.generate(model, TOK, c, press=press, max_new_tokens=5).text for c in contexts]


def test_padded_model_generate_under_the_press_equals_single_rows():
    model, press = MODELS["llama"], PRESS_FACTORIES["snapkv"](40)
    rows = [prompt_ids(90, seed=1)[0], prompt_ids(60, seed=2)[0]]
    ids, mask = padded_batch(rows)
    with press(model), torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, **GEN)[:, 90:]
        alone = [model.generate(row[None], max_new_tokens=5, **GEN)[0, len(row) :] for row in rows]
    assert torch.equal(batch, torch.stack(alone))


def test_unsupported_calls_are_refused():
    model, press, ids = MODELS["llama"], PRESS_FACTORIES["clusterattn"](40), prompt_ids()
    with press(model), torch.no_grad():
        with pytest.raises(ValueError, match="use_cache=False"):
            model.generate(ids, max_new_tokens=2, use_cache=False, **GEN)
        with pytest.raises(ValueError, match="offloaded"):
            model(ids, **{KW: DynamicCache(config=model.config, offloading=True)})
        with pytest.raises(ValueError, match="offloaded"):
            model(ids, **{KW: StaticCache(config=model.config, max_cache_len=200, offloading=True)})
        with pytest.raises(ValueError, match="exceeds the static cache"):
            model(ids, **{KW: StaticCache(config=model.config, max_cache_len=50)})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :50], **{KW: cache})  # a plain prefill, outside the press
    with press(model), torch.no_grad(), pytest.raises(ValueError, match="chunked prefill"):
        model(ids[:, 50:], **{KW: cache})
    with press(model), pytest.raises(RuntimeError, match="do not nest|already applied"), press(model):
        pass


def test_a_compressed_prompt_cannot_be_cropped():
    model, ids = MODELS["llama"], prompt_ids()
    cache = CompressedCache(model, PRESS_FACTORIES["clusterattn"](40))
    with torch.no_grad():
        model.generate(ids, **{KW: cache}, max_new_tokens=5, **GEN)
    logical = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == logical - 2
    with pytest.raises(ValueError, match="compressed prompt"):
        cache.crop(-10)


def test_stats_describe_the_last_compression():
    model, press = MODELS["llama"], PRESS_FACTORIES["clusterattn"](40)
    with press(model) as session, torch.no_grad():
        model(prompt_ids(110), use_cache=True)
        first = session.stats
        model(prompt_ids(90, seed=5), use_cache=True)
    assert session.stats is not first and session.stats.prompt_tokens == 90


@pytest.mark.parametrize(
    "build, error, word",
    [
        (lambda: ca.ClusterAttnPress(budget=64, alpha=math.nan), ValueError, "alpha"),
        (lambda: ca.ClusterAttnPress(budget=64, alpha=math.inf), ValueError, "alpha"),
        (lambda: ca.ClusterAttnPress(budget=64, theta="x"), TypeError, "theta"),
        (lambda: ca.ClusterAttnPress(budget=64, theta=math.nan), ValueError, "theta"),
        (lambda: ca.ClusterAttnPress(budget=256, n_sink=225), ValueError, "n_sink"),
        (lambda: ca.ClusterAttnPress(budget=64, span_before=math.nan), ValueError, "span_before"),
        (lambda: ca.H2OPress(budget=64, chunk_size=0), ValueError, "chunk_size"),
        (lambda: ca.H2OPress(budget=64, chunk_size=-5), ValueError, "chunk_size"),
        (lambda: ca.RandomPress(budget=64, seed="a"), TypeError, "seed"),
    ],
)
def test_bad_values_fail_in_the_constructor(build, error, word):
    with pytest.raises(error, match=word):
        build()


def test_generate_refuses_what_is_not_a_press(llama):
    with pytest.raises(TypeError, match="press"):
        ca.generate_many(llama, TOK, ids_text(60), presses={"snap": "snapkv"})
    with pytest.raises(TypeError, match="press"):
        ca.generate(llama, TOK, ids_text(60), press="snapkv")


def test_query_agnostic_without_anything_to_append_is_refused(llama):
    with pytest.raises(ValueError, match="nothing to append"):
        ca.generate(llama, TOK, ids_text(60), press=PRESS_FACTORIES["snapkv"](40), query_aware=False)


def test_h2o_keeps_no_module_state():
    import clusterattn.presses.h2o as h2o

    assert not [
        name for name, value in vars(h2o).items() if isinstance(value, dict) and not name.startswith("__")
    ]


def decode_steps(model, cache, ids, step, n=6):
    """Prefill ``ids`` into ``cache`` eagerly, then ``n - 1`` greedy steps through ``step``."""
    logits = model(ids, **{KW: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for i in range(n - 1):
        logits = step(model, token, torch.tensor([[ids.shape[1] + i]]), cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, 1)


def eager_step(model, token, position, cache):
    # transformers < 5.8 takes cache_position (else it derives it from the length, a tensor here)
    extra = {"cache_position": position[0]} if "cache_position" in FORWARD_ARGS else {}
    return model(token, position_ids=position, **{KW: cache}, **extra).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_cache_with_a_compiled_decode_step_equals_the_dynamic_cache(family):
    """The whole decode step (the press's hooks included) captured in one graph: fullgraph=True."""
    model, press, ids = MODELS[family], PRESS_FACTORIES["clusterattn"](40), prompt_ids()
    torch._dynamo.reset()
    # transformers' own static sliding-window layers (Gemma3) keep a Python int: a graph per step
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        dynamic = decode_steps(model, CompressedCache(model, press), ids, eager_step)
        static = CompressedStaticCache(model, press, max_cache_len=ids.shape[1] + 6)
        compiled = torch.compile(eager_step, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(decode_steps(model, static, ids, compiled), dynamic), family
    layer = static.layers[compressible_layers(model)[0]]
    assert layer.keys.shape[2] == 40 + 6  # kept prompt + room for the new tokens, not prompt + new
    assert static.get_seq_length() == ids.shape[1] + 5


def test_static_cache_compiled_with_inductor():
    model, press, ids = MODELS["llama"], PRESS_FACTORIES["snapkv"](40), prompt_ids()
    torch._dynamo.reset()
    with torch.no_grad():
        dynamic = decode_steps(model, CompressedCache(model, press), ids, eager_step)
        static = CompressedStaticCache(model, press, max_cache_len=ids.shape[1] + 6)
        compiled = torch.compile(eager_step, dynamic=False)
        assert torch.equal(decode_steps(model, static, ids, compiled), dynamic)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_a_static_cache_under_the_press(family):
    model, press, ids = MODELS[family], PRESS_FACTORIES["chunkkv"](40), prompt_ids()
    with torch.no_grad():
        expected = model.generate(ids, **{KW: CompressedCache(model, press)}, max_new_tokens=6, **GEN)
        with press(model) as session:
            static = model.generate(ids, max_new_tokens=6, cache_implementation="static", **GEN)
        assert session.stats.kept_tokens
        explicit = CompressedStaticCache(model, press, max_cache_len=ids.shape[1] + 6)
        assert torch.equal(model.generate(ids, **{KW: explicit}, max_new_tokens=6, **GEN), expected)
    assert torch.equal(static, expected)


def test_padded_batch_in_a_static_cache_equals_single_rows():
    model, press = MODELS["llama"], PRESS_FACTORIES["snapkv"](40)
    rows = [prompt_ids(90, seed=1)[0], prompt_ids(60, seed=2)[0]]
    ids, mask = padded_batch(rows)
    with torch.no_grad():
        static = CompressedStaticCache(model, press, max_cache_len=95)
        batch = model.generate(ids, attention_mask=mask, **{KW: static}, max_new_tokens=5, **GEN)[:, 90:]
        alone = [
            model.generate(row[None], **{KW: CompressedCache(model, press)}, max_new_tokens=5, **GEN)[
                0, len(row) :
            ]
            for row in rows
        ]
    assert torch.equal(batch, torch.stack(alone))


def test_the_prompt_splits_at_the_context_inside_the_user_turn():
    """A short context that also appears in the template's own system prompt is cut in the user
    turn, not at its first occurrence in the rendered text."""
    from clusterattn.steps import build_prompt

    class Templated:
        chat_template = "stand-in"
        bos_token = None

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<s>You answer in JSON.</s><u>{messages[0]['content']}</u><a>"

    head, tail = build_prompt(Templated(), "JSON", "Which format?")
    assert head == "<s>You answer in JSON.</s><u>JSON" and tail == "\n\nWhich format?</u><a>"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_on_a_compressed_cache(family):
    """Beam search reorders the cache's rows each step (reorder_cache): a press that keeps every
    token gives exactly the uncompressed beams, and a compressing press gives beams whose cache
    holds the kept tokens only, at the right logical length."""
    model, ids = MODELS[family], prompt_ids()
    beams = dict(num_beams=3, num_return_sequences=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **beams)
        keeps_all = model.generate(
            ids, **{KW: CompressedCache(model, PRESS_FACTORIES["snapkv"](200))}, **beams
        )
        assert torch.equal(plain, keeps_all)
        cache = CompressedCache(model, PRESS_FACTORIES["clusterattn"](40))
        out = model.generate(ids, **{KW: cache}, **beams, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 3 and cache.stats.kept_tokens
    layer = cache.layers[compressible_layers(model)[0]]
    assert layer.keys.shape[0] == 3 and layer.keys.shape[2] < ids.shape[1]
