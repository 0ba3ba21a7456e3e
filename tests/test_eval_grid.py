"""answer_all: one recorded prefill, replayed presses, batched decoding == the live path per press."""

from __future__ import annotations

import pytest
import torch

import clusterattn as ca
from clusterattn.eval.grid import answer_all
from clusterattn.integration import cache_kwarg, new_cache
from clusterattn.replay import stack_caches
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES


@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_batched_answers_equal_live_generate(family_model, setting):
    family, model = family_model
    presses = {name: PRESS_FACTORIES[name](40) for name in PRESS_FACTORIES}
    presses.update(full=None, snap_small=PRESS_FACTORIES["snapkv"](48))
    context, question = ids_text(150, seed=21), "3 4 5"
    batched, prefill_s = answer_all(
        model, TOK, context=context, question=question, answer_prefix="", presses=presses,
        setting=setting, max_new_tokens=6,
    )  # fmt: skip
    single, _ = answer_all(
        model, TOK, context=context, question=question, answer_prefix="", presses=presses,
        setting=setting, max_new_tokens=6, batch=False,
    )  # fmt: skip
    assert prefill_s > 0
    for name, press in presses.items():
        live = ca.generate(
            model, TOK, context, question, press=press, max_new_tokens=6, query_aware=setting == "query_aware"
        )
        assert batched[name].text == live.text == single[name].text, (family, name)
        assert batched[name].kv_bytes == live.stats["kv_bytes"]
        kept = live.stats["kept_tokens"]
        assert batched[name].kept == (max(kept.values()) if kept else live.stats["compressed_tokens"])


def test_answer_all_rejects_bad_setting(llama):
    with pytest.raises(ValueError, match="setting"):
        answer_all(
            llama, TOK, context=ids_text(50), question="1", answer_prefix="", presses={"full": None},
            setting="aware", max_new_tokens=2,
        )  # fmt: skip


def test_stack_caches_checks_shapes(llama):
    a, b = new_cache(llama), new_cache(llama)
    with torch.no_grad():
        llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{cache_kwarg(llama): a})
        llama(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=True, **{cache_kwarg(llama): b})
    with pytest.raises(ValueError, match="different per-layer lengths"):
        stack_caches([a, b])
    with pytest.raises(ValueError, match="at least one"):
        stack_caches([])
    merged = stack_caches([a, a])
    assert merged.layers[0].keys.shape[0] == 2
    assert torch.equal(merged.layers[1].values[1], a.layers[1].values[0])
