"""kvpress presses on our prompts, run inside the peers environment (``make peers``).

``python -m clusterattn.eval.peer_worker JOB.json PREDICTIONS.jsonl`` (started by
:func:`clusterattn.eval.runner.run_eval`) answers each job's prompt with kvpress's own presses and
appends rows in the runner's format.

How: one prefill per prompt with forward hooks recording what kvpress's hook receives on every
attention layer (its keyword arguments and output); then, for each press, kvpress's own
``press.forward_hook`` runs on a copy of the full cache layer by layer. kvpress compresses after a
layer's attention and never changes the prefill's activations, so this is exactly the cache
``with press(model): model(...)`` leaves (tested in ``tests_peers``). Presses that re-run the
prompt inside their own context manager (KVzip, KVgrad, KVCompose) or score eager attention weights
(ObservedAttention) run kvpress's own ``with press(model): model(...)`` instead, one prefill each;
KVzip, whose scores do not depend on the ratio, once per prompt for all its budgets.
How each press is built and driven: :mod:`clusterattn.eval.peer_presses`.

Decoding is the plain greedy loop of kvpress's pipeline: positions continue from the prompt length
(from the kept length for presses that re-rotate keys: Finch, KeyRerotation). Presses that leave
one length across layers decode together as one left-padded batch with an attention mask over the
real slots (a batch reads the weights once per step, so this is most of the speed); others batch
by equal shapes; head-wise presses (AdaKV, CriticalAdaKV, DuoAttention, KVzip, ...), whose masks
live on the attention modules, and presses with their own prefill decode alone.

A token budget ``B`` is passed as the compression ratio that makes kvpress keep ``B`` tokens per
head (``1 - (B + 0.5) / L``; PyramidKV's own budget adds its window, which is subtracted; for
DuoAttention, the share of streaming heads that keeps ``B`` per head on average).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

from clusterattn.eval.peer_presses import (
    EAGER,
    NEEDS,
    OWN_PREFILL,
    SCORED_ONCE,
    build_press,
    decode_start,
    kvpress_ratio,
)

JOB_VERSION = 1
__all__ = ["answer_job", "apply_recorded", "build_press", "greedy", "kvpress_ratio", "main", "press_cache"]


def _language_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _attention_layers(model):
    return [layer.self_attn for layer in _language_model(model).layers]


@torch.no_grad()
def record_prefill(model, ids: torch.Tensor):
    """Run the prefill once; returns (full cache, {layer: (module, kwargs, output)}, last logits)."""
    from transformers import DynamicCache

    captured = {}

    def hook(module, args, kwargs, output):
        captured[module.layer_idx] = (module, dict(kwargs), output)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _attention_layers(model)]
    try:
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        for handle in handles:
            handle.remove()
    return cache, captured, logits


def copy_cache(cache):
    """A cache whose layers can be replaced without touching ``cache`` (tensors are shared)."""
    pressed = copy.copy(cache)
    pressed.layers = [copy.copy(layer) for layer in cache.layers]
    return pressed


@torch.no_grad()
def apply_recorded(press, model, cache, captured):
    """kvpress's own hook on every recorded layer, on a copy of ``cache``; returns the copy."""
    pressed = copy_cache(cache)
    _reset_modules(model)
    press.post_init_from_model(model)
    for _, (module, kwargs, output) in sorted(captured.items()):
        if getattr(module, "is_sliding", False):
            continue
        press.forward_hook(module, (), {**kwargs, "past_key_values": pressed}, output)
    return pressed


def _reset_modules(model):
    """What kvpress's context manager sets on each layer, and no head masks left by a previous press."""
    for module in _attention_layers(model):
        module.masked_key_indices = None
        module.rotary_emb = _language_model(model).rotary_emb


