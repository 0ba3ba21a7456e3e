"""Tensor parallelism on CPU: with ``tensor_parallel_size=2`` every worker evicts on its own KV heads
and the engine gives the tokens of one worker, prompt eviction and decode eviction alike
(Qwen2.5-Coder-0.5B-Instruct, fp32: 2 KV heads, one per worker; SmolLM2's 3 do not split in two)."""

from __future__ import annotations

import os

import pytest

from conftest import needle_case, run_engine

QWEN = "qwen2.5-coder-0.5b"
SPECS = [
    False,  # no press
    "clusterattn:budget=256",
    "snapkv:budget=128",
    "clusterattn:budget=256,decode_budget=128,interval=32",  # re-selects several times in 48 tokens
]
ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 2048, "dtype": "float32"}


@pytest.fixture(scope="module")
def qwen_dir():
    """The fp32 Qwen2.5-Coder-0.5B folder, converted from the PyPI GGUF parts on first use."""
    from clusterattn.models import converted_dir, load_model

    folder = converted_dir(QWEN)
    if not (folder / "config.json").is_file():
        load_model(QWEN)
    return folder


def test_two_workers_give_the_tokens_of_one(qwen_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    ids = needle_case(tokenizer, 900, 5)[2]
    job = {"prompts": [ids] * len(SPECS), "presses": SPECS, "max_tokens": 48, "min_tokens": 48}
    engine = {"model": str(qwen_dir), **ENGINE}
    one = run_engine({**job, "engine": engine}, press_env="none", tmp_path=tmp_path)
    cpus = sorted(os.sched_getaffinity(0))
    two = run_engine(
        {**job, "engine": {**engine, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}},
        press_env="none",
        tmp_path=tmp_path,
        env_extra={"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[-1]}"},  # one NUMA node: bind by hand
    )
    assert two["tokens"] == one["tokens"]
    assert two["freed_blocks"] == one["freed_blocks"] > 0  # the presses evicted in both engines
    assert two["max_decode_blocks"] == one["max_decode_blocks"]
