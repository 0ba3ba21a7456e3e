"""DBAC against a naive loop reference, and its defining properties."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterattn import dbac_compiled
from clusterattn.dbac import dbac, default_num_block, topk_indices

dbac_module = importlib.import_module("clusterattn.dbac")  # the package exports the function as `dbac`
BACKENDS = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "tensor"])


@contextlib.contextmanager
def backend(compiled: bool):
    """Run DBAC on the compiled (C) path or on the tensor path only."""
    previous = dbac_compiled.set_enabled(compiled)
    try:
        yield
    finally:
        dbac_compiled.set_enabled(previous)


def naive_dbac(scores: list[float], budget, num_block, theta, span_before, n_sink=0, variant="A", expand=1):
    """Direct transcription of the DBAC spec, one row at a time with Python loops."""
    n = len(scores)
    sinks = set(range(min(n_sink, n)))
    if variant == "A":
        blk = max(1, budget // num_block)
        peaks = []
        for j in range(math.ceil(n / blk)):
            segment = scores[j * blk : (j + 1) * blk]
            best = max(segment)
            peaks.append((best, j * blk + segment.index(best)))
        seeds = [p for p in peaks if theta is None or p[0] >= theta]
        seeds = sorted(seeds, reverse=True)[:num_block]
        before = min(blk - 1, round(span_before * blk))
        cluster = set()
        for _, centre in seeds:
            start = min(max(centre - before, 0), max(n - blk, 0))
            cluster.update(range(start, start + blk))
    else:
        blk = math.ceil(n / num_block)
        n_blocks = math.ceil(n / blk)
        centre = [theta is None or max(scores[j * blk : (j + 1) * blk]) >= theta for j in range(n_blocks)]
        chosen = {j for j in range(n_blocks) if any(centre[max(0, j - expand) : j + expand + 1])}
        cluster = {i for i in range(n) if i // blk in chosen}
    ranked = sorted(range(n), key=lambda i: (i in sinks, i in cluster, scores[i]), reverse=True)
    return sorted(ranked[:budget])


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(4, 300),
    budget_share=st.floats(0.01, 1.0),
    num_block=st.integers(1, 40),
    theta_q=st.sampled_from([None, 0.2, 0.5, 0.9]),
    span_before=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    variant=st.sampled_from(["A", "B"]),
    n_sink=st.integers(0, 3),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    compiled=st.booleans(),
)
def test_dbac_matches_naive_reference(
    n, budget_share, num_block, theta_q, span_before, variant, n_sink, rows, seed, compiled
):
    budget = max(n_sink, 1, min(n, round(n * budget_share)))
    scores = torch.rand(rows, 2, n, generator=torch.Generator().manual_seed(seed))
    theta = None if theta_q is None else float(scores.quantile(theta_q))
    with backend(compiled):
        fast = dbac(
            scores,
            budget,
            num_block=num_block,
            theta=theta,
            span_before=span_before,
            n_sink=n_sink,
            variant=variant,
        )
    assert fast.shape == (rows, 2, budget)
    for r in range(rows):
        for h in range(2):
            expected = naive_dbac(
                scores[r, h].tolist(), budget, num_block, theta, span_before, n_sink, variant
            )
            assert fast[r, h].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_num_block_equal_budget_is_topk(n, share, seed):
    budget = max(1, min(n, round(n * share)))
    scores = torch.rand(2, 3, n, generator=torch.Generator().manual_seed(seed))
    expected = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(dbac(scores, budget, num_block=budget), expected)
    assert torch.equal(dbac(scores, budget, num_block=budget, theta=0.5), expected)
    assert torch.equal(topk_indices(scores, budget), expected)


def test_planted_clusters_recovered_whole_where_topk_fragments():
    """A 7-token 'number' whose first token holds the peak: DBAC keeps it whole, top-k does not."""
    generator = torch.Generator().manual_seed(0)
    n, budget = 1000, 64
    scores = torch.rand(4, n, generator=generator) * 0.01
    spans = []
    for row in range(4):
        start = 100 + 200 * row
        scores[row, start] = 5.0  # the peak, on the first digit
        scores[row, start + 1 : start + 24] = 0.02  # the rest: barely above noise
        spikes = torch.randperm(n, generator=generator)[:80]  # scattered noise spikes
        scores[row, spikes] = torch.maximum(scores[row, spikes], torch.tensor(0.05))
        scores[row, start : start + 24] = torch.maximum(scores[row, start : start + 24], torch.tensor(0.02))
        scores[row, start] = 5.0
        spans.append(set(range(start, start + 24)))
    kept = dbac(scores, budget, num_block=2, span_before=0.0)
    top = topk_indices(scores, budget)
    for row in range(4):
        assert spans[row] <= set(kept[row].tolist())
        assert not spans[row] <= set(top[row].tolist())


@pytest.mark.parametrize("variant", ["A", "B"])
def test_exact_count_unique_sorted(variant):
    scores = torch.rand(3, 5, 777)
    kept = dbac(scores, 100, variant=variant)
    assert kept.shape == (3, 5, 100)
    assert (kept[..., 1:] > kept[..., :-1]).all()
    assert kept.min() >= 0 and kept.max() < 777


def test_padding_never_selected_while_real_tokens_remain():
    scores = torch.rand(2, 1, 50)
    scores[0, :, :20] = float("-inf")
    kept = dbac(scores, 30)
    assert kept[0].min() >= 20
    kept = dbac(scores, 40)  # 10 pads must be kept: they come first, real tokens all kept
    assert (kept[0, 0, :10] < 20).all() and kept[0, 0, 10:].tolist() == list(range(20, 50))


def test_default_num_block_caps_the_cluster_count():
    assert [default_num_block(b, 16) for b in (10, 96, 224, 271, 272, 480, 992)] == [1, 6, 14, 16, 16, 16, 16]
    assert default_num_block(992, 16, None) == 62 and default_num_block(992, 16, 8) == 8
    scores = torch.rand(2, 3, 1500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dbac(scores, 992), dbac(scores, 992, num_block=16))
    assert torch.equal(dbac(scores, 992, max_clusters=None), dbac(scores, 992, num_block=62))


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": 11}, ValueError, "budget"),
        ({"budget": 2.0}, TypeError, "budget"),
        ({"budget": 4, "num_block": 0}, ValueError, "num_block"),
        ({"budget": 4, "max_clusters": 0}, ValueError, "max_clusters"),
        ({"budget": 4, "max_clusters": 2.0}, TypeError, "max_clusters"),
        ({"budget": 4, "span_before": 1.0}, ValueError, "span_before"),
        ({"budget": 4, "variant": "C"}, ValueError, "variant"),
        ({"budget": 4, "n_sink": 5}, ValueError, "n_sink"),
        ({"budget": 4, "theta": 0.1, "relative_theta": 2.0}, ValueError, "relative_theta"),
        ({"budget": 4, "relative_theta": -1.0}, ValueError, "relative_theta"),
        ({"budget": 4, "relative_theta": float("nan")}, ValueError, "relative_theta"),
    ],
)
def test_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        dbac(torch.rand(1, 10), **kwargs)


def test_float64_scores_rank_like_float32():
    scores = torch.rand(3, 4, 500)
    for kwargs in ({}, {"n_sink": 2}, {"variant": "B", "num_block": 7}):
        assert torch.equal(dbac(scores.double(), 90, **kwargs), dbac(scores, 90, **kwargs))
    assert torch.equal(topk_indices(scores.double(), 50), topk_indices(scores, 50))


def naive_padded(scores: torch.Tensor, budget, num_block, theta, span_before, n_sink=0) -> list[int]:
    """:func:`naive_dbac` on one row with left padding: the real tokens alone (the block grid and
    the span clamping start at the first real one); when the budget exceeds them, every real token
    and then the first padding slots (exact ties go to the earlier token)."""
    row = scores.float().tolist()
    lead = next((i for i, v in enumerate(row) if v != float("-inf")), len(row))
    real = row[lead:]
    if budget >= len(real):
        return list(range(budget - len(real))) + list(range(lead, len(row)))
    return [i + lead for i in naive_dbac(real, budget, num_block, theta, span_before, n_sink)]


def naive_topk(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Plain top-k by score, one row at a time; a stable sort: exact ties go to the earlier token."""
    rows = [
        sorted(sorted(range(len(row)), key=lambda i, row=row: row[i], reverse=True)[:budget])
        for row in scores.float().reshape(-1, scores.shape[-1]).tolist()
    ]
    return torch.tensor(rows, dtype=torch.long).view(*scores.shape[:-1], budget)


