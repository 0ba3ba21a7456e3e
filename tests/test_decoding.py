"""Decode-phase compression (``DecodingPress``) against a naive reference that shrinks a plain cache
by hand between decode steps, with explicit positions and masks; bounded memory, padded batches,
every way of driving the model, and clear errors."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

import clusterattn as ca
from clusterattn.cache import gather_kv
from clusterattn.integration import capturing_queries, compressible_layers
from clusterattn.shared_prefill import run_presses
from clusterattn.steps import prepare_inputs
from conftest import tiny_model
from test_presses import PRESS_FACTORIES

UNIFORM = [name for name in PRESS_FACTORIES if name != "pyramidkv"]
MODELS = {family: tiny_model(family) for family in ("llama", "qwen3")}


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 120, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def naive_decoding(model, ids: torch.Tensor, wrapper: ca.DecodingPress, steps: int):
    """Greedy tokens and final keys per compressible layer: a plain cache, prefilled whole; each
    layer shrunk by the press's own ``select`` after the prefill and whenever it holds ``budget +
    interval`` tokens after a step (the window: the last captured queries); every step fed with
    its true position and a mask over exactly the slots held."""
    layers, cache = compressible_layers(model), DynamicCache(config=model.config)
    observed = wrapper.observed_queries
    with capturing_queries(model) as capture:
        logits = model(ids, past_key_values=cache).logits[:, -1]
        windows = {}
        for rank, index in enumerate(layers):
            query, layer = capture.calls[rank][-1], cache.layers[index]
            idx = wrapper.select(query, layer.keys, capture.scaling[rank], layer=rank, n_layers=len(layers))
            if idx is not None:
                layer.keys, layer.values = gather_kv(layer.keys, layer.values, idx)
            windows[rank] = query[:, :, -observed:]
        rule, tokens = wrapper.decode_press, []
        eos = model.generation_config.eos_token_id
        for step in range(steps):
            if eos is not None:  # as generate's min_new_tokens does
                logits[:, eos] = float("-inf")
            token = logits.argmax(-1)
            tokens.append(int(token))
            if step == steps - 1:  # the last token is returned, not fed (as generate does)
                break
            held = cache.layers[layers[0]].keys.shape[2]
            logits = model(
                token[:, None],
                past_key_values=cache,
                position_ids=torch.tensor([[ids.shape[1] + step]]),
                attention_mask=torch.ones(1, held + 1, dtype=torch.long),
            ).logits[:, -1]
            for rank, index in enumerate(layers):
                layer = cache.layers[index]
                windows[rank] = torch.cat([windows[rank], capture.calls[rank][-1]], 2)[:, :, -observed:]
                if layer.keys.shape[2] >= wrapper.budget + wrapper.interval:
                    idx = rule.select(
                        windows[rank], layer.keys, capture.scaling[rank], layer=rank, n_layers=len(layers)
                    )
                    layer.keys, layer.values = gather_kv(layer.keys, layer.values, idx)
    return tokens, [cache.layers[i].keys for i in layers]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("name", UNIFORM)
def test_decoding_press_equals_the_naive_reference(family, name):
    model, ids = MODELS[family], prompt(90, seed=1)
    wrapper = ca.DecodingPress(PRESS_FACTORIES[name](40), budget=24, interval=6)
    expected, keys = naive_decoding(model, ids, wrapper, steps=30)
    cache = ca.CompressedCache(model, wrapper)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False, min_new_tokens=30)
    assert out[0, 90:].tolist() == expected, name
    held = [cache.layers[i].keys for i in compressible_layers(model)]
    assert [k.shape for k in held] == [k.shape for k in keys]
    for got, want in zip(held, keys, strict=True):
        torch.testing.assert_close(got, want)
    assert cache.get_seq_length() == 90 + 29  # logical length: every token seen, the last not fed
    assert cache.stats.decode_compressions > 0 and cache.stats.decode_seconds > 0


def test_the_cache_never_exceeds_budget_plus_interval():
    model, ids = MODELS["llama"], prompt(120, seed=2)
    wrapper = ca.DecodingPress(ca.ClusterAttnPress(budget=48, window_size=8), budget=40, interval=8)
    cache = ca.CompressedCache(model, wrapper)
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(
        lambda *a: seen.append(cache.layers[0].keys.shape[2])
    )
    model.generate(ids, past_key_values=cache, max_new_tokens=60, min_new_tokens=60, do_sample=False)
    assert seen[0] == 48 and max(seen[1:]) == 40 + 8 - 1  # re-selected as it reaches 48
    assert cache.stats.decode_compressions == 2 * 8  # two layers: at the first step, then every 8


def test_protect_prompt_keeps_the_prompt_and_selects_among_generated_tokens():
    model, ids = MODELS["llama"], prompt(100, seed=3)
    inner = ca.SnapKVPress(budget=30, window_size=8)
    wrapper = ca.DecodingPress(inner, budget=50, interval=5, protect_prompt=True)
    with torch.no_grad():
        prefilled = ca.CompressedCache(model, wrapper)
        model(ids, past_key_values=prefilled)
        prompt_keys = prefilled.layers[0].keys
    cache = ca.CompressedCache(model, wrapper)
    model.generate(ids, past_key_values=cache, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    held = cache.layers[0].keys
    assert torch.equal(held[:, :, :30], prompt_keys) and 50 <= held.shape[2] < 55
    with pytest.raises(ValueError, match="protect_prompt"):
        tight = ca.DecodingPress(inner, budget=35, interval=5, protect_prompt=True)
        model(ids, past_key_values=ca.CompressedCache(model, tight))


def test_compress_prompt_false_keeps_the_whole_prompt_then_compresses():
    model, ids = MODELS["llama"], prompt(60, seed=4)
    wrapper = ca.DecodingPress(
        ca.SnapKVPress(budget=40, window_size=8), budget=40, compress_prompt=False, interval=4
    )
    cache = ca.CompressedCache(model, wrapper)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == 60  # whole: 60 > 40 + 4 is only checked after a step
    expected, _ = naive_decoding(model, ids, wrapper, steps=10)
    out = model.generate(ids, past_key_values=ca.CompressedCache(model, wrapper), max_new_tokens=10,
                         min_new_tokens=10, do_sample=False)  # fmt: skip
    assert out[0, 60:].tolist() == expected


def test_padded_rows_decode_as_they_do_alone():
    """Each row of a left-padded batch keeps what it keeps alone (prompts longer than the budget)."""
    model = MODELS["llama"]
    rows = [prompt(90, seed=5), prompt(70, seed=6)]
    wrapper = ca.DecodingPress(ca.ClusterAttnPress(budget=32, window_size=8), budget=28, interval=6)
    alone = [
        model.generate(r, past_key_values=ca.CompressedCache(model, wrapper), max_new_tokens=25,
                       min_new_tokens=25, do_sample=False)[0, r.shape[1]:]
        for r in rows
    ]  # fmt: skip
    ids = torch.zeros(2, 90, dtype=torch.long)
    mask = torch.zeros(2, 90, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 90 - r.shape[1] :], mask[i, 90 - r.shape[1] :] = r[0], 1
    out = model.generate(ids, attention_mask=mask, past_key_values=ca.CompressedCache(model, wrapper),
                         max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0)  # fmt: skip
    for i in range(2):
        assert out[i, 90:].tolist() == alone[i].tolist()


def test_every_way_of_driving_the_model_gives_the_same_tokens():
    model = MODELS["qwen3"]
    wrapper = ca.DecodingPress(ca.ClusterAttnPress(budget=40, window_size=8), budget=32, interval=8)
    ids = prompt(100, seed=7)
    text = " ".join(str(int(t)) for t in ids[0])
    from test_integration import TOK

    first = ca.generate(model, TOK, text, press=wrapper, max_new_tokens=30, chat=False)
    assert first.stats["new_tokens"] == 30
    with wrapper(model):
        under = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    explicit = model.generate(ids, past_key_values=ca.CompressedCache(model, wrapper), max_new_tokens=30,
                              min_new_tokens=30, do_sample=False)  # fmt: skip
    assert torch.equal(under, explicit)
    other = ca.DecodingPress(ca.ClusterAttnPress(budget=40, window_size=8), budget=24, interval=4)
    presses = {"dec": wrapper, "other": other, "prompt only": ca.ClusterAttnPress(budget=40, window_size=8)}
    many = ca.generate_many(model, TOK, text, presses=presses, max_new_tokens=30, chat=False)
    assert torch.equal(many["dec"].tokens, first.tokens)  # each keeps its own budget and schedule
    inputs = prepare_inputs(model, TOK, text, None, max_new_tokens=30, query_aware=True, chat=False)
    batched, _ = run_presses(model, TOK, inputs, presses, max_new_tokens=30, batch=True)  # the eval grid's
    for name in ("other", "prompt only"):
        alone = ca.generate(model, TOK, text, press=presses[name], max_new_tokens=30, chat=False)
        assert torch.equal(many[name].tokens, alone.tokens), name
        assert torch.equal(batched[name].tokens, alone.tokens), name


def test_bad_arguments_and_static_caches_are_refused():
    snap = ca.SnapKVPress(budget=40, window_size=8)
    with pytest.raises(TypeError, match="press"):
        ca.DecodingPress(ca.FullKV(), budget=32)
    with pytest.raises(TypeError, match="another"):
        ca.DecodingPress(ca.DecodingPress(snap, budget=32), budget=32)
    with pytest.raises(ValueError, match="different budgets"):
        ca.DecodingPress(ca.PyramidKVPress(budget=40, window_size=8), budget=32)
    with pytest.raises(ValueError, match="budget"):
        ca.DecodingPress(snap, budget=8)  # the window alone is 8
    for bad in ({"interval": 0}, {"budget": 0}):
        with pytest.raises(ValueError):
            ca.DecodingPress(snap, **{"budget": 32, **bad})
    with pytest.raises(TypeError, match="protect_prompt"):
        ca.DecodingPress(snap, budget=32, protect_prompt=1)
    model, wrapper = MODELS["llama"], ca.DecodingPress(snap, budget=32)
    with pytest.raises(ValueError, match="static cache"):
        ca.CompressedStaticCache(model, wrapper, max_cache_len=200)
    with pytest.raises(ValueError, match="static cache"), wrapper(model):
        model(prompt(60), past_key_values=StaticCache(config=model.config, max_cache_len=200))


def _fidelity_bench(name: str = "long_output_fidelity"):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # long_output_recall imports long_output_fidelity
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_long_output_fidelity_benchmark_measures_what_it_says():
    """``benchmarks/long_output_fidelity.py``: a left-padded batch of references gives each prompt
    its own greedy tokens; feeding the reference in chunks that end at the eviction points gives
    the misses and log-probs of one token per forward (the naive path); a budget covering the whole
    generation agrees fully and never evicts."""
    bench, model = _fidelity_bench(), MODELS["llama"]
    short, long = prompt(40, seed=8)[0], prompt(60, seed=9)[0]
    batch = bench.references(model, [short, long], 30, banned=[5])
    alone = bench.references(model, [long], 30, banned=[5])[0]
    assert torch.equal(batch[1], alone) and not (batch == 5).any()
    target = bench.references(model, [long], 80, banned=[])[0]
    whole = bench.teacher_forced(model, long, target, bench.Policy(model, "snapkv", 200, 8), [])
    assert whole["common_prefix"] == 80 and whole["top1_agreement"] == 1.0 and whole["first_eviction"] is None
    assert whole["peak_held"] == 60 + 79
    for name, squeeze in itertools.product(("full", "clusterattn", "snapkv", "streamingllm"), (False, True)):
        policy = bench.Policy(model, name, 64 - 24 * squeeze, 16, compress_prompt=squeeze)
        chunked = bench.teacher_forced(model, long, target, policy, [])
        policy = bench.Policy(model, name, 64 - 24 * squeeze, 16, compress_prompt=squeeze)
        stepped = bench.teacher_forced(model, long, target, policy, [], steps=True)
        assert chunked["misses"] == stepped["misses"], name
        assert chunked["mean_logprob"] == pytest.approx(stepped["mean_logprob"], abs=1e-5), name
        assert chunked["first_eviction"] == stepped["first_eviction"], name
        assert (chunked["mean_held"], chunked["peak_held"]) == (stepped["mean_held"], stepped["peak_held"])
        if name != "full" and squeeze:  # the prompt compressed to 40 at prefill
            assert chunked["first_eviction"] == 0 and chunked["peak_held"] == 60
            assert chunked["mean_held"] <= 40 + 16
        elif name != "full":
            assert chunked["peak_held"] == 64 + 16 and chunked["first_eviction"] == 64 + 16 - 60 + 1
            assert chunked["common_prefix"] >= chunked["first_eviction"] - 1


def test_the_recall_benchmark_answers_after_the_forced_preamble():
    """``benchmarks/long_output_recall.py``: with the full cache, the answer after a forced prefix of
    the reference is the reference's continuation; under a decode budget the cache never holds more
    than ``budget + interval`` tokens, and a stop token ends the answer."""
    bench, recall = _fidelity_bench(), _fidelity_bench("long_output_recall")
    model, ids = MODELS["llama"], prompt(50, seed=2)[0]
    target = bench.references(model, [ids], 60, banned=[])[0]
    full = bench.Policy(model, "full", 200, 16)
    assert recall.answer_after(model, ids, target[:40], full, 20, stop=[]) == target[40:].tolist()
    assert full.peak == 50 + 40 + 19
    tight = bench.Policy(model, "clusterattn", 48, 16)
    answer = recall.answer_after(model, ids, target[:40], tight, 20, stop=[])
    assert len(answer) == 20 and tight.peak == 48 + 16
    rest, policy = target[40:].tolist(), bench.Policy(model, "full", 200, 16)
    stopped = recall.answer_after(model, ids, target[:40], policy, 20, stop=[rest[5]])
    assert stopped == rest[: rest.index(rest[5])]
    kept = bench.Policy(model, "clusterattn+protect", 80, 16)  # prompt to 40, kept; decoding evicts the rest
    answer = recall.answer_after(model, ids, target[:40], kept, 20, stop=[])
    assert len(answer) == 20 and kept.peak == 80 + 16 and kept.held() < 40 + 60  # 60 tokens fed: evicted
    assert kept.press.protect_prompt and kept.press.press.budget == 40
    vocab = {"a": 0, "1": 1, "\u01201999": 2, "b3c": 3, "x": 4, "\u0120seven": 5}
    assert recall.digit_tokens(SimpleNamespace(get_vocab=lambda: vocab)) == [1, 2, 3]  # not in a preamble
    answers = {" 9217.": 4, " 10.": 0, " 9217089.": 7, " John": 0, "": 0}
    assert {a: recall.leading_digits(a, "9217089") for a in answers} == answers


def test_the_fidelity_report_splits_prompts_and_compares_with_kvpress_snapkv():
    bench = _fidelity_bench()
    base = {"top1_agreement": 1.0, "top1_after_eviction": None, "mean_logprob": -0.1, "mean_held": 10,
            "peak_held": 12}  # fmt: skip
    rows = [
        base | {"prompt": prompt, "press": press, "budget": 64, "common_prefix": prefix}
        for prompt, press, prefix in [("spec-00", "clusterattn", 30), ("spec-00", "kvpress-snapkv", 20),
                                      ("essay-00", "clusterattn", 5), ("essay-00", "kvpress-snapkv", 5)]
    ]  # fmt: skip
    text = bench.report(rows, ["clusterattn", "kvpress-snapkv"], [64])
    assert "**Coding specifications**" in text and "**Essay summaries**" in text
    assert "longer on 1, equal on 1, shorter on 0; mean difference +5 tokens" in text


def test_the_fidelity_report_draws_its_figure_and_table_from_a_results_folder(tmp_path):
    """``benchmarks/long_output_report.py DIR``: table.md and fidelity.png from results.jsonl (a
    press still running at a budget is drawn over the prompts every press has there); a folder
    without rows is an error, not an empty figure."""
    _fidelity_bench()  # puts benchmarks/ on sys.path
    import long_output_report as report

    base = {"top1_agreement": 1.0, "top1_after_eviction": 0.9, "mean_logprob": -0.1, "mean_held": 10,
            "peak_held": 12}  # fmt: skip
    rows = [base | {"prompt": "spec-00", "press": "full", "budget": 0, "common_prefix": 40}]
    rows += [
        base | {"prompt": prompt, "press": press, "budget": budget, "common_prefix": 20}
        for prompt in ("spec-00", "spec-01")
        for press in ("clusterattn", "kvpress-snapkv")
        for budget in (64, 128)
        if (prompt, press, budget) != ("spec-01", "kvpress-snapkv", 64)  # still running
    ]
    assert report._values(rows, "common_prefix", "clusterattn", 64, {"spec-00"}) == [20]
    for row in rows:
        report._append(tmp_path / "results.jsonl", row)
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    assert "| clusterattn | 128 | 2 |" in (tmp_path / "table.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        report.main([str(empty)])
