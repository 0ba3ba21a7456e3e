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


def test_rope_frequencies_turn_vllm_rotated_keys_back():
    """The frequencies read from vLLM's own rotary modules (a shared one, a scaled one), recomputed
    in fp32 whatever the engine's dtype, undo vLLM's rotation with :func:`clusterattn.rope.unrotate`;
    interleaved (GPT-J style) rotation is refused."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from clusterattn.rope import unrotate
    from clusterattn.vllm.hooks import rope_frequencies

    def rope(kind: dict, neox: bool = True, dtype=torch.bfloat16):
        params = {"rope_theta": 10000.0, **kind}
        return get_rope(16, max_position=64, is_neox_style=neox, rope_parameters=params, dtype=dtype)

    def model_of(*ropes):
        layers = torch.nn.ModuleList()
        for r in ropes:
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            layer.self_attn.rotary_emb = r
            layers.append(layer)
        model = torch.nn.Module()
        model.layers = layers
        return model

    with set_current_vllm_config(VllmConfig()):
        plain = rope({"rope_type": "default"})
        linear = rope({"rope_type": "linear", "factor": 4.0})
        exact = rope({"rope_type": "default"}, dtype=torch.float32)
        gptj = rope({"rope_type": "default"}, neox=False)
    table = rope_frequencies(model_of(plain, plain, linear))
    expected = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert sorted(table) == [0, 1, 2]
    torch.testing.assert_close(table[0], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(table[2], expected / 4, atol=1e-6, rtol=1e-6)
    # keys rotated by vLLM's own code (token-major, 2 KV heads) come back
    keys = torch.randn(40, 2 * 16)
    _, rotated = exact.forward_native(torch.arange(40), torch.zeros(40, 2 * 16), keys.clone())
    heads_first = rotated.view(40, 2, 16).transpose(0, 1).unsqueeze(0)
    back = unrotate(heads_first, rope_frequencies(model_of(exact))[0])
    torch.testing.assert_close(back, keys.view(40, 2, 16).transpose(0, 1).unsqueeze(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="interleaved"):
        rope_frequencies(model_of(gptj))
    with pytest.raises(ValueError, match="no rotary module"):
        rope_frequencies(torch.nn.Linear(2, 2))
