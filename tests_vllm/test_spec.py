"""Press specs: parsing, per-request overrides, and the budget rule shared by scheduler and worker."""

from __future__ import annotations

import pytest

import clusterattn as ca
from clusterattn.vllm.spec import kept_tokens, parse_press, request_press


def test_parse_press_builds_the_core_press():
    press = parse_press("clusterattn:budget=256,window_size=16,span_before=0.25,aggregation=mean")
    assert press == ca.ClusterAttnPress(budget=256, window_size=16, span_before=0.25, aggregation="mean")
    assert parse_press("snapkv:budget=128") == ca.SnapKVPress(budget=128)
    assert parse_press("clusterattn:compression_ratio=0.75") == ca.ClusterAttnPress(compression_ratio=0.75)


@pytest.mark.parametrize("spec", [None, "", "none", "off", "full", " None "])
def test_off_specs(spec):
    assert parse_press(spec) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quest:budget=3", "unknown press"),
        ("clusterattn:budget", "not field=value"),
        ("clusterattn:bugdet=256", "no field 'bugdet'"),
        ("clusterattn:budget=8", "budget"),
        ("pyramidkv:budget=256", "one length per request"),
        ("clusterattn:budget=256,budget=128", "given twice"),
        ("clusterattn:budget=\uff12\uff15\uff16", "ASCII"),
        ("clusterattn:budget=256,theta=nan", "theta must be finite"),
        ("clusterattn:budget=256,alpha=inf", "alpha must be finite"),
        ("clusterattn:budget=256,alpha=nan", "alpha must be finite"),
        ("clusterattn:budget=256,n_sink=225", "n_sink"),
        ("h2o:budget=256,chunk_size=0", "chunk_size"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_press(spec)


def test_request_overrides_the_engine_default():
    assert request_press(None, "snapkv:budget=64") == ca.SnapKVPress(budget=64)
    own = {"clusterattn_press": "clusterattn:budget=96"}
    assert request_press(own, None) == ca.ClusterAttnPress(budget=96)
    assert request_press({"clusterattn_press": None}, "snapkv:budget=64") is None
    assert request_press({"other": 1}, "none") is None
    with pytest.raises(ValueError, match="spec string"):
        request_press({"clusterattn_press": 256}, None)


def test_kept_tokens_follows_press_select():
    press = ca.ClusterAttnPress(budget=256)
    assert kept_tokens(press, 2000) == 256
    assert kept_tokens(press, 256) is None  # a prompt within the budget stays whole
    assert kept_tokens(None, 2000) is None
    assert kept_tokens(ca.SnapKVPress(compression_ratio=0.5), 1000) == 500
