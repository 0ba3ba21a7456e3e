"""Profiling: the seeded split, the candidate scoring against a naive per-layer loop, the profile
JSON and ``ClusterAttnPress.from_profile`` on it, the CLI's early errors."""

from __future__ import annotations

import json

import pytest
import torch

import clusterattn as ca
from clusterattn.analysis import data
from clusterattn.analysis.profile import (
    ProfileGrid,
    ProfileSpec,
    choose,
    default_config,
    evaluate_heldout,
    num_block_grid,
    profile_task,
    score_candidates,
    trace_samples,
)
from clusterattn.analysis.trace import EmptyAnswer, trace_decode
from clusterattn.cli import main
from conftest import tiny_model
from test_analysis import naive_cosine
from test_integration import TOK, ids_text


def test_split_is_seeded_disjoint_and_complete():
    profile, held = data.split(15, 0.2, seed=3)
    assert len(profile) == 3 and len(held) == 12
    assert sorted(profile + held) == list(range(15))
    assert data.split(15, 0.2, seed=3) == (profile, held)
    assert data.split(15, 0.2, seed=4) != (profile, held)
    assert data.split(2, 0.2) in (([0], [1]), ([1], [0]))
    for bad in [(1, 0.2), (10, 0.0), (10, 1.0)]:
        with pytest.raises(ValueError):
            data.split(*bad)


def test_grid_and_spec_validation(tmp_path):
    assert num_block_grid(128, 32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]
    assert 14 in num_block_grid(256, 32) and 224 in num_block_grid(256, 32)
    assert default_config(128) == {"budget": 128, "num_block": 6, "alpha": 1.0, "window_size": 32}
    grid = ProfileGrid(budgets=[64], num_blocks=[1, 2, 40], window_sizes=[16, 32])
    assert [(c["window_size"], c["num_block"]) for c in grid.candidates(64)] == [
        (16, 1),
        (16, 2),
        (16, 40),
        (32, 1),
        (32, 2),
    ]
    with pytest.raises(ValueError, match="exceed"):
        ProfileGrid(budgets=[32])
    with pytest.raises(ValueError, match="alphas"):
        ProfileGrid(alphas=[-1.0])
    with pytest.raises(ValueError, match="unknown task"):
        ProfileSpec(task="niah_single_9")
    with pytest.raises(ValueError, match="does not exist"):
        ProfileSpec(task=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="n_samples"):
        ProfileSpec(task="niah", n_samples=1)


def test_choose_prefers_best_then_default_then_fewer_clusters():
    configs = [{**default_config(128), "num_block": n} for n in (2, 6, 8)]
    assert choose(configs, torch.tensor([[0.5, 0.9, 0.95]]), 128)["num_block"] == 8
    assert choose(configs, torch.tensor([[0.9, 0.9, 0.9]]), 128)["num_block"] == 6  # the default
    assert choose([configs[0], configs[2]], torch.tensor([[0.9, 0.9]]), 128)["num_block"] == 2


def test_dominant_rule_leaves_the_default_only_for_a_candidate_better_on_every_sample():
    configs = [{**default_config(128), "num_block": n} for n in (2, 6, 8)]  # 6 is the default
    carried = torch.tensor([[0.2, 0.5, 0.9], [0.6, 0.5, 0.45]])  # 8: best mean, worse on sample 2
    assert choose(configs, carried, 128)["num_block"] == 8
    assert choose(configs, carried, 128, rule="dominant")["num_block"] == 6
    both = torch.tensor([[0.6, 0.5, 0.9], [0.7, 0.5, 0.55]])  # 2 and 8 beat 6 on both; 8 has the best mean
    assert choose(configs, both, 128, rule="dominant")["num_block"] == 8
    assert choose(configs, torch.tensor([[0.6, 0.5, 0.5]]), 128, rule="dominant")["num_block"] == 2
    with pytest.raises(ValueError, match="default"):
        choose([configs[0], configs[2]], both[:, [0, 2]], 128, rule="dominant")
    with pytest.raises(ValueError, match="rule"):
        ProfileGrid(rule="median")


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, trace_decode(model, TOK, ids_text(150), ids_text(5, seed=2), steps=5, stop_at_eos=False)


