"""The engine-level hooks: the plugin's switch, its defaults and its refusals at engine start.

The worker and scheduler hooks run inside real engines in test_engine.py.
"""

from __future__ import annotations

import pytest

import clusterattn.vllm as plugin


@pytest.fixture
def engine_args(model_dir, monkeypatch):
    monkeypatch.setenv("CLUSTERATTN_VLLM_PRESS", "clusterattn:budget=256")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    return lambda **kw: EngineArgs(model=str(model_dir), max_model_len=2048, enforce_eager=True, **kw)


def test_register_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv("CLUSTERATTN_VLLM_PRESS", raising=False)
    assert not plugin.active()
    plugin.register()  # nothing to check but that it does nothing and needs no vLLM import


def test_register_refuses_a_bad_engine_default(monkeypatch):
    monkeypatch.setenv("CLUSTERATTN_VLLM_PRESS", "clusterattn:budget=oops")
    with pytest.raises(ValueError, match="budget"):
        plugin.register()


def test_defaults_select_our_scheduler_and_safe_settings(engine_args):
    from clusterattn.vllm.hooks import ClusterAttnScheduler

    config = engine_args().create_engine_config()
    assert config.scheduler_config.get_scheduler_cls() is ClusterAttnScheduler
    assert not config.cache_config.enable_prefix_caching
    assert not config.scheduler_config.enable_chunked_prefill
    assert not config.scheduler_config.async_scheduling


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"enable_prefix_caching": True}, "prefix caching"),
        ({"enable_chunked_prefill": True}, "chunked prefill"),
        ({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}, "scheduler_cls"),
    ],
)
def test_unsupported_settings_are_refused_at_engine_start(engine_args, setting, message):
    with pytest.raises(ValueError, match=message):
        engine_args(**setting).create_engine_config()


def test_async_scheduling_never_reaches_the_engine(engine_args):
    # vLLM 0.32 turns it off on CPU with a custom sync scheduler; check_config would refuse it otherwise.
    assert not engine_args(async_scheduling=True).create_engine_config().scheduler_config.async_scheduling


def test_a_bad_request_press_is_a_client_error(engine_args):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    assert SamplingParams(extra_args={"clusterattn_press": "snapkv:budget=128"}).extra_args
    with pytest.raises(VLLMValidationError, match="unknown press"):
        SamplingParams(extra_args={"clusterattn_press": "quest:budget=128"})
