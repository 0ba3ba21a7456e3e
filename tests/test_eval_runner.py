"""The eval runner on a tiny model: outputs, resume, failed samples, config errors before loading."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import clusterattn
from clusterattn.eval import runner
from clusterattn.eval.runner import EvalConfig, read_predictions, run_eval
from clusterattn.eval.tasks import Sample
from test_integration import TOK, ids_text


def fake_samples(config, task, length, tokenizer):
    return [
        Sample(
            task=task,
            length=length,
            index=i,
            context=ids_text(length, seed=i),
            question="3 4",
            answer_prefix="",
            answers=("5",),
            metric="string_match_all",
            max_new_tokens=3,
            n_tokens=length + 2,
            depth=0.2 * i,
        )  # fmt: skip
        for i in range(config.samples)
    ]


@pytest.fixture
def patched(llama, monkeypatch):
    loads = []

    def load_model(name, dtype=torch.float32):
        assert dtype == torch.float32  # the default --dtype
        loads.append(name)
        return llama, TOK

    monkeypatch.setattr(clusterattn, "load_model", load_model)
    monkeypatch.setattr(runner, "load_samples", fake_samples)
    return loads


def config(tmp_path, **overrides):
    base = dict(
        tasks=["niah_single_1", "vt"], lengths=[300],
        presses=["full", "clusterattn", "snapkv:window_size=16"],
        budgets=[64, "0.5"], settings=["query_aware", "query_agnostic"], samples=2, out=str(tmp_path),
    )  # fmt: skip
    return EvalConfig(**{**base, **overrides})


def test_outputs_and_resume(patched, tmp_path, monkeypatch):
    metrics = run_eval(config(tmp_path), progress=False)
    rows = read_predictions(tmp_path / "predictions.jsonl")
    # 2 tasks x 2 samples x 2 settings x (full + 2 presses x 2 budgets)
    assert len(rows) == 2 * 2 * 2 * 5
    assert {r["press"] for r in rows} == {"full", "clusterattn", "snapkv:window_size=16"}
    assert {r["budget"] for r in rows} == {"full", "64", "r0.5"}
    assert all(r["error"] is None and r["score"] in (0.0, 1.0) for r in rows)
    kept = {r["kept"] for r in rows if r["budget"] == "64"}
    assert kept == {64}
    with metrics.open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:9] == [
        "model",
        "task",
        "length",
        "press",
        "budget",
        "setting",
        "n",
        "failed",
        "score",
    ]
    assert len(table) == 2 * 2 * 5 and all(int(r["n"]) == 2 for r in table)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"] and info["finished"]
    assert info["arguments"]["presses"] == ["full", "clusterattn", "snapkv:window_size=16"]

    calls = []
    monkeypatch.setattr(runner, "answer_all", lambda *a, **k: calls.append(1))
    run_eval(config(tmp_path), progress=False)  # everything is done: nothing runs
    assert calls == [] and len(read_predictions(tmp_path / "predictions.jsonl")) == 40
    history = json.loads((tmp_path / "run.json").read_text())["history"]  # the first run is kept
    assert [h["started_unix"] for h in history] == [info["started_unix"]] and history[0]["finished"]


def test_failed_sample_is_recorded_and_retried(patched, tmp_path, monkeypatch):
    real = runner.answer_all

    def flaky(model, tokenizer, **kwargs):
        if kwargs["context"] == ids_text(300, seed=1):
            raise RuntimeError("out of memory")
        return real(model, tokenizer, **kwargs)

    monkeypatch.setattr(runner, "answer_all", flaky)
    cfg = config(tmp_path, tasks=["vt"], settings=["query_aware"], budgets=[64])
    run_eval(cfg, progress=False)
    rows = read_predictions(tmp_path / "predictions.jsonl")
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 3 and all(r["index"] == 1 and "out of memory" in r["error"] for r in failed)
    monkeypatch.setattr(runner, "answer_all", real)
    run_eval(
        config(tmp_path, tasks=["vt"], settings=["query_aware"], budgets=[64], retry_failed=True),
        progress=False,
    )
    with (tmp_path / "metrics.csv").open() as handle:
        assert all(r["failed"] == "0" and r["n"] == "2" for r in csv.DictReader(handle))


def test_torn_line_is_ignored(patched, tmp_path):
    (tmp_path / "predictions.jsonl").write_text('{"model": "smollm2-135m", "task"')
    run_eval(
        config(tmp_path, tasks=["vt"], settings=["query_aware"], budgets=[64], samples=1), progress=False
    )
    assert len(read_predictions(tmp_path / "predictions.jsonl")) == 3


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(tasks=["niah_single_9"]), "unknown RULER tasks"),
        (dict(presses=["clusterattn:num_blok=2"]), "accepts"),
        (dict(budgets=["1.5"]), "ratio"),
        (dict(settings=["aware"]), "unknown setting"),
        (dict(lengths=[100]), "lengths"),
        (dict(samples=0), "samples"),
        (dict(models=["no-such-model"]), "registry name"),
        (dict(profile="/no/such/profile.json"), "profile not found"),
        (dict(longbench="/no/such.jsonl"), "LongBench file not found"),
        (dict(peers=["snapkv"], peer_python="/no/python"), "make peers"),
        (dict(presses=["snapkv", "snapkv"]), "duplicate"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_config_fails_before_loading(patched, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)
    assert patched == []


def test_cli_rejects_bad_press_before_loading(patched, tmp_path):
    from clusterattn.cli import main

    with pytest.raises(ValueError, match="unknown clusterattn press"):
        main(["eval", "--presses", "snapkvv", "--out", str(tmp_path)])
    assert patched == []


def test_cli_forwards_every_option(tmp_path, monkeypatch):
    """Every EvalConfig field the CLI exposes reaches the config (run_eval itself is stubbed)."""
    import dataclasses

    from clusterattn import cli
    from clusterattn.eval import report

    seen = []
    monkeypatch.setattr(runner, "run_eval", lambda config: seen.append(config))
    out = tmp_path / "out"
    out.mkdir()
    (out / "tables.md").write_text("")
    monkeypatch.setattr(report, "write_report", lambda out, doc=None: [])
    profile = tmp_path / "p.json"
    profile.write_text("{}")
    cli.main([
        "eval", "--models", "smollm2-135m", "--tasks", "vt", "--lengths", "300", "--presses", "full",
        "--budgets", "64", "--settings", "query_agnostic", "--samples", "3",
        "--seed", "5", "--profile", str(profile), "--max-new-tokens", "7", "--retry-failed",
        "--dtype", "bfloat16", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    (config,) = seen
    expected = {
        "models": ["smollm2-135m"], "tasks": ["vt"], "lengths": [300], "presses": ["full"],
        "peers": [], "budgets": ["64"], "settings": ["query_agnostic"], "samples": 3, "seed": 5,
        "profile": str(profile), "max_new_tokens": 7, "retry_failed": True, "out": str(tmp_path / "out"),
        "longbench": None, "dtype": "bfloat16",
    }  # fmt: skip
    missing = {f.name for f in dataclasses.fields(config)} - set(expected) - {"batch", "peer_python"}
    assert not missing, f"CLI options not checked: {missing}"
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value or [str(x) for x in got] == value or str(got) == str(value), name


def test_profile_restricts_to_held_out_and_configures_clusterattn(patched, tmp_path, monkeypatch):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "task": "vt", "seed": 0, "config": {"num_block": 3},
        "budgets": {"64": {"config": {"num_block": 2}}}, "split": {"heldout_indices": [1]},
    }))  # fmt: skip
    built = []
    real = runner.answer_all

    def spy(model, tokenizer, **kwargs):
        built.extend(p for p in kwargs["presses"].values() if p is not None)
        return real(model, tokenizer, **kwargs)

    monkeypatch.setattr(runner, "answer_all", spy)
    cfg = config(
        tmp_path / "run", tasks=["vt"], presses=["clusterattn"], budgets=[64], settings=["query_aware"]
    )
    cfg.profile = str(profile)
    run_eval(cfg, progress=False)
    rows = read_predictions(tmp_path / "run" / "predictions.jsonl")
    assert [r["index"] for r in rows] == [1]
    assert [p.num_block for p in built] == [2]
    with pytest.raises(ValueError, match="--seed 0"):
        config(tmp_path, tasks=["vt"], seed=3, profile=str(profile))


def test_max_new_tokens_caps_generation(patched, tmp_path):
    cfg = config(tmp_path, tasks=["vt"], settings=["query_aware"], budgets=[64], samples=1, max_new_tokens=1)
    run_eval(cfg, progress=False)
    assert {r["new_tokens"] for r in read_predictions(tmp_path / "predictions.jsonl")} == {1}
    assert json.loads((tmp_path / "run.json").read_text())["arguments"]["max_new_tokens"] == 1


@pytest.mark.parametrize("exit_code", [0, 3])
def test_peer_job_file_is_removed_only_after_the_worker_succeeds(patched, tmp_path, exit_code):
    worker = tmp_path / "fake-python"  # stands in for the peers environment's python; writes no rows
    worker.write_text(f'#!/bin/sh\ntest -s "$3" || exit 9\nexit {exit_code}\n')
    worker.chmod(0o755)
    cfg = config(
        tmp_path / "out", tasks=["vt"], presses=["full"], settings=["query_aware"], budgets=[64], samples=1,
        peers=["snapkv"], peer_python=str(worker),
    )  # fmt: skip
    job = tmp_path / "out" / "peer_job.json"
    if exit_code:
        with pytest.raises(RuntimeError, match="kvpress worker failed"):
            run_eval(cfg, progress=False)
        assert json.loads(job.read_text())["jobs"][0]["presses"] == [["snapkv", {}, "kvpress:snapkv", 64]]
    else:
        run_eval(cfg, progress=False)
        assert not job.exists()


def test_run_json_names_the_commit_the_run_started_on(patched, tmp_path, monkeypatch):
    commits = iter(["aaa", "bbb-dirty"])  # the tree changes while the run goes on
    monkeypatch.setattr(runner, "_git_commit", lambda: next(commits))
    run_eval(
        config(tmp_path, tasks=["vt"], presses=["full"], settings=["query_aware"], samples=1), progress=False
    )
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["finished"] and info["git_commit"] == "aaa"


def test_a_run_folder_keeps_its_dtype(tmp_path):
    from clusterattn.eval.runner import EvalConfig, _check_same_dtype

    (tmp_path / "run.json").write_text('{"seed": 0, "arguments": {"samples": 3}}')  # before --dtype
    _check_same_dtype(tmp_path / "run.json", "float32")
    with pytest.raises(ValueError, match="--dtype float32"):
        _check_same_dtype(tmp_path / "run.json", "bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        EvalConfig(dtype="float16")


def test_a_run_folder_keeps_its_seed(tmp_path):
    from clusterattn.eval.runner import _check_same_seed

    (tmp_path / "run.json").write_text('{"seed": 0}')
    _check_same_seed(tmp_path / "run.json", 0)
    with pytest.raises(ValueError, match="--seed 0"):
        _check_same_seed(tmp_path / "run.json", 1)
    _check_same_seed(tmp_path / "missing.json", 1)