@torch.no_grad()
def own_prefill(press, model, ids: torch.Tensor, eager: bool = False):
    """``with press(model): model(...)`` on a fresh cache, for presses that re-run the prompt inside
    their context manager (KVzip, KVgrad, KVCompose) or score eager attention weights
    (ObservedAttention, ``eager``); returns (cache, last logits)."""
    from transformers import DynamicCache

    _reset_modules(model)
    before = model.config._attn_implementation
    if eager:
        model.config._attn_implementation = "eager"
    try:
        cache = DynamicCache(config=model.config)
        with press(model):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        model.config._attn_implementation = before
    return cache, logits


@torch.no_grad()
def scored_once(press, model, ids: torch.Tensor, scored: dict, key) -> tuple:
    """KVzip's cache and last logits for ``press``'s ratio, scoring the prompt once per ``key``.

    kvpress's KVzip scores every context token by reconstructing the context (2-3 prefills' worth
    of compute) and only then prunes by its ratio in ``compress_post``, which leaves head masks on
    the attention modules and the cache as prefilled. The first budget runs kvpress's own prefill
    and keeps (cache, logits, scores) in ``scored``; later budgets of the same press and parameters
    (``key``) run ``compress_post`` on a copy of those scores: the same masks as a fresh run."""
    if key not in scored:
        kept = {}
        prune = press.compress_post

        def keep_scores(model):
            kept["scores"] = press.score_val.clone()
            return prune(model)

        press.compress_post = keep_scores
        try:
            cache, logits = own_prefill(press, model, ids)
        finally:
            del press.compress_post
        if "scores" not in kept:  # ratio 0: nothing pruned, nothing scored
            return cache, logits
        scored[key] = (cache, logits, kept["scores"])
    else:
        _reset_modules(model)
        press.post_init_from_model(model)
        cache, logits, scores = scored[key]
        press.score_val = scores.clone()  # compress_post raises the sinks' scores in place
        press.compress_post(model)
    return copy_cache(cache), logits  # decoding appends to the copy's layers, not the kept cache


def _scoring_key(name: str, press) -> tuple:
    """What a :data:`SCORED_ONCE` press's scores depend on: its name and fields but the ratio."""
    fields = {f.name: getattr(press, f.name) for f in dataclasses.fields(press) if f.init}
    fields.pop("compression_ratio")
    return name, json.dumps(fields, sort_keys=True, default=repr)


def press_cache(name: str, press, model, ids: torch.Tensor, cache, captured, scored: dict | None = None):
    """The cache ``press`` leaves, and the last logits when the press ran its own prefill (else None):
    kvpress's hook replayed on the record, or kvpress's own prefill for :data:`OWN_PREFILL`
    (:data:`SCORED_ONCE` presses scored once per ``scored`` dict: pass one dict per prompt). What a
    press fails to load (a tokenizer, a dataset: an OSError) names what it needs (:data:`NEEDS`)."""
    torch.manual_seed(0)  # Compactor's and LeverageScore's sketches draw from torch's generator
    try:
        if name in SCORED_ONCE and scored is not None:
            return scored_once(press, model, ids, scored, _scoring_key(name, press))
        if name in OWN_PREFILL:
            return own_prefill(press, model, ids, eager=name in EAGER)
        return apply_recorded(press, model, cache, captured), None
    except OSError as err:
        if name in NEEDS:
            raise RuntimeError(f"kvpress {name} needs {NEEDS[name]}: {type(err).__name__}: {err}") from err
        raise