def naive_batch(scores, budget, num_block, theta, span_before, n_sink=0) -> torch.Tensor:
    """The naive reference over ``(..., n)`` rows; ``theta`` a float, None, or a per-row tensor."""
    rows = scores.reshape(-1, scores.shape[-1])
    thetas = (
        [theta] * len(rows)
        if not isinstance(theta, torch.Tensor)
        else theta.expand(*scores.shape[:-1], 1).reshape(-1).tolist()
    )
    kept = [
        naive_padded(row, budget, num_block, t, span_before, n_sink)
        for row, t in zip(rows, thetas, strict=True)
    ]
    return torch.tensor(kept, dtype=torch.long).view(*scores.shape[:-1], budget)


def _scores(kind: str, shape: tuple, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        return torch.softmax(torch.randn(shape, generator=generator) * 3, dim=-1) * 32
    if kind == "ties":  # few distinct values: ties everywhere, inside blocks and at the budget boundary
        return torch.randint(0, 4, shape, generator=generator).float() / 4
    if kind == "bf16":  # coarse values from a low-precision model, many ties
        return torch.rand(shape, generator=generator).bfloat16()
    scores = torch.rand(shape, generator=generator)
    if kind == "padded":  # left padding, as ClusterAttnPress scores a padded batch
        scores[0, ..., : shape[-1] // 3] = float("-inf")
    elif kind == "signed":  # negative values and -0.0 leave the fast path
        scores = scores - 0.5
        scores[..., 0] = -0.0
    return scores


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 700),
    budget_share=st.floats(0.0, 1.0),
    span_width=st.sampled_from([1, 2, 7, 16, 24]),
    theta_mode=st.sampled_from([None, "quantile", "press", "relative", "all"]),
    span_before=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    n_sink=st.sampled_from([0, 0, 2]),
    kind=st.sampled_from(["softmax", "ties", "bf16", "rand", "padded", "signed"]),
    seed=st.integers(0, 2**16),
    compiled=st.booleans(),
)
def test_dbac_matches_the_naive_reference_on_ties_padding_and_low_precision(
    n, budget_share, span_width, theta_mode, span_before, n_sink, kind, seed, compiled
):
    """The fast paths (compiled, int32 plain, tensor) against the spec's loop transcription, ties,
    padding, bf16 and signed scores included (equal block peaks: the later block; equal scores: the
    earlier token)."""
    scores = _scores(kind, (2, 3, n), seed)
    budget = max(n_sink, 1, min(n, round(n * budget_share)))
    num_block = max(1, budget // span_width)
    theta = None
    if theta_mode == "quantile":  # a float32 value: the fast paths compare in float32
        theta = float(scores.float().clamp_min(0).quantile(0.7))
    elif theta_mode in ("press", "relative"):  # uniform mass over each row's real tokens
        theta = 32 / torch.isfinite(scores[:, :1].float()).sum(dim=-1, keepdim=True).clamp_min(1)
    elif theta_mode == "all":  # every block is noise: no cluster at all
        theta = float("inf")
    kwargs = {"num_block": num_block, "theta": theta, "span_before": span_before, "n_sink": n_sink}
    expected = naive_batch(scores, budget, **kwargs)
    if theta_mode == "relative":  # the same threshold, found by dbac itself (a float when unpadded)
        kwargs = {**kwargs, "theta": None, "relative_theta": 32.0}
    with backend(compiled):
        assert torch.equal(dbac(scores, budget, **kwargs), expected)
    assert torch.equal(topk_indices(scores, budget), naive_topk(scores, budget))


@BACKENDS
@pytest.mark.parametrize(("length", "budget"), [(4096, 128), (8192, 512), (16384, 1024)])
def test_dbac_matches_the_naive_reference_at_benchmark_shapes(length, budget, compiled):
    """SmolLM2 shapes (batch 1, 3 KV heads, window 32) with the press's relative threshold."""
    scores = _scores("softmax", (1, 3, length - 32), length)
    theta = 32 / torch.isfinite(scores[:, :1]).sum(dim=-1, keepdim=True)
    for num_block in (max(1, (budget - 32) // 16), 1, budget - 32):
        kwargs = {"num_block": num_block, "theta": theta}
        expected = naive_batch(scores, budget - 32, num_block, theta, 0.0)
        with backend(compiled):
            assert torch.equal(dbac(scores, budget - 32, **kwargs), expected)
            assert torch.equal(dbac(scores, budget - 32, num_block=num_block, relative_theta=32.0), expected)
    assert dbac_module._plain(scores) is not None  # the int32 fast path is the one exercised
    assert dbac_module._plain(_scores("padded", (2, 3, 50), 0)) is None


def test_compiled_path_runs_where_it_applies(monkeypatch):
    """Plain CPU float32/bf16 scores take the compiled key; everything else returns None (tensor path)."""
    assert dbac_compiled.available(), "the C kernel was not built: reinstall with a C compiler"
    plain = _scores("softmax", (2, 3, 200), 0)
    args = (10, 3, dbac_module._theta_int(0.5), 0)  # spans of 10: a budget of 30 in 3 clusters
    with backend(True):
        assert dbac_compiled.enabled()
        assert dbac_compiled.plain_key(plain, *args) is not None
        assert dbac_compiled.plain_key(plain.bfloat16(), *args) is not None
        for kind in ("padded", "signed"):
            assert dbac_compiled.plain_key(_scores(kind, (2, 3, 200), 0), *args) is None
        assert dbac_compiled.plain_key(plain.double(), *args) is None
        assert dbac_compiled.plain_key(plain.clone().requires_grad_(), *args) is None
        nan = plain.clone()
        nan[1, 2, 7] = float("nan")
        assert dbac_compiled.plain_key(nan, *args) is None
        assert dbac_compiled.plain_key(plain[:0], *args) is None
        calls = []
        monkeypatch.setattr(dbac_module, "_dbac_plain", lambda *a: calls.append(a))
        dbac(plain, 30, relative_theta=32.0)  # compiled: the tensor plain path is not reached
        assert not calls
    with backend(False):
        assert not dbac_compiled.enabled()
        assert dbac_compiled.plain_key(plain, *args) is None
    with pytest.raises(TypeError, match="bool"):
        dbac_compiled.set_enabled(1)


@BACKENDS
def test_non_contiguous_and_batched_rows_match(compiled):
    """A transposed (non-contiguous) view and extra leading dimensions select what each row alone does."""
    scores = _scores("softmax", (3, 2, 4, 300), 5).transpose(1, 2)
    with backend(compiled):
        whole = dbac(scores, 40, relative_theta=32.0)
        for index in ((0, 0), (2, 3), (1, 1)):
            alone = dbac(scores[index].contiguous(), 40, relative_theta=32.0)
            assert torch.equal(whole[index], alone)


@BACKENDS
def test_equal_block_peaks_go_to_the_later_block(compiled):
    """Three blocks share the top peak and two clusters fit: the later two win, on every path (plain,
    padded, with a threshold) and whatever ``topk`` would do with the tie on a device."""
    scores = torch.full((64,), 0.1)
    scores[torch.arange(64) % 8 == 2] = 0.2
    for block in (1, 3, 5):
        scores[block * 8 + 2] = 0.9
    expected = list(range(26, 34)) + list(range(42, 50))  # spans of 8 from the arg-max at 26 and 42
    padded = torch.cat([torch.full((5,), float("-inf")), scores])
    with backend(compiled):
        assert dbac(scores, 16, num_block=2).tolist() == expected
        assert dbac(scores, 16, num_block=2, theta=0.5).tolist() == expected
        assert dbac(scores.bfloat16(), 16, num_block=2).tolist() == expected
        assert dbac(padded, 16, num_block=2).tolist() == [i + 5 for i in expected]
    assert naive_dbac(scores.tolist(), 16, 2, None, 0.0) == expected


def test_compiled_path_is_on_unless_turned_off():
    """On by default where the kernel was built (it costs no dependency and no memory to speak of);
    ``CLUSTERATTN_COMPILED=0`` turns it off."""
    code = "from clusterattn import dbac_compiled as c; print(c.enabled())"
    for env, expected in (
        ({}, "True"),
        ({"CLUSTERATTN_COMPILED": "0"}, "False"),
        ({"CLUSTERATTN_COMPILED": "1"}, "True"),
    ):
        environ = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_COMPILED"} | env
        out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr


def test_kernel_checks_its_arguments():
    """The C kernel refuses sizes that do not match its buffers, and impossible geometry."""
    kernel = importlib.import_module("clusterattn._dbac_c")
    bits = np.zeros((2, 10), dtype=np.int32)
    key = np.empty_like(bits)
    assert kernel.cluster_key(bits, key, 2, 10, 5, -(2**31), 2, 0) is True
    with pytest.raises(ValueError, match="20 int32"):
        kernel.cluster_key(bits, key[:1], 2, 10, 5, -(2**31), 2, 0)
    with pytest.raises(ValueError, match="20 int32"):
        kernel.cluster_key(bits.astype(np.int64), key, 2, 10, 5, -(2**31), 2, 0)
    for blk, num_block, before in ((11, 1, 0), (0, 1, 0), (5, 0, 0), (5, 2, 5), (5, 2, -1)):
        with pytest.raises(ValueError, match="need"):
            kernel.cluster_key(bits, key, 2, 10, blk, -(2**31), num_block, before)
    with pytest.raises(TypeError):
        kernel.cluster_key(bits, bits.copy().tobytes(), 2, 10, 5, -(2**31), 2, 0)  # read-only key
    assert kernel.cluster_key(-np.ones((1, 10), dtype=np.int32), key[:1], 1, 10, 5, 0, 1, 0) is False


def test_compiled_path_falls_back_to_the_tensor_path(monkeypatch):
    """Kernel not built: the tensor path, with one warning if ``CLUSTERATTN_COMPILED=1`` (or
    ``set_enabled(True)``) asked for it; a broken build: the tensor path with one warning. The
    selections are the same either way."""
    scores = _scores("softmax", (2, 3, 300), 1)
    expected = dbac(scores, 40, relative_theta=32.0)
    state = dbac_compiled._STATE
    monkeypatch.setitem(state, "enabled", True)
    monkeypatch.setitem(state, "requested", True)

    monkeypatch.setitem(state, "kernel", None)
    monkeypatch.setitem(sys.modules, "clusterattn._dbac_c", None)  # import fails: not built
    with pytest.warns(RuntimeWarning, match="compiled DBAC unavailable"):  # it was asked for
        assert not dbac_compiled.available() and not dbac_compiled.enabled()
    assert torch.equal(dbac(scores, 40, relative_theta=32.0), expected)
    monkeypatch.setitem(state, "kernel", None)
    monkeypatch.setitem(state, "requested", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on by default only: no warning
        assert not dbac_compiled.available()
    assert torch.equal(dbac(scores, 40, relative_theta=32.0), expected)

    def broken_import(name):
        raise OSError("undefined symbol: PyInit__dbac_c")

    monkeypatch.setitem(state, "kernel", None)
    monkeypatch.setattr(dbac_compiled.importlib, "import_module", broken_import)
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        assert not dbac_compiled.available()
    assert state["kernel"] is False  # given up for the rest of the process
    assert torch.equal(dbac(scores, 40, relative_theta=32.0), expected)


def test_warm_up_loads_the_kernel_before_the_first_compression(monkeypatch):
    """A session warms its press up when it starts; ClusterAttn's warm-up loads the kernel once."""
    from clusterattn.presses import PRESSES

    with backend(True):
        assert dbac_compiled.warm_up() is True
    with backend(False):
        assert dbac_compiled.warm_up() is False  # turned off: nothing to load
    calls = []
    monkeypatch.setattr(dbac_compiled, "warm_up", lambda: calls.append(1) or True)
    PRESSES["clusterattn"](budget=64).warm_up()
    PRESSES["snapkv"](budget=64).warm_up()  # the default warm-up does nothing
    assert calls == [1]
