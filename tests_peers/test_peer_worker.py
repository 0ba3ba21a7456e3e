"""The kvpress worker replays kvpress's own hooks on a recorded prefill (or runs kvpress's own prefill
for KVzip, KVgrad, KVCompose, ObservedAttention): for every press it runs, the cache must equal what
``with press(model): model(...)`` leaves, and its answers what kvpress's pipeline decodes; refused
presses say why. Runs in the peers environment (``make test-peers``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kvpress
import pytest
import torch
from kvpress.presses import duo_attention_press, kvzip_press
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from clusterattn.eval.peer_worker import (
    apply_recorded,
    build_press,
    copy_cache,
    fill_config_head_dim,
    greedy,
    kvpress_ratio,
    main,
    press_cache,
    record_prefill,
)
from clusterattn.eval.spec import PEER_PRESSES, PEER_REFUSED, parse_press
from clusterattn.eval.tasks import Sample

torch.set_num_threads(1)
PROMPT = 200
QUESTION = 24  # Finch's window: the prompt's last tokens stand for the question
DELIMITER = 125  # Finch's delimiter token in the live run (prompt ids are below 120)
REROTATED = {"finch", "keyrerotation"}  # kvpress's pipeline decodes these from the kept length


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


class CharTokenizer:
    """What KVzip and KVgrad load with AutoTokenizer.from_pretrained: one id per character."""

    chat_template = None

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        return cls()

    def encode(self, text, return_tensors=None, add_special_tokens=False):
        return torch.tensor([[ord(c) % 100 + 1 for c in text]])


def _head_scores(model):
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).numpy()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """What KVzip/KVgrad (the model's tokenizer) and on-the-fly DuoAttention (BookSum chapters) load
    from the Hub, replaced by fixed stand-ins; the live run and the worker's see the same."""
    monkeypatch.setattr(kvzip_press, "AutoTokenizer", CharTokenizer)
    monkeypatch.setattr(duo_attention_press, "duo_attention_on_the_fly", _head_scores)


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


@pytest.fixture(scope="module")
def sharp_model():
    """Queries and keys scaled up: peaked attention, whose answers depend on the decode positions
    (the plain random model answers the same from any position)."""
    sharp = tiny_llama(seed=2)
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return sharp


def prompt_ids(seed=0, length=PROMPT):
    return torch.randint(1, 120, (1, length), generator=torch.Generator().manual_seed(seed))


def _masks(model):
    return [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]


@torch.no_grad()
def live_kvpress(model, name, press, ids, question=QUESTION):
    """``with press(model): model(...)`` as kvpress runs it: a fresh cache, eager attention for
    ObservedAttention, the delimiter before the last ``question`` tokens for Finch; returns (cache,
    head masks, last logits)."""
    for layer in model.model.layers:  # an eager prefill would keep a previous press's masks
        layer.self_attn.masked_key_indices = None
    if name == "finch":
        press.delimiter_token_id = DELIMITER
        ids = torch.cat([ids[:, :-question], torch.tensor([[DELIMITER]]), ids[:, -question:]], 1)
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager" if name == "observedattention" else before
    cache = DynamicCache(config=model.config)
    torch.manual_seed(0)  # as the worker, for the sketches of Compactor and LeverageScore
    try:
        with press(model):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        model.config._attn_implementation = before
    return cache, _masks(model), logits


@torch.no_grad()
def kvpress_answer(model, name, budget, ids, rest, max_new_tokens, question=None):
    """The answer of kvpress's pipeline, as a reference for the worker's rows: the prefill under
    the press, then ``rest`` and greedy tokens (until EOS) at positions from the prompt length, or
    from the kept length for presses that re-rotate keys."""
    press = build_press(name, {}, budget, ids.shape[1], question)
    cache, _, logits = live_kvpress(model, name, press, ids, question)
    position = cache.get_seq_length() if name in REROTATED else ids.shape[1]
    if rest is not None:
        positions = torch.arange(position, position + rest.shape[1])[None]
        logits = model(input_ids=rest, past_key_values=cache, position_ids=positions).logits
        position += rest.shape[1]
    tokens = []
    for _ in range(max_new_tokens):
        token = logits[0, -1].argmax()
        if int(token) == model.generation_config.eos_token_id:
            break
        tokens.append(int(token))
        logits = model(
            input_ids=token.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[position]])
        ).logits
        position += 1
    return " ".join(map(str, tokens))


