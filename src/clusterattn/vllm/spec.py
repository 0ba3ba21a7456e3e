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

from clusterattn.presses import PRESSES, BasePress, FullKV

ENV_VAR = "CLUSTERATTN_VLLM_PRESS"
EXTRA_ARG = "clusterattn_press"
_OFF = ("", "none", "off", "full")


def _value(text: str) -> object:
    """``"256"`` -> 256, ``"0.5"`` -> 0.5, ``"none"`` -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


@functools.lru_cache(maxsize=64)
def parse_press(spec: str | None) -> BasePress | None:
    """The press a spec names, or None for no eviction.

    Raises:
        ValueError: unknown press, malformed field, a press with layer-dependent budgets
            (a paged cache needs one length per request across layers), or invalid arguments.
    """
    if spec is None or spec.strip().lower() in _OFF:
        return None
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r} in {spec!r}; known: {sorted(PRESSES)}")
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"malformed press argument {item!r} in {spec!r}: expected field=value")
        kwargs[key.strip()] = _value(value)
    try:
        press = PRESSES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments in press spec {spec!r}: {err}") from err
    if isinstance(press, FullKV):
        return None
    if not press.uniform_layers:
        raise ValueError(
            f"{type(press).__name__} gives layers different budgets; the paged cache of vLLM holds "
            "one length per request for all layers: use a uniform press"
        )
    press.warm_up()  # once per spec (cached): the first request does not load a compiled kernel
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
