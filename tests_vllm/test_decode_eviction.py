"""Decode-phase eviction (a spec with ``decode_budget``) inside a real engine (SmolLM2-135M, fp32):
the same tokens as the transformers path's ``DecodingPress``, a bounded number of blocks per
request however long it generates, and preemption."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca
from conftest import needle_case, run_engine

MAX_TOKENS = 128
ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 2048, "dtype": "float32"}
PRESSES = {  # prompt compressed then decoded; prompt protected; prompt whole, re-selected at once
    "clusterattn:budget=256,decode_budget=128,interval=32": ca.DecodingPress(
        ca.ClusterAttnPress(budget=256), budget=128, interval=32
    ),
    "snapkv:budget=96,decode_budget=160,interval=24,protect_prompt=true": ca.DecodingPress(
        ca.SnapKVPress(budget=96), budget=160, interval=24, protect_prompt=True
    ),
    "streamingllm:decode_budget=120,interval=40,compress_prompt=false": ca.DecodingPress(
        ca.StreamingLLMPress(budget=120), budget=120, interval=40, compress_prompt=False
    ),
}


@pytest.fixture(scope="module")
def cases(hf_model):
    _, tokenizer = hf_model
    return [needle_case(tokenizer, 900 + 100 * i, 40 + i) for i in range(len(PRESSES))]


@pytest.fixture(scope="module")
def references(hf_model, cases) -> list[list[int]]:
    """Greedy tokens of the transformers path with each ``DecodingPress`` (EOS suppressed, as the
    engine's ``min_tokens`` does)."""
    model, _ = hf_model
    out = []
    for (_, _, ids), press in zip(cases, PRESSES.values(), strict=True):
        prompt = torch.tensor([ids])
        with torch.no_grad():
            tokens = model.generate(
                prompt, past_key_values=ca.CompressedCache(model, press), max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS, do_sample=False,
            )  # fmt: skip
        out.append(tokens[0, prompt.shape[1] :].tolist())
    return out


def job(model_dir, cases, **extra) -> dict:
    return {
        "engine": {"model": str(model_dir), **ENGINE},
        "prompts": [case[2] for case in cases],
        "presses": list(PRESSES),
        "max_tokens": MAX_TOKENS,
        "min_tokens": MAX_TOKENS,
        **extra,
    }


def test_long_generation_matches_transformers_with_bounded_blocks(model_dir, cases, references, tmp_path):
    result = run_engine(job(model_dir, cases), press_env="none", tmp_path=tmp_path)
    assert result["tokens"] == references  # every token, through several re-selections
    # once decoding, no request holds more than budget + interval needs (a prompt of ~1.1k-1.4k
    # tokens plus 128 generated would hold 10-12 blocks of 128)
    bound = max(-(-(press.budget + press.interval) // 128) for press in PRESSES.values())
    assert result["max_decode_blocks"] <= bound == 2
    assert result["free_blocks_end"] == result["num_blocks"] - 1


def test_preempted_decoding_requests_resume_at_the_same_length(model_dir, cases, references, tmp_path):
    """Preempted after several re-selections, each request is re-prefilled straight to the length
    the formula gives (one re-selection instead of several: later tokens may differ), finishes, and
    holds no more blocks than before; every block comes back."""
    result = run_engine(job(model_dir, cases, preempt_at_step=80), press_env="none", tmp_path=tmp_path)
    assert result["preemptions"] == len(PRESSES)
    for tokens, ref in zip(result["tokens"], references, strict=True):
        assert len(tokens) == MAX_TOKENS and tokens[:70] == ref[:70]  # the same up to the preemption
    assert result["max_decode_blocks"] <= 2
    assert result["free_blocks_end"] == result["num_blocks"] - 1