# DuoAttention's streaming heads keep 128 + 256 tokens: its test needs a longer prompt
LENGTH, BUDGET = {"duoattention_onthefly": 512}, {"duoattention_onthefly": 400}
MASKED = ("adakv", "criticaladakv", "kvzip", "kvgrad", "duoattention_onthefly")


@pytest.mark.parametrize("name", sorted(PEER_PRESSES))
def test_worker_cache_equals_live_kvpress(model, name):
    length, budget = LENGTH.get(name, PROMPT), BUDGET.get(name, 96)
    ids = prompt_ids(length=length)
    live, live_masks, _ = live_kvpress(model, name, build_press(name, {}, budget, length, QUESTION), ids)
    cache, captured, _ = record_prefill(model, ids)
    record = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    press = build_press(name, {}, budget, length, QUESTION)
    pressed, _ = press_cache(name, press, model, ids, cache, captured)
    for a, b in zip(live.layers, pressed.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), name
    for mask, replay_mask in zip(live_masks, _masks(model), strict=True):
        if mask is None:
            assert replay_mask is None
        else:
            assert all(torch.equal(x, y) for x, y in zip(mask, replay_mask, strict=True))
    if name in MASKED:
        assert any(mask is not None for mask in live_masks), name  # the test compared head masks
    for layer, (keys, values) in zip(cache.layers, record, strict=True):  # the record is untouched
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_kvzip_scores_a_prompt_once_for_all_its_budgets(model, monkeypatch):
    """KVzip's reconstruction runs once per prompt; each budget's masks, pruned from the shared
    scores, equal a live run's at that budget, and decoding one budget leaves the shared cache as
    prefilled."""
    from clusterattn.eval import peer_worker

    ids = prompt_ids(5)
    cache, captured, _ = record_prefill(model, ids)
    prefills = []
    own = peer_worker.own_prefill
    monkeypatch.setattr(peer_worker, "own_prefill", lambda *a, **k: prefills.append(1) or own(*a, **k))
    scored = {}
    for budget in (96, 64, 96, 150):
        live, live_masks, live_logits = live_kvpress(
            model, "kvzip", build_press("kvzip", {}, budget, PROMPT), ids
        )
        press = build_press("kvzip", {}, budget, PROMPT)
        pressed, logits = press_cache("kvzip", press, model, ids, cache, captured, scored)
        assert torch.equal(logits, live_logits)
        for mask, shared in zip(live_masks, _masks(model), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(mask, shared, strict=True)), budget
        for a, b in zip(live.layers, pressed.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        pressed.update(
            torch.zeros_like(pressed.layers[0].keys[:, :, :1]),
            torch.zeros_like(pressed.layers[0].values[:, :, :1]),
            0,
        )  # a decode step appends to the copy only
    assert len(prefills) == 1 and len(scored) == 1
    other = build_press("kvzip", {"n_sink": 2}, 96, PROMPT)  # other parameters: scored afresh
    press_cache("kvzip", other, model, ids, cache, captured, scored)
    assert len(prefills) == 2 and len(scored) == 2


def test_refused_presses_say_why_and_are_listed_in_the_readme():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, reason in PEER_REFUSED.items():
        with pytest.raises(ValueError, match=re.escape(f"kvpress {name} does not run here: {reason}")):
            parse_press(f"kvpress:{name}")
        with pytest.raises(ValueError, match=re.escape(f"kvpress {name} does not run here: {reason}")):
            build_press(name, {}, 96, PROMPT)
        assert f"`{name}`" in readme, name
    with pytest.raises(ValueError, match="unknown kvpress press 'nope'"):
        parse_press("kvpress:nope")
    with pytest.raises(ValueError, match="unknown kvpress press 'nope'"):
        build_press("nope", {}, 96, PROMPT)
    with pytest.raises(
        ValueError, match="on_the_fly_scoring must be True; another value is kvpress duoattention: its"
    ):
        build_press("duoattention_onthefly", {"on_the_fly_scoring": False}, 96, PROMPT)
    with pytest.raises(ValueError, match="query_aware setting"):
        build_press("finch", {}, 96, PROMPT)  # no question in the prompt
    with pytest.raises(ValueError, match="set by the budget"):
        build_press("duoattention_onthefly", {"head_compression_ratio": 0.5}, 96, PROMPT)
    assert not set(PEER_REFUSED) & set(PEER_PRESSES)


def test_what_a_press_fails_to_download_is_named(model, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(duo_attention_press, "duo_attention_on_the_fly", offline)
    monkeypatch.setattr(CharTokenizer, "from_pretrained", offline)
    ids = prompt_ids(length=512)
    cache, captured, _ = record_prefill(model, ids)
    for name, needs in (("duoattention_onthefly", "BookSum"), ("kvzip", "the model's tokenizer")):
        with pytest.raises(
            RuntimeError, match=f"kvpress {name} needs .*{needs}.*OSError: We couldn't connect"
        ):
            press_cache(name, build_press(name, {}, 400, 512), model, ids, cache, captured)


def test_constructors_follow_kvpress_docs():
    critical = build_press("criticaladakv_expectedattention", {}, 96, PROMPT)
    assert isinstance(critical, kvpress.CriticalAdaKVPress)
    assert isinstance(critical.press, kvpress.ExpectedAttentionPress)
    assert critical.press.use_vnorm is False  # kvpress: use_vnorm should be disabled for CriticalAdaKV
    assert isinstance(build_press("criticaladakv", {}, 96, PROMPT).press, kvpress.SnapKVPress)
    ada = build_press("adakv_expectedattention", {"epsilon": 0.01}, 96, PROMPT)
    assert isinstance(ada, kvpress.AdaKVPress) and ada.press.epsilon == 0.01
    duo = build_press("duoattention_onthefly", {}, 96, PROMPT)
    assert duo.on_the_fly_scoring and duo.head_compression_ratio == 0.0  # 200 < the 384 it always keeps
    block = build_press("block_keydiff", {"block_size": 64}, 96, PROMPT)
    assert block.block_size == 64 and isinstance(block.press, kvpress.KeyDiffPress)
    finch = build_press("finch", {"chunk_length": 100}, 96, PROMPT, QUESTION)
    assert (finch.window_size, finch.chunk_length) == (QUESTION, 100)
    with pytest.raises(ValueError, match="unknown parameters"):
        build_press("finch", {"window_size": 8}, 96, PROMPT, QUESTION)  # the question sets it


def test_duoattention_budget_is_the_average_kept_per_head(model):
    """B = 400 of 512: five of the six KV heads stream (keep 384), one keeps 512: 405 on average."""
    ids = prompt_ids(length=512)
    cache, captured, _ = record_prefill(model, ids)
    press = build_press("duoattention_onthefly", {}, 400, 512)
    press_cache("duoattention_onthefly", press, model, ids, cache, captured)
    assert sum(len(mask[0]) for mask in _masks(model)) == 5 * (512 - 384)


def test_chunkkv_parameters_reach_the_live_press(model):
    params = {"chunk_length": 32, "window_size": 32}
    press = build_press("chunkkv", params, 96, PROMPT)
    assert press.chunk_length == 32 and press.press.window_size == 32
    ids = prompt_ids(6)
    live, _, _ = live_kvpress(model, "chunkkv", build_press("chunkkv", params, 96, PROMPT), ids)
    cache, captured, _ = record_prefill(model, ids)
    pressed, _ = press_cache("chunkkv", press, model, ids, cache, captured)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(live.layers, pressed.layers, strict=True))


UNIFORM = ["snapkv", "knorm", "tova", "streamingllm", "expectedattention", "keydiff", "lagkv", "cur"]
UNIFORM += ["compactor", "leveragescore", "noncausalattn", "cap", "random", "observedattention", "finch"]
UNIFORM += ["criticalkv", "criticalkv_expectedattention", "block_keydiff", "chunk", "entropygatedchunkkv"]
UNIFORM += ["keyrerotation", "merging"]


@pytest.mark.parametrize("name", UNIFORM)
def test_token_budget_is_kept_exactly(model, name):
    ids = prompt_ids(1)
    cache, captured, _ = record_prefill(model, ids)
    pressed, _ = press_cache(name, build_press(name, {}, 80, PROMPT, QUESTION), model, ids, cache, captured)
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


AGNOSTIC = [
    ["snapkv", {}, "kvpress:snapkv", 96],
    ["chunkkv", {"nope": 1}, "kvpress:chunkkv:nope=1", 96],
    ["knorm", {}, "kvpress:knorm", 64],
    ["tova", {}, "kvpress:tova", 80],
    ["adakv", {}, "kvpress:adakv", 96],
    ["finch", {}, "kvpress:finch", 96],
    ["keyrerotation", {}, "kvpress:keyrerotation", 96],
    ["kvzip", {}, "kvpress:kvzip", 80],
    ["kvzip", {}, "kvpress:kvzip", 48],
    ["merging", {}, "kvpress:merging", 64],
]
AWARE = [
    ["snapkv", {}, "kvpress:snapkv", 96],
    ["finch", {}, "kvpress:finch", 96],
    ["finch", {}, "kvpress:finch", 64],
    ["keyrerotation", {}, "kvpress:keyrerotation", 80],
    ["kvzip", {}, "kvpress:kvzip", 96],
    ["kvzip", {}, "kvpress:kvzip", 64],
    ["criticaladakv_expectedattention", {}, "kvpress:criticaladakv_expectedattention", 96],
    ["kvcompose", {}, "kvpress:kvcompose", 96],
    ["observedattention", {}, "kvpress:observedattention", 64],
    ["chunk", {}, "kvpress:chunk", 96],
]


@pytest.mark.parametrize("setting, presses", [("query_agnostic", AGNOSTIC), ("query_aware", AWARE)])
def test_worker_rows_equal_kvpress_pipeline_answers(sharp_model, tmp_path, monkeypatch, setting, presses):
    """Each row equals what kvpress's pipeline answers with that press alone (uniform presses decode
    in one left-padded batch, re-rotated ones from their kept length, head-wise and own-prefill
    presses alone); a bad parameter or Finch without the question fails its row only."""
    import clusterattn
    from clusterattn.steps import prepare_inputs

    model = sharp_model

    loads = []
    monkeypatch.setattr(
        clusterattn, "load_model", lambda name, dtype: loads.append(dtype) or (model, IdTokenizer())
    )
    context = " ".join(str(int(t)) for t in prompt_ids(3)[0])
    sample = Sample(
        task="niah_single_1", length=PROMPT, index=0, context=context, question="5 6", answer_prefix="",
        answers=("7",), metric="string_match_all", max_new_tokens=6, n_tokens=PROMPT + 2,
    )  # fmt: skip
    job = {"sample": sample.to_dict(), "setting": setting, "presses": presses}
    job_path, out = tmp_path / "job.json", tmp_path / "predictions.jsonl"
    job_path.write_text(json.dumps({"version": 1, "model": "tiny", "jobs": [job]}))
    assert main([str(job_path), str(out)]) == 0
    assert loads == [torch.float32]  # a job without a dtype: fp32 (the runner writes its --dtype)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["press"] for r in rows] == [p[2] for p in presses]
    assert rows[0]["error"] is None and rows[0]["kept"] == 96 and rows[0]["score"] in (0.0, 1.0)
    aware = setting == "query_aware"
    inputs = prepare_inputs(
        model, IdTokenizer(), context, "5 6", max_new_tokens=6, query_aware=aware, answer_prefix="", chat=True
    )
    question = None if inputs.rest is None else inputs.rest.shape[1]
    if aware:
        question = inputs.prompt_ids.shape[1] - len(IdTokenizer()(context)["input_ids"])
    for row, (name, params, _, budget) in zip(rows, presses, strict=True):
        if params:
            assert row["error"].startswith("ValueError: kvpress chunkkv: unknown parameters")
        elif name == "finch" and not aware:
            assert row["error"].endswith(
                "finch keeps what the question attends to: run it in the query_aware setting"
            )
        else:
            assert row["error"] is None, (name, row["error"])
            answer = kvpress_answer(model, name, budget, inputs.prompt_ids, inputs.rest, 6, question)
            assert row["prediction"] == answer, name


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


@pytest.mark.parametrize("name", ["criticalkv", "criticaladakv"])
def test_critical_presses_run_on_a_config_without_head_dim(name):
    """Qwen2's config has no ``head_dim`` (the Qwen2.5-Coder models of the grid): the worker fills it
    from the attention layers, as the model derives it, and CriticalKV's value norms run."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    qwen = Qwen2ForCausalLM(config).eval()
    assert getattr(qwen.config, "head_dim", None) is None
    ids = prompt_ids()
    with pytest.raises(AttributeError, match="head_dim"):
        live_kvpress(qwen, name, build_press(name, {}, 96, PROMPT, QUESTION), ids)
    fill_config_head_dim(qwen)
    assert qwen.config.head_dim == 16 == qwen.model.layers[0].self_attn.head_dim
    cache, masks, _ = live_kvpress(qwen, name, build_press(name, {}, 96, PROMPT, QUESTION), ids)
    if name in MASKED:  # head-wise: the cache keeps its length, masks drop the tokens
        assert any(mask is not None for mask in masks)
    else:
        assert cache.layers[0].keys.shape[-2] == 96
