"""The kvpress worker replays kvpress's own hooks on a recorded prefill: the caches must equal what
``with press(model): model(...)`` leaves. Runs in the peers environment (``make test-peers``)."""

from __future__ import annotations

import json

import kvpress
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from clusterattn.eval.peer_worker import (
    apply_recorded,
    build_press,
    copy_cache,
    greedy,
    kvpress_ratio,
    main,
    record_prefill,
)
from clusterattn.eval.spec import PEER_PRESSES
from clusterattn.eval.tasks import Sample

torch.set_num_threads(2)
PROMPT = 200


class IdTokenizer:
    """Text is a space-separated list of token ids."""

    chat_template = None
    bos_token = None
    pad_token_id = 0
    eos_token_id = 127

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def tiny_llama(seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 127
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt_ids(seed=0):
    return torch.randint(1, 120, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(PEER_PRESSES))
def test_replayed_hooks_equal_live_kvpress(model, name):
    ids = prompt_ids()
    press = build_press(name, {}, 96, PROMPT)
    live = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=live, use_cache=True)
    live_masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    cache, captured, _ = record_prefill(model, ids)
    replayed = apply_recorded(build_press(name, {}, 96, PROMPT), model, cache, captured)
    for a, b in zip(live.layers, replayed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), name
    for layer, mask in zip(model.model.layers, live_masks, strict=True):
        replay_mask = getattr(layer.self_attn, "masked_key_indices", None)
        if mask is None:
            assert replay_mask is None
        else:
            assert all(torch.equal(x, y) for x, y in zip(mask, replay_mask, strict=True))
    assert cache.layers[0].keys.shape[2] == PROMPT  # the record is untouched


@pytest.mark.parametrize("name", ["snapkv", "knorm", "tova", "streamingllm", "expectedattention"])
def test_token_budget_is_kept_exactly(model, name):
    cache, captured, _ = record_prefill(model, prompt_ids(1))
    pressed = apply_recorded(build_press(name, {}, 80, PROMPT), model, cache, captured)
    assert {layer.keys.shape[2] for layer in pressed.layers} == {80}


def test_wrapper_parameters_are_routed():
    chunk = build_press("chunkkv", {"window_size": 32, "chunk_length": 32}, 96, PROMPT)
    assert (
        isinstance(chunk, kvpress.ChunkKVPress) and chunk.chunk_length == 32 and chunk.press.window_size == 32
    )
    assert build_press("adakv", {"alpha_safeguard": 0.5}, 96, PROMPT).alpha_safeguard == 0.5
    with pytest.raises(ValueError, match="unknown parameters"):
        build_press("chunkkv", {"nope": 1}, 96, PROMPT)
    assert kvpress_ratio("snapkv", 0.25, PROMPT, 0) == 0.25


def test_greedy_matches_a_full_forward(model):
    ids = prompt_ids(2)
    cache, _, logits = record_prefill(model, ids)
    text = greedy(model, IdTokenizer(), cache, logits, PROMPT, None, 4)[0]
    tokens = [int(t) for t in text.split()]
    with torch.no_grad():
        again = model(input_ids=torch.cat([ids, torch.tensor([tokens[:-1]])], 1)).logits[0, PROMPT - 1 :]
    assert again.argmax(-1).tolist() == tokens


