"""The "answer" profiling objective: teacher-forced log-probability of the full cache's answer under a
compressed cache, against a naive live prefill + one-token-at-a-time decode."""

from __future__ import annotations

import contextlib

import pytest
import torch

import clusterattn as ca
from clusterattn.analysis.data import TaskSample
from clusterattn.analysis.fidelity import answer_logprobs, teacher_forced_logprob
from clusterattn.analysis.trace import trace_decode
from clusterattn.hf import cache_kwarg, new_cache
from clusterattn.steps import prefill, prepare_inputs
from conftest import tiny_model
from test_integration import TOK, ids_text


def naive_answer_logprob(model, sample: TaskSample, answer: torch.Tensor, press) -> float:
    """The press applied live inside prefill, then the answer fed one token per decode step."""
    inputs = prepare_inputs(
        model,
        TOK,
        sample.context,
        sample.question,
        max_new_tokens=1,
        query_aware=True,
        answer_prefix=sample.answer_prefix,
        chat=True,
    )
    cache = new_cache(model)
    values = []
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        _, next_pos = prefill(model, inputs, cache)
        mask = inputs.prompt_mask
        for t in range(len(answer) - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            logits = model(
                input_ids=answer[t].view(1, 1),
                attention_mask=mask,
                position_ids=(next_pos + t)[:, None],
                use_cache=True,
                **{cache_kwarg(model): cache},
            ).logits
            values.append(logits[0, -1].double().log_softmax(-1)[answer[t + 1]].item())
    return sum(values) / len(values)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_answer_logprobs_match_a_live_press_and_decode_steps(kind):
    model = tiny_model(kind)
    sample = TaskSample(task="t", index=0, context=ids_text(150), question=ids_text(5, seed=2))
    answer = trace_decode(model, TOK, sample.context, sample.question, steps=5, stop_at_eos=False).new_tokens
    configs = [
        {"budget": 48, "num_block": n, "alpha": a, "window_size": w}
        for n, a, w in [(1, 1.0, 8), (4, 0.5, 8), (40, 1.0, 8), (8, 2.0, 16)]
    ] + [{"budget": 400, "num_block": 2, "alpha": 1.0, "window_size": 8}]  # keeps the whole prompt
    got = answer_logprobs(model, TOK, sample, answer, configs)
    for value, config in zip(got.tolist(), configs[:-1], strict=False):
        assert value == pytest.approx(
            naive_answer_logprob(model, sample, answer, ca.ClusterAttnPress(**config)), abs=1e-4
        )
    assert got[-1].item() == pytest.approx(naive_answer_logprob(model, sample, answer, None), abs=1e-4)
    assert len(set(got.tolist())) > 2  # the candidates' caches really differ
    with pytest.raises(ValueError, match="two tokens"):
        answer_logprobs(model, TOK, sample, answer[:1], configs)


def test_teacher_forced_logprob_and_shape_errors():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    expected = (torch.log(torch.tensor(0.5)) + torch.log_softmax(torch.tensor([2.0, 0.0]), -1)[1]) / 2
    assert teacher_forced_logprob(logits, torch.tensor([1, 1])).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="do not match"):
        teacher_forced_logprob(logits, torch.tensor([1]))
