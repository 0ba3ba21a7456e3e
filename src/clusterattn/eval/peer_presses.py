"""kvpress 0.5.5's presses by name, for the peers worker (:mod:`clusterattn.eval.peer_worker`).

Names and classes are listed in :data:`clusterattn.eval.spec.PEER_PRESSES`; this module builds a
press for a budget and says how the worker must drive it:

- most presses compress in kvpress's forward hook, which the worker replays on one recorded prefill;
- KVzip, KVgrad and KVCompose re-run the prompt over the prefilled cache inside their own context
  manager, and ObservedAttention needs the eager prefill's attention weights: these go through
  kvpress's own ``with press(model): model(...)`` (:data:`OWN_PREFILL`), one prefill per press;
  KVzip's scores do not depend on the ratio, so it runs once per prompt and is pruned for each
  budget (:data:`SCORED_ONCE`);
- Finch's window is the question, so it needs the question inside the prompt (query-aware setting);
  kvpress finds it with a delimiter token that its embedding hook removes, the worker passes its
  length;
- Finch and KeyRerotation re-rotate the kept keys: decoding continues from the kept length, as in
  kvpress's pipeline (:func:`decode_start`).
"""

from __future__ import annotations

import inspect

# Defaults that differ from the kvpress class's own (a parameter of the same name overrides them).
DEFAULTS = {
    "random": {"seed": 0},  # kvpress draws unseeded; a seed makes the rows reproducible
    "duoattention_onthefly": {"on_the_fly_scoring": True},
    # kvpress's evaluation registry pairs CriticalKV with ExpectedAttention(use_vnorm=False)
    "criticalkv_expectedattention": {"use_vnorm": False},
    "criticaladakv_expectedattention": {"use_vnorm": False},
}
# Parameters a name fixes: key -> (value, the press another value would be).
FIXED = {"duoattention_onthefly": {"on_the_fly_scoring": (True, "duoattention")}}
OWN_PREFILL = ("kvzip", "kvgrad", "kvcompose", "observedattention")
# Own-prefill presses whose scores do not depend on the ratio (KVzip's reconstruction scores): the
# worker scores a prompt once and prunes for each budget with the press's own ``compress_post``.
SCORED_ONCE = ("kvzip",)
EAGER = ("observedattention",)  # prefilled with eager attention, whose weights the press scores
# What a press loads at run time besides the model, named in its error when that fails.
NEEDS = {
    "duoattention_onthefly": "50 BookSum chapters (the kmfoda/booksum dataset) and the model's tokenizer, "
    "from the Hugging Face cache or Hub",
    "kvzip": "the model's tokenizer (AutoTokenizer.from_pretrained(name_or_path))",
    "kvgrad": "the model's tokenizer (AutoTokenizer.from_pretrained(name_or_path))",
}
DUO_KEPT = 128 + 256  # the sink and recent tokens every head keeps under on-the-fly DuoAttention


def kvpress_ratio(name: str, budget: int | float, prompt_tokens: int, window: int) -> float:
    """The compression ratio that makes kvpress keep ``budget`` tokens of a ``prompt_tokens`` prompt."""
    if isinstance(budget, float):
        return budget
    kept = budget - window if name == "pyramidkv" else budget
    return min(max(0.0, 1.0 - (kept + 0.5) / prompt_tokens), 1.0 - 1.0 / prompt_tokens)


def duo_heads(ratio: float, prompt_tokens: int) -> float:
    """DuoAttention's share of streaming heads that drops ``ratio`` of the cache on average (its
    streaming heads keep :data:`DUO_KEPT` tokens, so no budget below that is reached)."""
    dropped = 1.0 - DUO_KEPT / prompt_tokens
    return 0.0 if dropped <= 0 else min(1.0, ratio / dropped)


def _accepted(cls) -> set[str]:
    return set(inspect.signature(cls).parameters) - {"press", "compression_ratio"}


def _check(name: str, params: dict, accepted: set[str]) -> None:
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"kvpress {name}: unknown parameters {sorted(unknown)}; it takes {sorted(accepted)}")


def build_press(name: str, params: dict, budget, prompt_tokens: int, question_tokens: int | None = None):
    """A kvpress press for ``budget``. A wrapper (ChunkKV, AdaKV, CriticalKV, ...) wraps the inner
    press of :data:`~clusterattn.eval.spec.PEER_PRESSES`; parameters go to the wrapper when it has a
    field of that name, otherwise to the inner press. ``question_tokens``: the question's length at
    the end of the prompt (query-aware setting), which Finch needs."""
    import kvpress

    from clusterattn.eval.spec import PEER_PRESSES, PEER_REFUSED

    if name in PEER_REFUSED:
        raise ValueError(f"kvpress {name} does not run here: {PEER_REFUSED[name]}")
    if name not in PEER_PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}; choose from {sorted(PEER_PRESSES)}")
    for key in ("budget", "compression_ratio", "head_compression_ratio"):
        if key in params:
            raise ValueError(f"kvpress {name}: {key} is set by the budget, not by a parameter")
    params = {**DEFAULTS.get(name, {}), **params}
    for key, (value, other) in FIXED.get(name, {}).items():
        if params[key] != value:
            why = f": {PEER_REFUSED[other]}" if other in PEER_REFUSED else ""
            raise ValueError(f"kvpress {name}: {key} must be {value}; another value is kvpress {other}{why}")
    outer_name, inner_name = PEER_PRESSES[name]
    outer_cls = getattr(kvpress, outer_name)
    if inner_name is None:
        _check(name, params, _accepted(outer_cls) - {"head_compression_ratio"})
        window = params.get("window_size", getattr(outer_cls, "window_size", 0))
        ratio = kvpress_ratio(name, budget, prompt_tokens, window)
        if name == "duoattention_onthefly":
            return outer_cls(head_compression_ratio=duo_heads(ratio, prompt_tokens), **params)
        press = outer_cls(compression_ratio=ratio, **params)
        if name == "finch":
            if not question_tokens:
                raise ValueError(
                    "kvpress finch keeps what the question attends to: run it in the query_aware setting"
                )
            press.window_size = question_tokens  # what its delimiter token would tell it
        return press
    inner_cls = getattr(kvpress, inner_name)
    outer_fields = _accepted(outer_cls)
    outer = {k: v for k, v in params.items() if k in outer_fields}
    inner = {k: v for k, v in params.items() if k not in outer}
    _check(name, inner, outer_fields | _accepted(inner_cls))
    ratio = kvpress_ratio(name, budget, prompt_tokens, 0)
    return outer_cls(press=inner_cls(compression_ratio=ratio, **inner), **outer)


def decode_start(press, pressed, prompt_tokens: int) -> int:
    """The position decoding starts from: the kept length for presses that re-rotate the kept keys
    to positions ``0..kept-1`` (kvpress's pipeline does the same), else the prompt length."""
    import kvpress

    rerotated = isinstance(press, kvpress.KeyRerotationPress) or (
        isinstance(press, kvpress.FinchPress) and press.rerotate_keys
    )
    return pressed.layers[0].keys.shape[2] if rerotated else prompt_tokens
