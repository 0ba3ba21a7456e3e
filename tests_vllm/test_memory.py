"""Freed blocks are real capacity: more requests run at once in the same KV space, and requests
preempted after eviction come back with the same output."""

from __future__ import annotations

import clusterattn as ca
from conftest import needle_case, run_engine

ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 2048, "dtype": "float32"}


def test_more_requests_fit_in_the_same_blocks(hf_model, model_dir, tmp_path):
    _, tokenizer = hf_model
    prompts = [needle_case(tokenizer, 1400, seed)[2] for seed in range(10, 16)]
    blocks = 40  # of 128 tokens; a full ~1.5k-token request holds 12 or 13 of them
    need = sorted(-(-(len(p) + 6) // 128) for p in prompts)
    assert sum(need[:4]) > blocks  # without freeing, no 4 of them could ever run at once
    job = {
        "engine": {"model": str(model_dir), "num_gpu_blocks_override": blocks, **ENGINE},
        "prompts": prompts,
        "presses": [False] * len(prompts),
        "max_tokens": 6,
    }
    evicted = run_engine(job, press_env="clusterattn:budget=128", tmp_path=tmp_path)
    assert evicted["max_running"] == len(prompts)  # 2 blocks each once prefilled: all 6 at once
    assert evicted["freed_blocks"] == sum(-(-len(p) // 128) - 1 for p in prompts)
    assert evicted["free_blocks_end"] == evicted["num_blocks"] - 1 == blocks - 1


def test_preempted_requests_are_compressed_again_with_the_same_output(hf_model, model_dir, tmp_path):
    model, tokenizer = hf_model
    cases = [needle_case(tokenizer, 1100, seed) for seed in (21, 22)]
    presses = {
        "clusterattn:budget=128": ca.ClusterAttnPress(budget=128),
        "snapkv:budget=160": ca.SnapKVPress(budget=160),
    }
    job = {
        "engine": {"model": str(model_dir), **ENGINE},
        "prompts": [case[2] for case in cases],
        "presses": list(presses),
        "max_tokens": 16,
        "preempt_at_step": 6,  # both prefilled, a few tokens decoded on the compressed cache
    }
    shaken = run_engine(job, press_env="none", tmp_path=tmp_path)
    assert shaken["preemptions"] == 2
    for (context, question, _), press, tokens in zip(cases, presses.values(), shaken["tokens"], strict=True):
        ref = ca.generate(model, tokenizer, context, question, press=press, max_new_tokens=16)
        assert tokens == ref.tokens[0].tolist()
    assert shaken["free_blocks_end"] == shaken["num_blocks"] - 1
