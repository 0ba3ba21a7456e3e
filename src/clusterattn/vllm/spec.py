"""Press specifications for the vLLM plugin: parse, resolve per request, decide the budget.

A spec is a string ``"<press>:<field>=<value>,..."``, e.g. ``"clusterattn:budget=256"`` or
``"snapkv:budget=128,window_size=16"``; ``"none"`` (or an empty string) means no eviction. The
engine default comes from ``$CLUSTERATTN_VLLM_PRESS``; a request may override it with
``SamplingParams(extra_args={"clusterattn_press": "<spec>"})``.

The scheduler (which frees blocks) and the worker (which moves the cache) decide independently
whether a request is compressed and to how many tokens; both call :func:`kept_tokens` on the same
inputs, so they always agree. Nothing here imports vLLM.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from clusterattn.presses import BasePress, FullKV
from clusterattn.presses.spec import build_press, parse_fields, split_spec

ENV_VAR = "CLUSTERATTN_VLLM_PRESS"
EXTRA_ARG = "clusterattn_press"
_OFF = ("", "none", "off", "full")


@functools.lru_cache(maxsize=64)
def parse_press(spec: str | None) -> BasePress | None:
    """The press a spec names, or None for no eviction.

    Raises:
        ValueError: unknown press, malformed or duplicate field, a value its press refuses (NaN,
            out of range, wrong type: the press constructors of the library decide), or a press with
            layer-dependent budgets (a paged cache needs one length per request across layers).
    """
    if spec is None or spec.strip().lower() in _OFF:
        return None
    name, rest = split_spec(spec)
    press = build_press(name, parse_fields(rest, spec), spec)  # the library's constructors validate
    if isinstance(press, FullKV):
        return None
    if not press.uniform_layers:
        raise ValueError(
            f"{type(press).__name__} gives layers different budgets; the paged cache of vLLM holds "
            "one length per request for all layers: use a uniform press"
        )
    press.warm_up()  # once per spec (cached): a press's one-time set-up runs before the first request
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


def kept_tokens(press: BasePress | None, prompt_len: int) -> int | None:
    """Prompt tokens kept per KV head after prefill, or None when the prompt stays whole.

    Mirrors :meth:`BasePress.select`: a prompt not longer than the budget is untouched.
    """
    if press is None:
        return None
    budget = press.total_budget(prompt_len)
    return budget if prompt_len > budget else None