def test_candidate_scores_match_naive_select_loop(llama):
    _, trace = llama
    configs = [
        {"budget": 48, "num_block": n, "alpha": a, "window_size": w}
        for n, a, w in [(1, 1.0, 8), (4, 0.5, 8), (8, 2.0, 16), (40, 1.0, 8)]
    ]
    got = score_candidates(trace, configs)
    for i, config in enumerate(configs):
        press = ca.ClusterAttnPress(**config)
        values = []
        for rank in range(len(trace.layers)):  # the press's own select, one layer at a time
            idx = press.select(
                trace.queries[rank : rank + 1],
                trace.keys[rank : rank + 1],
                trace.scaling,
                layer=rank,
                n_layers=len(trace.layers),
            )[0]
            q_heads, kv_heads = trace.attention.shape[1], idx.shape[0]
            for head in range(q_heads):
                kept = set(idx[head // (q_heads // kv_heads)].tolist())
                mask = [j in kept for j in range(trace.seq)]
                for step in range(trace.steps):
                    values.append(naive_cosine(trace.attention[rank, head, step].tolist(), mask))
        assert got[i].item() == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert (
        score_candidates(trace, [{"budget": 400, "num_block": 2, "alpha": 1.0, "window_size": 8}]).item()
        == 1.0
    )


def write_jsonl(path, n=6):
    rows = [
        {
            "context": ids_text(140, seed=i),
            "question": ids_text(4, seed=100 + i),
            "answers": ["7"],
            "max_new_tokens": 4,
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_profile_end_to_end_and_from_profile(llama, tmp_path):
    model, _ = llama
    task = str(write_jsonl(tmp_path / "mine.jsonl"))
    spec = ProfileSpec(task=task, length=2048, n_samples=6, fraction=0.34, seed=1, steps=3, stop_at_eos=False)
    grid = ProfileGrid(budgets=[48, 64], window_sizes=[8, 16], alphas=[1.0, 2.0])
    out = tmp_path / "profile.json"
    result = profile_task(model, TOK, spec, grid, out=out)
    saved = json.loads(out.read_text())
    assert saved["config"] == saved["budgets"]["48"]["config"] and set(saved["budgets"]) == {"48", "64"}
    split = saved["split"]
    assert len(split["profile_indices"]) == 2 and sorted(
        split["profile_indices"] + split["heldout_indices"]
    ) == list(range(6))
    assert (split["profile_indices"], split["heldout_indices"]) == data.split(6, 0.34, 1)
    for budget in ("48", "64"):
        entry = saved["budgets"][budget]
        rows = [r for r in saved["grid"] if str(r["budget"]) == budget]
        assert entry["cosine"] == pytest.approx(max(r["cosine"] for r in rows))
        assert all(len(r["per_sample"]) == 2 for r in rows)
        press = ca.ClusterAttnPress.from_profile(out, budget=int(budget))
        assert {k: getattr(press, k) for k in entry["config"]} == entry["config"]
    assert ca.ClusterAttnPress.from_profile(out).budget == 48  # the plain call keeps working
    assert result["budgets"] == saved["budgets"]
    held = evaluate_heldout(model, TOK, out, max_samples=2, max_new_tokens=2)
    assert held["n"] == 2 and set(held["accuracy"]) == {
        "full",
        "default@48",
        "tuned@48",
        "default@64",
        "tuned@64",
    }
    assert [r["index"] for r in held["rows"]] == split["heldout_indices"][:2]
    assert json.loads(out.read_text())["heldout"]["n"] == 2
    one = evaluate_heldout(model, TOK, out, max_samples=1, max_new_tokens=1, budgets=[48])
    assert set(one["accuracy"]) == {"full", "default@48", "tuned@48"} and one["n"] == 1


def test_from_profile_unprofiled_budget_and_ratio(tmp_path):
    path = tmp_path / "p.json"
    config = {"budget": 128, "num_block": 4, "alpha": 1.0, "window_size": 32}
    path.write_text(
        json.dumps(
            {
                "config": config,
                "budgets": {
                    "128": {"config": config},
                    "256": {"config": {**config, "budget": 256, "num_block": 16}},
                },
            }
        )
    )
    assert ca.ClusterAttnPress.from_profile(path, budget=256).num_block == 16
    wide = ca.ClusterAttnPress.from_profile(path, budget=160)  # nearest entry 128: spans of 96 // 4
    assert wide.budget == 160 and wide.num_block is None and wide.span_width == 24
    assert wide.max_clusters is None  # the profiled width is kept at any budget
    ratio = ca.ClusterAttnPress.from_profile(path, compression_ratio=0.5)
    assert ratio.budget is None and ratio.compression_ratio == 0.5
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": {"num_block": 3}}))
    assert ca.ClusterAttnPress.from_profile(old, budget=64).num_block == 3


def test_cli_errors_before_loading_a_model(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(ca, "load_model", fail)
    with pytest.raises(ValueError, match="unknown task"):
        main(["profile", "--task", "nope", "--out", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="exceed"):
        main(["profile", "--task", "niah", "--budgets", "16", "--out", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="existing profile"):
        main(["profile", "--task", "niah", "--evaluate-only", "--out", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="unknown task"):
        main(["analyze", "--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        main(["analyze", "--profiles", str(tmp_path / "none.json"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="no analysis.json"):
        main(["analyze", "--also", str(tmp_path / "elsewhere"), "--out", str(tmp_path)])


def test_samples_with_an_empty_answer_are_skipped(tmp_path):
    model = tiny_model("llama")
    context, question = ids_text(140, seed=0), ids_text(4, seed=100)  # row 0 of write_jsonl
    first = int(ca.generate(model, TOK, context, question, max_new_tokens=1).tokens[0, 0])
    model.generation_config.eos_token_id = first  # the answer ends at its first token
    with pytest.raises(EmptyAnswer):
        trace_decode(model, TOK, context, question, steps=3)
    samples = data.load_jsonl(write_jsonl(tmp_path / "rows.jsonl", n=2))
    assert 0 not in trace_samples(model, TOK, samples, steps=3)


def test_analysis_takes_each_tasks_profile_at_the_analysed_length():
    from clusterattn.analysis.commands import profiles_for_length

    at = lambda task, length: {"task": task, "length": length}  # noqa: E731
    profiles = [at("vt", 2048), at("vt", 4096), at("qa_1", 4096)]
    assert profiles_for_length(profiles, 4096) == {"vt": at("vt", 4096), "qa_1": at("qa_1", 4096)}
    assert profiles_for_length(profiles, 2048) == {"vt": at("vt", 2048)}
    assert profiles_for_length(profiles, 8192) == {}
    with pytest.raises(ValueError, match="two profiles of task 'vt' at length 2048"):
        profiles_for_length([at("vt", 2048), at("vt", 2048)], 2048)
    # a profile drawn with another seed counts (its held-out samples come with it); other
    # objectives and the dominant rule do not
    seeded = {**at("vt", 8192), "seed": 1}
    others = [{**at("qa_1", 8192), "objective": "answer"}, {**at("cwe", 8192), "rule": "dominant"}]
    assert profiles_for_length([seeded, *others], 8192) == {"vt": seeded}


def test_analyze_refuses_profiles_of_no_use_at_its_length(tmp_path):
    from clusterattn.cli import main

    (tmp_path / "vt-2048.json").write_text(json.dumps({"task": "vt", "length": 2048}))
    with pytest.raises(ValueError, match="none of the 1 profiles given was made at --length 4096"):
        main(
            [
                "analyze",
                "--tasks",
                "vt",
                "--length",
                "4096",
                "--profiles",
                str(tmp_path),
                "--out",
                str(tmp_path),
            ]
        )


def test_answer_objective_ranks_by_the_full_answers_logprob(tmp_path):
    from clusterattn.analysis.fidelity import answer_logprobs
    from clusterattn.analysis.report import profile_section

    model = tiny_model("llama")
    task = str(write_jsonl(tmp_path / "mine.jsonl", n=4))
    spec = ProfileSpec(task=task, length=2048, n_samples=4, fraction=0.5, seed=1, steps=3, stop_at_eos=False)
    grid = ProfileGrid(budgets=[48, 64], num_blocks=[1, 4, 40], window_sizes=[8], objective="answer")
    saved = profile_task(model, TOK, spec, grid, out=tmp_path / "p.json")
    assert saved["objective"] == "answer"
    samples = data.load_samples(task, 2048, 4, TOK)
    for budget in ("48", "64"):
        entry, rows = saved["budgets"][budget], [r for r in saved["grid"] if str(r["budget"]) == budget]
        assert entry["objective"] == "answer" and all(len(r["answer_per_sample"]) == 2 for r in rows)
        assert entry["answer_logprob"] == pytest.approx(max(r["answer_logprob"] for r in rows))
        assert entry["config"] in [{k: r[k] for k in entry["config"]} for r in rows]
        # each row's value is the mean over the traced samples of answer_logprobs on that sample
        configs = [{k: r[k] for k in entry["config"]} for r in rows]
        expected = torch.stack(
            [
                answer_logprobs(
                    model, TOK, samples[t["index"]], trace_decode_answer(model, samples[t["index"]]), configs
                )
                for t in saved["traces"]
            ]
        ).mean(0)
        assert [r["answer_logprob"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    assert "log p" in profile_section([saved])
    with pytest.raises(ValueError, match="objective"):
        ProfileGrid(objective="loss")


def trace_decode_answer(model, sample):
    return trace_decode(
        model,
        TOK,
        sample.context,
        sample.question,
        answer_prefix=sample.answer_prefix,
        steps=3,
        stop_at_eos=False,
    ).new_tokens


def test_profile_label_names_the_dominant_rule():
    from clusterattn.analysis.report import profile_objective

    assert profile_objective({}) == "cosine"  # profiles from before the choice
    assert profile_objective({"objective": "answer", "rule": "mean"}) == "answer"
    assert profile_objective({"objective": "answer", "rule": "dominant"}) == "answer, dominant"
    assert (
        profile_objective({"objective": "answer", "rule": "dominant", "seed": 1})
        == "answer, dominant, seed 1"
    )
