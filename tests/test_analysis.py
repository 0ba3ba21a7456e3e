"""Analysis quantities against loop-based naive references; decode traces on tiny and real models."""

from __future__ import annotations

import json

import pytest
import torch

import clusterattn as ca
from clusterattn.analysis.analyze import AnalysisSpec, analyze_traces, method_masks, oracle_prefix
from clusterattn.analysis.clustering import METHODS, dbscan_clusters, kmeans_clusters, select_prefix
from clusterattn.analysis.metrics import (
    decode_attention,
    fitting_rate,
    hit_rate,
    kept_mask,
    restricted_cosine,
)
from clusterattn.analysis.report import layer_statement, run_of, write_report
from clusterattn.analysis.trace import trace_decode
from clusterattn.integration import capturing_queries
from conftest import tiny_model
from test_integration import TOK, ids_text


def random_attention(layers=2, q_heads=4, steps=3, seq=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(layers, q_heads, steps, seq, generator=g), dim=-1) * 0.9


def random_mask(layers=2, kv_heads=2, seq=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(layers, kv_heads, seq, generator=g) < 0.3


# -- naive references: one (layer, head, step) at a time ---------------------------------------
def naive(attn, mask, fn):
    layers, q_heads, steps, _ = attn.shape
    group = q_heads // mask.shape[1]
    out = torch.empty(layers, q_heads, steps)
    for layer in range(layers):
        for head in range(q_heads):
            for step in range(steps):
                out[layer, head, step] = fn(
                    attn[layer, head, step].tolist(), mask[layer, head // group].tolist()
                )
    return out


def naive_cosine(a, m):
    kept = [x if keep else 0.0 for x, keep in zip(a, m, strict=True)]
    total = sum(kept)
    renorm = [x / total for x in kept]
    dot = sum(x * y for x, y in zip(a, renorm, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in renorm) ** 0.5)


def naive_fit(a, m):
    return sum(x for x, keep in zip(a, m, strict=True) if keep) / sum(a)


def naive_hit(top):
    def fn(a, m):
        order = sorted(range(len(a)), key=lambda i: -a[i])[:top]
        return sum(m[i] for i in order) / top

    return fn


def test_restricted_cosine_matches_naive():
    attn, mask = random_attention(), random_mask()
    torch.testing.assert_close(
        restricted_cosine(attn, mask), naive(attn, mask, naive_cosine), atol=1e-5, rtol=0
    )


def test_fitting_rate_matches_naive():
    attn, mask = random_attention(seed=2), random_mask(seed=3)
    torch.testing.assert_close(fitting_rate(attn, mask), naive(attn, mask, naive_fit), atol=1e-5, rtol=0)


@pytest.mark.parametrize("top", [1, 5, 40, 100])
def test_hit_rate_matches_naive(top):
    attn, mask = random_attention(seed=4), random_mask(seed=5)
    expected = naive(attn, mask, naive_hit(min(top, 40)))
    torch.testing.assert_close(hit_rate(attn, mask, top), expected, atol=1e-6, rtol=0)


def test_metric_bounds_and_errors():
    attn = random_attention()
    everything = torch.ones(2, 2, 40, dtype=torch.bool)
    assert torch.allclose(restricted_cosine(attn, everything), torch.ones(2, 4, 3))
    assert torch.allclose(fitting_rate(attn, everything), torch.ones(2, 4, 3))
    assert torch.equal(hit_rate(attn, ~everything, 3), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="multiple"):
        fitting_rate(attn, torch.ones(2, 3, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="disagree"):
        fitting_rate(attn, torch.ones(2, 2, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="top"):
        hit_rate(attn, everything, 0)
    with pytest.raises(ValueError, match="indices"):
        kept_mask(torch.tensor([[0, 5]]), 5)


def test_kept_mask_and_decode_attention_match_naive():
    idx = torch.tensor([[[0, 3, 4]], [[1, 2, 6]]])
    mask = kept_mask(idx, 7)
    for r in range(2):
        assert [i for i in range(7) if mask[r, 0, i]] == idx[r, 0].tolist()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    got = decode_attention(q, k, 0.35, prompt_len=9)
    for head in range(4):
        for step in range(3):
            logits = [float(q[0, head, step] @ k[0, head // 2, j]) * 0.35 for j in range(9 + step + 1)]
            probs = torch.softmax(torch.tensor(logits), dim=0)[:9]
            torch.testing.assert_close(got[0, head, step], probs, atol=1e-6, rtol=0)


# -- clustering methods -----------------------------------------------------------------------
def bumpy_scores(n=200):
    scores = torch.full((2, 2, n), 0.01)
    scores[..., 0] = 5.0  # a sink
    scores[..., 40:52] = torch.linspace(1.0, 0.3, 12)  # a cluster
    scores[..., 150:158] = 0.8  # another
    scores[1, 1, 100:106] = 2.0
    return scores


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_budget_unique_sorted(method):
    scores = bumpy_scores()
    kept = select_prefix(method, scores, 30, window_size=8, num_block=3)
    assert kept.shape == (2, 2, 30)
    assert torch.all(kept[..., 1:] > kept[..., :-1]) and kept.min() >= 0 and kept.max() < 200
    with pytest.raises(ValueError):
        select_prefix(method, scores, 201, window_size=8)
    with pytest.raises(ValueError, match="method"):
        select_prefix("spectral", scores, 30, window_size=8)


def test_dbac_is_the_press_selection_and_topk_is_plain_topk():
    scores = bumpy_scores()
    press = ca.ClusterAttnPress(budget=38, window_size=8, num_block=3)
    assert torch.equal(
        select_prefix("dbac", scores, 30, window_size=8, num_block=3), press.select_prefix(scores, 30)
    )
    assert torch.equal(select_prefix("topk", scores, 30, window_size=8), ca.topk_indices(scores, 30))


def test_kmeans_and_dbscan_find_the_bumps():
    scores = bumpy_scores()
    theta = torch.full((2, 2, 1), 0.1)
    spans = kmeans_clusters(scores, 30, 3, theta)
    assert spans[0, 0, 45] and spans[0, 0, 153] and not spans[0, 0, 120]
    clusters = dbscan_clusters(scores, 30, theta)
    assert clusters[0, 0, 40:52].all() and clusters[0, 0, 150:158].all() and clusters[0, 0, 0]  # the sink
    assert clusters[0, 0].sum() == 21
    small = dbscan_clusters(scores, 10, theta)  # densest first, whole clusters only: 40:52 does not fit
    assert small[0, 0, 150:158].all() and small[0, 0, 0] and small[0, 0].sum() == 9


# -- traces on tiny models --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_trace():
    model = tiny_model("llama")
    return model, trace_decode(model, TOK, ids_text(120), ids_text(6, seed=1), steps=6, stop_at_eos=False)


def test_trace_matches_generate_and_eager_attention(tiny_trace):
    model, trace = tiny_trace
    out = ca.generate(model, TOK, ids_text(120), ids_text(6, seed=1), max_new_tokens=7)
    assert trace.text == out.text and trace.steps == 6 and trace.seq == 126
    eager = tiny_model("llama", attn_implementation="eager")
    ids = torch.cat([trace.prompt_ids, trace.new_tokens[:-1]])[None]
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions
    for rank, layer in enumerate(trace.layers):
        expected = attentions[layer][0, :, trace.seq :, : trace.seq]
        torch.testing.assert_close(trace.attention[rank], expected, atol=2e-5, rtol=1e-4)


def test_trace_select_equals_per_layer_select(tiny_trace):
    _, trace = tiny_trace
    press = ca.ClusterAttnPress(budget=40, window_size=8, num_block=4)
    together = trace.select(press)
    for rank in range(len(trace.layers)):
        alone = press.select(
            trace.queries[rank : rank + 1],
            trace.keys[rank : rank + 1],
            trace.scaling,
            layer=rank,
            n_layers=len(trace.layers),
        )
        assert torch.equal(together[rank : rank + 1], alone)
    assert trace.select(ca.ClusterAttnPress(budget=500)).shape == (2, 2, 126)


def test_capture_refuses_nesting_and_bad_steps():
    model = tiny_model("llama")
    with capturing_queries(model), pytest.raises(RuntimeError, match="captured"), capturing_queries(model):
        pass
    with pytest.raises(ValueError, match="steps"):
        trace_decode(model, TOK, ids_text(50), steps=0)


def test_oracle_and_analysis_summary(tiny_trace, tmp_path):
    _, trace = tiny_trace
    oracle = oracle_prefix(trace, 10, 118)
    mass = trace.attention[..., :118].reshape(2, 2, 2, 6, 118).sum(dim=(2, 3))
    for layer in range(2):
        for head in range(2):
            best = sorted(range(118), key=lambda i: -float(mass[layer, head, i]))[:10]
            assert sorted(best) == oracle[layer, head].tolist()
    masks = method_masks(trace, 40, ("dbac", "oracle"), window_size=8)
    assert all(int(m.sum(-1).min()) == 40 for m in masks.values())
    spec = AnalysisSpec(budgets=[40], curve_budgets=[16, 40], window_size=8, top=4, tuned={"t": {"40": 2}})
    summary = analyze_traces([("t", trace), ("u", trace)], spec)
    cell = summary["methods"]["40"]
    assert set(cell) == {*METHODS, "dbac_tuned", "oracle"}
    assert all(0 <= cell[m][q] <= 1 + 1e-6 for m in cell for q in ("fit_prefix", "hit_prefix", "cosine"))
    assert len(cell["dbac"]["hit_by_step"]) == 6 and set(summary["by_task"]) == {"t", "u"}
    assert summary["curve"]["16"]["token_share"] == pytest.approx(8 / 118)
    with pytest.raises(ValueError, match="methods"):
        AnalysisSpec(methods=["nope"])
    (tmp_path / "analysis.json").write_text(json.dumps(summary))
    doc = write_report(tmp_path / "analysis.md", tmp_path, [], "`test`")
    text = doc.read_text()
    assert "Fitting rate" in text and "DBAC (profiled num_block)" in text and "B=40: dbac" in text
    assert (tmp_path / "fitting_by_layer.png").is_file() and "(e) Other" not in text
    assert "No profile was given for this run" in text and "A seeded share" not in text
    other = tmp_path / "gemma"
    other.mkdir()
    (other / "analysis.json").write_text(json.dumps({**summary, "model": "gemma3-270m", "length": 8192}))
    text = write_report(tmp_path / "analysis.md", tmp_path, [], "`test`", [other]).read_text()
    assert "(e) Other lengths and models" in text and "| Gemma-3-270M | 8192 | 2 | top-k |" in text
    assert "Gemma-3-270M, 8192 tokens, B=40: dbac" in text
    with pytest.raises(ValueError, match="no analysis.json"):
        write_report(tmp_path / "analysis.md", tmp_path, [], "`test`", [tmp_path / "none"])


def test_run_of_and_layer_statement():
    assert run_of({"command": "`clusterattn analyze --length 4096 --out x`"}) == ("smollm2-135m", 4096)
    assert run_of({"command": "`x --model gemma3-270m`", "length": 8192}) == ("gemma3-270m", 8192)
    assert run_of({}) == ("smollm2-135m", 2048)
    cell = lambda layers: {"fit_by_layer": layers}  # noqa: E731
    summary = {"methods": {"128": {"topk": cell([0.5, 0.8, 0.6]), "dbac": cell([0.3, 0.8, 0.7])}}}
    line = layer_statement(summary)
    assert line == (
        "- B=128: DBAC (default num_block) is at or above top-k in 2 of 3 compressible layers (1, 2), by "
        "up to 10.0 points; worst 20.0 points below (layer 0). Taking per layer the better of the two, "
        "chosen on these same traces (an upper bound for any per-layer setting), covers 66.7 % against "
        "top-k's 63.3 %"
    )
    summary["methods"]["256"] = {"topk": cell([0.5, 0.8, 0.6]), "dbac": cell([0.4, 0.5, 0.55])}
    assert layer_statement(summary).endswith(
        "- B=256: DBAC (default num_block) is below top-k in all 3 compressible layers, by 5.0 (layer 2) "
        "to 30.0 points (layer 1)"
    )
    summary["methods"]["128"]["dbac_tuned"] = cell([0.5, 0.8, 0.6])
    assert "- B=128: DBAC (profiled num_block) equals top-k in every layer\n" in layer_statement(summary)


# -- the one real-model test ------------------------------------------------------------------
def test_smollm2_trace_clusters_hold_attention(smollm2):
    from clusterattn.eval.niah import make_needle_sample

    model, tokenizer = smollm2
    s = make_needle_sample(tokenizer, 1024, depth=0.5, seed=2)
    trace = trace_decode(
        model, tokenizer, s.context, s.question, answer_prefix=" " + s.answer_prefix, steps=4
    )
    assert trace.text.strip().startswith(s.answer[:3]) and trace.steps >= 1
    assert float(trace.attention.sum(-1).max()) <= 1 + 1e-4
    spec = AnalysisSpec(budgets=[128], methods=["dbac", "topk"], curve_budgets=[128])
    cell = analyze_traces([("niah", trace)], spec)["methods"]["128"]
    share = 96 / (trace.seq - 32)
    assert cell["dbac"]["fit_prefix"] > 3 * share and cell["topk"]["fit_prefix"] > 3 * share
