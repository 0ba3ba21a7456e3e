"""The plugin inside a real vLLM engine (SmolLM2-135M, fp32): exactness against stock vLLM and
against this library's transformers path, and the evicted blocks returned to the pool."""

from __future__ import annotations

import pytest

import clusterattn as ca
from conftest import needle_case, run_engine

MAX_TOKENS = 24
ENGINE = {"max_model_len": 4096, "max_num_batched_tokens": 4096, "dtype": "float32"}
PRESSES = {
    "clusterattn:budget=256": ca.ClusterAttnPress(budget=256),
    "clusterattn:budget=128": ca.ClusterAttnPress(budget=128),
    "snapkv:budget=192": ca.SnapKVPress(budget=192),
    # the query-agnostic preset: leverage of the keys before RoPE (the frequencies read from vLLM's
    # rotary modules, hooks.rope_frequencies)
    "clusterattn:budget=160,scorer=leverage,unrotate_keys=true,max_clusters=none,span_width=24,"
    "span_before=0.5,n_sink=4": ca.ClusterAttnPress(
        budget=160,
        scorer="leverage",
        unrotate_keys=True,
        max_clusters=None,
        span_width=24,
        span_before=0.5,
        n_sink=4,
    ),
}


@pytest.fixture(scope="module")
def cases(hf_model):
    _, tokenizer = hf_model
    pairs = ((1300, 1), (1500, 2), (1100, 3), (1200, 4))  # one per press of PRESSES
    return [needle_case(tokenizer, n_words, seed) for n_words, seed in pairs]


@pytest.fixture(scope="module")
def plugin_run(cases, model_dir, tmp_path_factory):
    """One engine with the plugin on and no default press: every request chooses its own."""
    jobs = [(case, False) for case in cases] + [(cases[i], spec) for i, spec in enumerate(PRESSES)]
    job = {
        "engine": {"model": str(model_dir), **ENGINE},
        "prompts": [case[2] for case, _ in jobs],
        "presses": [spec for _, spec in jobs],
        "max_tokens": MAX_TOKENS,
    }
    result = run_engine(job, press_env="none", tmp_path=tmp_path_factory.mktemp("plugin"))
    return jobs, result


def test_eviction_off_is_token_identical_to_stock_vllm(cases, model_dir, plugin_run, tmp_path):
    job = {
        "engine": {"model": str(model_dir), **ENGINE},
        "prompts": [case[2] for case in cases],
        "presses": [False] * len(cases),
        "max_tokens": MAX_TOKENS,
    }
    stock = run_engine(job, press_env=None, tmp_path=tmp_path)
    _, result = plugin_run
    assert stock["freed_blocks"] == 0  # the plugin was not loaded at all
    assert result["tokens"][: len(cases)] == stock["tokens"]


def test_eviction_on_is_token_identical_to_transformers(hf_model, plugin_run):
    model, tokenizer = hf_model
    jobs, result = plugin_run
    for (case, spec), tokens in zip(jobs, result["tokens"], strict=True):
        if spec is False:
            continue
        context, question, ids = case
        ref = ca.generate(model, tokenizer, context, question, press=PRESSES[spec], max_new_tokens=MAX_TOKENS)
        assert ref.stats["prompt_tokens"] == len(ids)
        assert tokens == ref.tokens[0].tolist(), (spec, tokenizer.decode(tokens), ref.text)


def freed_blocks(jobs, block: int = 128) -> int:
    """Blocks eviction hands back: a prompt's blocks less the blocks of the B tokens it keeps."""
    return sum(
        -(-len(case[2]) // block) - -(-PRESSES[spec].budget // block)
        for case, spec in jobs
        if spec is not False
    )


def test_evicted_blocks_return_to_the_pool(plugin_run):
    jobs, result = plugin_run
    assert result["freed_blocks"] == freed_blocks(jobs)
    assert result["free_blocks_end"] == result["num_blocks"] - 1  # all back but the null block


def test_compiled_mode_evicts_exactly_like_eager(cases, model_dir, hf_model, tmp_path):
    """vLLM's default mode compiles the model (``enforce_eager=False``); attention stays outside
    the compiled graph, so the plugin's hooks still run: same tokens as the transformers path, and
    every evicted block back in the pool."""
    model, tokenizer = hf_model
    job = {
        "engine": {"model": str(model_dir), **ENGINE, "enforce_eager": False},
        "prompts": [case[2] for case in cases],
        "presses": list(PRESSES),
        "max_tokens": MAX_TOKENS,
    }
    result = run_engine(job, press_env="none", tmp_path=tmp_path)
    for (context, question, _), spec, tokens in zip(cases, PRESSES, result["tokens"], strict=True):
        ref = ca.generate(model, tokenizer, context, question, press=PRESSES[spec], max_new_tokens=MAX_TOKENS)
        assert tokens == ref.tokens[0].tolist(), (spec, tokenizer.decode(tokens), ref.text)
    assert result["freed_blocks"] == freed_blocks(list(zip(cases, PRESSES, strict=True)))
    assert result["free_blocks_end"] == result["num_blocks"] - 1


def test_a_press_that_fails_inside_the_engine_fails_alone(cases, model_dir, hf_model, tmp_path):
    """A press whose select raises (on purpose, budget 257): its request keeps its most recent
    257 prompt tokens instead (logged), the request beside it answers as usual, the engine serves
    a second round, and every evicted block is back in the pool."""
    model, tokenizer = hf_model
    job = {
        "engine": {"model": str(model_dir), **ENGINE},
        "prompts": [case[2] for case in cases[:3]],
        "presses": ["clusterattn:budget=257", "clusterattn:budget=256", False],
        "max_tokens": MAX_TOKENS,
        "failing_budget": 257,
        "rounds": 2,
    }
    result = run_engine(job, press_env="none", tmp_path=tmp_path)
    presses = [ca.StreamingLLMPress(budget=257, n_sink=0), ca.ClusterAttnPress(budget=256), None]
    for (context, question, _), press, *answers in zip(cases[:3], presses, *result["rounds"], strict=True):
        ref = ca.generate(model, tokenizer, context, question, press=press, max_new_tokens=MAX_TOKENS)
        assert all(tokens == ref.tokens[0].tolist() for tokens in answers), (press, answers)
    assert result["free_blocks_end"] == result["num_blocks"] - 1
