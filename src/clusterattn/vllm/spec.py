"""Press specifications for the vLLM plugin: parse, resolve per request, decide the budget.

A spec is a string ``"<press>:<field>=<value>,..."``, e.g. ``"clusterattn:budget=256"`` or
``"snapkv:budget=128,window_size=16"``; ``"none"`` (or an empty string) means no eviction. The
engine default comes from ``$CLUSTERATTN_VLLM_PRESS``; a request may override it with
``SamplingParams(extra_args={"clusterattn_press": "<spec>"})``.

Decode-phase eviction (:class:`~clusterattn.presses.decoding.DecodingPress`): any press spec plus
``decode_budget=D`` (and optionally ``interval=I`` (default 128), ``compress_prompt=false``,
``protect_prompt=true``), e.g. ``"clusterattn:budget=256,decode_budget=1024,interval=128"``: the
prompt is compressed to ``budget`` at prefill, then each layer is re-selected with the same press
down to ``D`` tokens per KV head whenever it holds ``D + I``.

The scheduler (which frees blocks) and the worker (which moves the cache) decide independently
whether a request is compressed and to how many tokens; both call :func:`kept_tokens` and
:func:`physical_tokens` on the same inputs, so they always agree. Nothing here imports vLLM.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from clusterattn.presses import BasePress, DecodingPress, FullKV
from clusterattn.presses.spec import build_press, parse_fields, split_spec

ENV_VAR = "CLUSTERATTN_VLLM_PRESS"
EXTRA_ARG = "clusterattn_press"
_OFF = ("", "none", "off", "full")
_DECODING_FIELDS = ("interval", "compress_prompt", "protect_prompt")  # with decode_budget only


@functools.lru_cache(maxsize=64)
def parse_press(spec: str | None) -> BasePress | DecodingPress | None:
    """The press a spec names (a :class:`DecodingPress` with ``decode_budget``), or None.

    Raises:
        ValueError: unknown press, malformed or duplicate field, a value its press refuses (NaN,
            out of range, wrong type: the press constructors of the library decide), or a press with
            layer-dependent budgets (a paged cache needs one length per request across layers).
    """
    if spec is None or spec.strip().lower() in _OFF:
        return None
    name, rest = split_spec(spec)
    fields = parse_fields(rest, spec)
    if "decode_budget" in fields:
        return _decoding_press(name, fields, spec)
    if any(key in fields for key in _DECODING_FIELDS):
        key = next(key for key in _DECODING_FIELDS if key in fields)
        raise ValueError(f"press {spec!r}: field {key!r} needs decode_budget (decode-phase eviction)")
    press = build_press(name, fields, spec)  # the library's constructors validate
    if isinstance(press, FullKV):
        return None
    if not press.uniform_layers:
        raise ValueError(
            f"{type(press).__name__} gives layers different budgets; the paged cache of vLLM holds "
            "one length per request for all layers: use a uniform press"
        )
    press.warm_up()  # once per spec (cached): a press's one-time set-up runs before the first request
    return press


def _decoding_press(name: str, fields: dict[str, object], spec: str) -> DecodingPress:
    """``DecodingPress(<name>(**fields), decode_budget, interval, ...)``; errors name the spec."""
    wrapper = {"budget": fields.pop("decode_budget")}
    wrapper.update((key, fields.pop(key)) for key in _DECODING_FIELDS if key in fields)
    if name == "full":
        raise ValueError(f"press {spec!r}: decode_budget needs a press with a selection rule, not 'full'")
    if (
        wrapper.get("compress_prompt") is False
        and "budget" not in fields
        and "compression_ratio" not in fields
    ):
        fields["budget"] = wrapper["budget"]  # the prompt stays whole: its budget is never used
    inner = build_press(name, fields, spec)
    try:
        press = DecodingPress(inner, **wrapper)
    except (TypeError, ValueError) as err:
        text = str(err)  # the wrapper's "budget" is this spec's decode_budget
        raise ValueError(
            f"press {spec!r}: " + ("decode_" + text if text.startswith("budget") else text)
        ) from None
    if press.protect_prompt:
        if not press.compress_prompt or inner.budget is None:
            raise ValueError(
                f"press {spec!r}: protect_prompt needs the prompt compressed to a token budget (budget=...), "
                "so that what the prompt keeps is known when the request arrives"
            )
        room, least = press.budget - inner.budget, press.decode_press.min_budget
        if room < least:
            raise ValueError(
                f"press {spec!r}: protect_prompt: decode_budget={press.budget} leaves {room} tokens beside "
                f"the prompt's {inner.budget}; {type(inner).__name__} needs at least {least}"
            )
    press.warm_up()
    return press


def default_spec() -> str | None:
    """The engine-wide spec from ``$CLUSTERATTN_VLLM_PRESS`` (None when unset)."""
    return os.environ.get(ENV_VAR)


def request_press(extra_args: Mapping | None, default: str | None) -> BasePress | None:
    """The press for one request: its ``extra_args["clusterattn_press"]``, else the default."""
    spec = default
    if extra_args and EXTRA_ARG in extra_args:
        spec = extra_args[EXTRA_ARG]
        if spec is not None and not isinstance(spec, str):
            raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be a press spec string, got {spec!r}")
    return parse_press(spec)


def kept_tokens(press: BasePress | DecodingPress | None, prompt_len: int) -> int | None:
    """Prompt tokens kept per KV head after prefill, or None when the prompt stays whole.

    Mirrors :meth:`BasePress.select`: a prompt not longer than the budget is untouched (and a
    :class:`DecodingPress` with ``compress_prompt=False`` never compresses the prompt).
    """
    if isinstance(press, DecodingPress):
        press = press.press if press.compress_prompt else None
    if press is None:
        return None
    budget = press.total_budget(prompt_len)
    return budget if prompt_len > budget else None


def physical_length(
    prompt_len: int, kept: int | None, generated: int, decode_budget: int, interval: int
) -> int:
    """Cache slots a decode-evicting request holds once ``generated`` tokens after its prompt are
    in its cache (each decode step appends one; the step that brings a layer to
    ``decode_budget + interval`` re-selects it down to ``decode_budget``), as
    :func:`clusterattn.decoding.observe` does on the transformers path.

    ``kept``: the prompt's tokens kept at prefill (:func:`kept_tokens`; None: all ``prompt_len``).
    After a preemption the re-prefill of prompt + ``generated`` tokens lands on the same length.
    """
    held = prompt_len if kept is None else kept
    if generated <= 0:
        return held
    first = max(1, decode_budget + interval - held)  # the first step that re-selects
    if generated < first:
        return held + generated
    return decode_budget + (generated - first) % interval


def physical_tokens(press, prompt_len: int, computed: int) -> int | None:
    """Cache slots a request holds once ``computed`` (>= ``prompt_len``) tokens are in its cache,
    or None when nothing is ever evicted (the offset of slots and lengths is ``computed - this``)."""
    kept = kept_tokens(press, prompt_len)
    if isinstance(press, DecodingPress):
        return physical_length(prompt_len, kept, computed - prompt_len, press.budget, press.interval)
    return None if kept is None else computed - (prompt_len - kept)
