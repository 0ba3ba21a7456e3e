"""Press specs: parsing, per-request overrides, and the budget rule shared by scheduler and worker."""

from __future__ import annotations

import pytest

import clusterattn as ca
from clusterattn.vllm.spec import kept_tokens, parse_press, physical_length, physical_tokens, request_press


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


def test_decode_budget_wraps_the_press_in_a_decoding_press():
    inner = ca.ClusterAttnPress(budget=256)
    assert parse_press("clusterattn:budget=256,decode_budget=1024") == ca.DecodingPress(inner, budget=1024)
    assert parse_press(
        "snapkv:budget=96,decode_budget=160,interval=24,protect_prompt=true"
    ) == ca.DecodingPress(ca.SnapKVPress(budget=96), budget=160, interval=24, protect_prompt=True)
    whole = parse_press("h2o:decode_budget=300,compress_prompt=false")  # the prompt's budget: unused
    assert whole == ca.DecodingPress(ca.H2OPress(budget=300), budget=300, compress_prompt=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("clusterattn:budget=256,interval=64", "'interval' needs decode_budget"),
        ("clusterattn:budget=256,protect_prompt=true", "'protect_prompt' needs decode_budget"),
        ("clusterattn:budget=256,decode_budget=0", "decode_budget must be >= 1"),
        ("clusterattn:budget=256,decode_budget=16", r"decode_budget \(16\) must be >= 33"),
        ("clusterattn:budget=256,decode_budget=oops", "decode_budget must be an int"),
        ("clusterattn:budget=256,decode_budget=512,interval=0", "interval must be >= 1"),
        ("clusterattn:budget=256,decode_budget=512,compress_prompt=1", "compress_prompt must be a bool"),
        ("full:decode_budget=512", "not 'full'"),
        ("pyramidkv:budget=256,decode_budget=512", "one budget in every layer"),
        ("snapkv:budget=256,decode_budget=280,protect_prompt=true", "leaves 24 tokens"),
        ("snapkv:compression_ratio=0.5,decode_budget=512,protect_prompt=true", "token budget"),
        ("clusterattn:budget=256,decode_budget=512,intervall=3", "no field 'intervall'"),
    ],
)
def test_bad_decode_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_press(spec)


def test_physical_length_follows_the_transformers_schedule():
    # prompt of 120 kept to 48, decode budget 40, interval 8: re-selected at once (48 >= 40 + 8 - 1),
    # then every 8 tokens; never more than 47 held after a step (tests/test_decoding.py's case)
    lengths = [physical_length(120, 48, g, 40, 8) for g in range(60)]
    assert lengths[:3] == [48, 40, 41] and lengths[8:11] == [47, 40, 41] and max(lengths[1:]) == 47
    assert sum(b < a + 1 for a, b in zip(lengths[:-1], lengths[1:], strict=True)) == 8  # re-selections
    # a short kept prompt grows to budget + interval first; None keeps the whole prompt
    assert [physical_length(500, 100, g, 128, 32) for g in (0, 59, 60, 61, 91, 92)] == [
        100,
        159,
        128,
        129,
        159,
        128,
    ]
    assert physical_length(90, None, 0, 128, 32) == 90 and physical_length(90, None, 70, 128, 32) == 128
    assert (
        physical_length(2000, None, 1, 128, 32) == 128
    )  # a whole long prompt: re-selected at the first step


def test_physical_tokens_for_both_kinds_of_press():
    assert physical_tokens(ca.ClusterAttnPress(budget=256), 1000, 1010) == 266  # offset 744, fixed
    assert physical_tokens(ca.ClusterAttnPress(budget=256), 200, 210) is None  # never evicted
    assert physical_tokens(None, 1000, 1010) is None
    decoding = ca.DecodingPress(ca.ClusterAttnPress(budget=256), budget=128, interval=32)
    assert [physical_tokens(decoding, 1000, 1000 + g) for g in (0, 1, 2, 32, 33)] == [256, 128, 129, 159, 128]
    assert kept_tokens(decoding, 1000) == 256
    whole = ca.DecodingPress(ca.ClusterAttnPress(budget=256), budget=128, compress_prompt=False)
    assert kept_tokens(whole, 1000) is None and physical_tokens(whole, 100, 100) == 100