@torch.no_grad()
def greedy(
    model, tokenizer, cache, logits, start: int, rest: torch.Tensor | None, max_new_tokens: int,
    kept: torch.Tensor | None = None,
) -> list[str]:  # fmt: skip
    """kvpress's pipeline decode for every batch row of ``cache``: append ``rest`` at positions
    ``start..``, then greedy tokens until EOS; returns one text per row. ``kept`` ``(rows, width)``
    marks the real slots of a left-padded batch (:func:`~clusterattn.batching.stack_padded`); without
    it no attention mask is passed, as in kvpress's pipeline."""
    from clusterattn.batching import select_rows

    rows, position = cache.layers[0].keys.shape[0], start
    logits = logits.expand(rows, -1, -1)
    mask = None if kept is None else kept.long()

    def extend(new: int) -> torch.Tensor | None:
        nonlocal mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(rows, new)], -1)
        return mask

    if rest is not None and rest.shape[1] and kept is None and _ragged(cache):
        # transformers builds one mask from layer 0's length; a cache whose layers kept different
        # lengths (ChunkKV's partial last chunk) takes the question one token at a time (no mask).
        for offset in range(rest.shape[1]):
            logits = model(
                input_ids=rest[:, offset : offset + 1].expand(rows, -1), past_key_values=cache,
                position_ids=torch.full((rows, 1), position, dtype=torch.long), logits_to_keep=1,
            ).logits  # fmt: skip
            position += 1
    elif rest is not None and rest.shape[1]:
        positions = torch.arange(start, start + rest.shape[1])[None].expand(rows, -1)
        logits = model(
            input_ids=rest.expand(rows, -1), past_key_values=cache, position_ids=positions, logits_to_keep=1,
            attention_mask=extend(rest.shape[1]),
        ).logits  # fmt: skip
        position += rest.shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out, active = [[] for _ in range(rows)], list(range(rows))  # active: batch row -> answer
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        ids = tokens.tolist()
        running = [token not in eos for token in ids]
        for row, token, more in zip(active, ids, running, strict=True):
            if more:
                out[row].append(token)
        if not any(running) or step == max_new_tokens - 1:
            break
        if not all(running):  # rows that emitted EOS leave the batch (batching.select_rows)
            keep = torch.tensor([i for i, more in enumerate(running) if more])
            active, tokens, rows = [active[i] for i in keep.tolist()], tokens[keep], len(keep)
            mask = None if mask is None else mask[keep]
            select_rows(cache, keep)
        logits = model(
            input_ids=tokens[:, None], past_key_values=cache,
            position_ids=torch.full((rows, 1), position, dtype=torch.long), attention_mask=extend(1),
        ).logits  # fmt: skip
        position += 1
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def _ragged(cache) -> bool:
    return len({layer.keys.shape[2] for layer in cache.layers}) > 1


def _masked(model) -> bool:
    """True while a head-wise press (AdaKV) has left masks on the attention modules."""
    return any(getattr(m, "masked_key_indices", None) is not None for m in _attention_layers(model))


