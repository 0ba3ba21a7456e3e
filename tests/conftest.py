"""Shared fixtures: tiny random-weight models of every family, and the real SmolLM2 (cached)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    attn_implementation="sdpa",
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": False}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 16,
            "num_hidden_layers": 4,
            "sliding_window": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """A 2-4 layer random-weight model of ``family`` (4 query / 2 KV heads), eval mode, fp32."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # sharper attention than random init: fewer near-ties between tokens
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(6.0)
    return model


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from PyPI, converted once into the user cache."""
    import clusterattn as ca

    return ca.load_model("smollm2-135m")
