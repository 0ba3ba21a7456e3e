"""kvpress's DecodingPress as ``benchmarks/long_output_fidelity.py`` drives it, and clusterattn's
attention function under kvpress's import-time patch of every registered attention function."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import kvpress
import pytest
import torch
from test_peer_worker import tiny_llama
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import clusterattn as ca

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "long_output_fidelity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("long_output_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 120, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("compress_prompt", [False, True])
@pytest.mark.parametrize("name", ["kvpress-snapkv", "kvpress-expectedattention"])
def test_kvpress_chunks_end_where_its_decoding_press_evicts(bench, model, name, compress_prompt):
    """Chunks of ``interval`` tokens (kvpress evicting after each) give the misses, log-probs and held
    tokens of one token per forward under kvpress's own step counting (its SnapKV needs more
    than its 64-token window between evictions)."""
    prompt, budget, interval = ids(150 if compress_prompt else 50), 96, 80
    target = bench.references(model, [prompt], 300, banned=[])[0]
    policy = bench.Policy(model, name, budget, interval, compress_prompt)
    chunked = bench.teacher_forced(model, prompt, target, policy, [])
    policy = bench.Policy(model, name, budget, interval, compress_prompt)
    stepped = bench.teacher_forced(model, prompt, target, policy, [], steps=True)
    assert chunked["misses"] == stepped["misses"]
    assert chunked["mean_logprob"] == pytest.approx(stepped["mean_logprob"], abs=1e-5)
    assert chunked["first_eviction"] == stepped["first_eviction"] == (0 if compress_prompt else interval + 1)
    assert (chunked["mean_held"], chunked["peak_held"]) == (stepped["mean_held"], stepped["peak_held"])
    assert chunked["peak_held"] == budget + interval  # the prefill's 150 included
    assert compress_prompt or chunked["common_prefix"] >= interval


def test_clusterattn_attention_takes_dropout_positionally(model, monkeypatch):
    """kvpress wraps every attention function registered when it is imported and passes ``dropout``
    positionally; a press applied before kvpress is imported must still run (and give the same
    tokens as without the wrap)."""
    press = ca.ClusterAttnPress(budget=48)
    prompt = ids(90, seed=1)[None]

    def greedy():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return out[0, prompt.shape[1] :]

    with press(model):  # registers clusterattn's attention function
        before = greedy()
    for key, func in list(ALL_ATTENTION_FUNCTIONS.items()):
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, key, func)  # restored after the test
    kvpress.attention_patch.patch_attention_functions()
    with press(model):
        assert torch.equal(greedy(), before)