def answer_job(model, tokenizer, job: dict) -> list[dict]:
    """Rows for one prompt under every kvpress press of the job."""
    from clusterattn.batching import PADDED, batch_key, stack_caches, stack_padded
    from clusterattn.eval.spec import budget_label
    from clusterattn.eval.tasks import Sample, score
    from clusterattn.integration import masked_gqa
    from clusterattn.steps import prepare_inputs

    sample, setting = Sample.from_dict(job["sample"]), job["setting"]
    rows = []
    for _, _, label, budget in job["presses"]:
        rows.append({
            "model": job["model"], "task": sample.task, "length": sample.length, "setting": setting,
            "index": sample.index, "seed": sample.seed, "answers": list(sample.answers),
            "metric": sample.metric, "depth": sample.depth, "n_tokens": sample.n_tokens,
            "press": label, "budget": budget_label(budget),
        })  # fmt: skip
    try:
        inputs = prepare_inputs(
            model, tokenizer, sample.context, sample.question, max_new_tokens=sample.max_new_tokens,
            query_aware=setting == "query_aware", answer_prefix=sample.answer_prefix, chat=True,
        )  # fmt: skip
        ids = inputs.prompt_ids
        cache, captured, logits = record_prefill(model, ids)
    except Exception as err:  # the whole prompt failed: every press's row says so
        for row in rows:
            row.update(prediction=None, score=None, error=f"{type(err).__name__}: {err}")
        return rows
    groups: dict[tuple, list] = {}
    decode = lambda caches, kept=None, start=ids.shape[1], first=logits: greedy(  # noqa: E731
        model, tokenizer, caches, first, start, inputs.rest, sample.max_new_tokens, kept
    )
    finch = setting == "query_aware" and any(press[0] == "finch" for press in job["presses"])
    scored = {}  # KVzip's scores of this prompt, shared by its budgets
    question = _question_tokens(model, tokenizer, sample) if finch else None
    for row, (name, params, _, budget) in zip(rows, job["presses"], strict=True):
        try:
            press = build_press(name, params, budget, ids.shape[1], question)
            pressed, own_logits = press_cache(name, press, model, ids, cache, captured, scored)
            row["kept"] = max(layer.keys.shape[2] for layer in pressed.layers)
            start = decode_start(press, pressed, ids.shape[1])
            if _masked(model) or own_logits is not None:  # masks on the modules, or its own prefill
                text = decode(pressed, start=start, first=logits if own_logits is None else own_logits)[0]
                row.update(prediction=text, score=score(sample, text), error=None)
            else:  # one batch for every cache with one length across its layers (left-padded)
                groups.setdefault((start, batch_key(pressed, plain=True)), []).append((row, pressed))
        except Exception as err:  # recorded as failed; the run goes on
            row.update(prediction=None, score=None, error=f"{type(err).__name__}: {err}")
    for _module in _attention_layers(model):
        _module.masked_key_indices = None
    for (start, key), members in groups.items():
        try:
            caches = [pressed for _, pressed in members]
            if key == PADDED:
                with masked_gqa(len(caches) > 1):
                    texts = decode(*stack_padded(caches), start=start)
            else:
                texts = decode(stack_caches(caches), start=start)
            for (row, _), text in zip(members, texts, strict=True):
                row.update(prediction=text, score=score(sample, text), error=None)
        except Exception as err:
            for row, _ in members:
                row.update(prediction=None, score=None, error=f"{type(err).__name__}: {err}")
    return rows


def _question_tokens(model, tokenizer, sample) -> int | None:
    """How many tokens follow the context in the query-aware prompt (Finch's window), or None."""
    from clusterattn.steps import prepare_inputs

    try:
        rest = prepare_inputs(
            model, tokenizer, sample.context, sample.question, max_new_tokens=sample.max_new_tokens,
            query_aware=False, answer_prefix=sample.answer_prefix, chat=True,
        ).rest  # fmt: skip
    except ValueError:  # nothing follows the context
        return None
    return rest.shape[1]


def fill_config_head_dim(model) -> None:
    """Set ``model.config.head_dim`` from the attention layers when the config leaves it out.

    Some configs (Qwen2's in transformers 5.x) carry no ``head_dim``; the attention modules derive it
    (``hidden_size // num_attention_heads``), but kvpress's CriticalKV / CriticalAdaKV read
    ``config.head_dim`` and would fail with an ``AttributeError``. The value set is the one the
    model's own attention uses, so nothing else changes."""
    if getattr(model.config, "head_dim", None) is None:
        model.config.head_dim = model.model.layers[0].self_attn.head_dim


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    import clusterattn as ca

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m clusterattn.eval.peer_worker JOB.json PREDICTIONS.jsonl", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("version") != JOB_VERSION:
        raise ValueError(f"job version {spec.get('version')} != {JOB_VERSION}")
    import kvpress  # noqa: F401  (patches attention for AdaKV's masked heads)

    model, tokenizer = ca.load_model(spec["model"], dtype=getattr(torch, spec.get("dtype", "float32")))
    fill_config_head_dim(model)
    from clusterattn.eval.predictions import open_for_append

    with open_for_append(Path(argv[1])) as sink:
        for job in tqdm(spec["jobs"], desc=f"kvpress {spec['model']}", unit="prompt"):
            for row in answer_job(model, tokenizer, {**job, "model": spec["model"]}):
                sink.write(json.dumps(row) + "\n")
            sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