def test_worker_appends_rows(model, tmp_path, monkeypatch):
    import clusterattn

    monkeypatch.setattr(clusterattn, "load_model", lambda name: (model, IdTokenizer()))
    context = " ".join(str(int(t)) for t in prompt_ids(3)[0])
    sample = Sample(
        task="niah_single_1", length=PROMPT, index=0, context=context, question="5 6", answer_prefix="",
        answers=("7",), metric="string_match_all", max_new_tokens=3, n_tokens=PROMPT + 2,
    )  # fmt: skip
    job = {"sample": sample.to_dict(), "setting": "query_agnostic"}
    job["presses"] = [
        ["snapkv", {}, "kvpress:snapkv", 96],
        ["chunkkv", {"nope": 1}, "kvpress:chunkkv:nope=1", 96],
        ["knorm", {}, "kvpress:knorm", 64],
        ["tova", {}, "kvpress:tova", 80],
        ["adakv", {}, "kvpress:adakv", 96],
    ]
    job_path, out = tmp_path / "job.json", tmp_path / "predictions.jsonl"
    job_path.write_text(json.dumps({"version": 1, "model": "tiny", "jobs": [job]}))
    assert main([str(job_path), str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["press"] for r in rows] == [p[2] for p in job["presses"]]
    assert rows[0]["error"] is None and rows[0]["kept"] == 96 and rows[0]["score"] in (0.0, 1.0)
    assert rows[1]["error"].startswith("ValueError") and rows[1]["score"] is None
    # snapkv, knorm and tova (three widths) decode as one left-padded batch, adakv alone: each row
    # must equal its press decoded on its own
    from clusterattn.steps import prepare_inputs

    inputs = prepare_inputs(
        model, IdTokenizer(), context, "5 6", max_new_tokens=3, query_aware=False, answer_prefix="", chat=True
    )
    cache, captured, logits = record_prefill(model, inputs.prompt_ids)
    for row, (name, _, _, budget) in zip(rows, job["presses"], strict=True):
        if row["error"] is None:
            pressed = apply_recorded(build_press(name, {}, budget, PROMPT), model, cache, captured)
            alone = greedy(model, IdTokenizer(), pressed, logits, PROMPT, inputs.rest, 3)[0]
            assert row["prediction"] == alone, name


def test_expected_attention_runs_on_a_model_never_wrapped_by_kvpress():
    """kvpress's context manager attaches the rotary embedding to each attention module, and
    ExpectedAttention needs it: the replay must attach it too (a fresh model, no press(model) yet)."""
    fresh = tiny_llama(seed=1, layers=2)
    assert not hasattr(fresh.model.layers[0].self_attn, "rotary_emb")
    cache, captured, _ = record_prefill(fresh, prompt_ids(4))
    pressed = apply_recorded(build_press("expectedattention", {}, 64, PROMPT), fresh, cache, captured)
    assert {layer.keys.shape[2] for layer in pressed.layers} == {64}


def test_question_after_ragged_cache_goes_token_by_token(model, monkeypatch):
    """ChunkKV may keep a shorter partial chunk on some layers; transformers' one mask (layer 0's
    length) cannot serve them, so the question is appended one token at a time. That path must
    equal the one-chunk path on a cache whose layers agree."""
    import clusterattn.eval.peer_worker as worker

    cache, captured, logits = record_prefill(model, prompt_ids(5))
    rest = torch.tensor([[5, 6, 7, 8]])
    pressed = apply_recorded(build_press("snapkv", {}, 96, PROMPT), model, cache, captured)
    chunk = greedy(model, IdTokenizer(), copy_cache(pressed), logits, PROMPT, rest, 5)
    monkeypatch.setattr(worker, "_ragged", lambda cache: True)
    one_by_one = greedy(model, IdTokenizer(), copy_cache(pressed), logits, PROMPT, rest, 5)
    assert chunk == one_by_one
    monkeypatch.undo()
    ragged = copy_cache(pressed)
    ragged.layers[1].keys = ragged.layers[1].keys[:, :, :-3]
    ragged.layers[1].values = ragged.layers[1].values[:, :, :-3]
    assert worker._ragged(ragged)
    assert len(greedy(model, IdTokenizer(), ragged, logits, PROMPT, rest, 5)) == 1


def test_rows_that_reach_eos_leave_the_batch(model, monkeypatch):
    """A padded batch whose rows stop at different steps: each row still decodes as it would alone
    (greedy drops a row from the batch at its EOS, batching.select_rows)."""
    from clusterattn.batching import stack_padded

    ids = prompt_ids(4)
    cache, captured, logits = record_prefill(model, ids)
    caches = [
        apply_recorded(build_press(name, {}, budget, PROMPT), model, cache, captured)
        for name, budget in (("snapkv", 64), ("snapkv", 96), ("knorm", 80), ("tova", 48), ("knorm", 120))
    ]
    decode = lambda c, kept=None: greedy(model, IdTokenizer(), c, logits, PROMPT, None, 8, kept)  # noqa: E731
    monkeypatch.setattr(model.generation_config, "eos_token_id", [])
    free = [decode(copy_cache(c))[0].split() for c in caches]
    eos = {int(tokens[2 + i]) for i, tokens in enumerate(free) if i % 2 == 0}
    expected = [next((tokens[:i] for i, t in enumerate(tokens) if int(t) in eos), tokens) for tokens in free]
    assert min(map(len, expected)) < 8 and max(map(len, expected)) == 8
    monkeypatch.setattr(model.generation_config, "eos_token_id", sorted(eos))
    alone = [decode(copy_cache(c))[0].split() for c in caches]
    batched = [text.split() for text in decode(*stack_padded([copy_cache(c) for c in caches]))]
    assert batched == alone == expected
