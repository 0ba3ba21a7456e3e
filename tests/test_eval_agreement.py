"""Two runs of the same grid side by side (clusterattn.eval.agreement, `clusterattn eval-compare`)."""

import json

import pytest

from clusterattn.cli import main
from clusterattn.eval.agreement import agreement_table, compare_runs


def _row(task, index, press, budget, prediction, score, prefill_s=10.0, seed=0, error=None):
    return {
        "model": "m", "task": task, "length": 1024, "setting": "query_aware", "seed": seed, "index": index,
        "press": press, "budget": budget, "prediction": prediction, "score": score, "error": error,
        "prefill_s": prefill_s,
    }  # fmt: skip


def _runs():
    a = [
        _row("t1", 0, "full", "full", " 42.", 1.0),
        _row("t1", 0, "snapkv", "r0.5", " 42.", 1.0),
        _row("t1", 1, "snapkv", "r0.5", " 7", 0.0),
        _row("t2", 0, "snapkv", "r0.5", "x", 0.0, error="boom"),  # failed: left out
        _row("t2", 1, "snapkv", "r0.5", "only in a", 1.0),
    ]
    b = [
        _row("t1", 0, "full", "full", "42.", 1.0, prefill_s=5.0),  # white space aside, identical
        _row("t1", 0, "snapkv", "r0.5", " 42!", 1.0, prefill_s=5.0),  # differs, same score
        _row("t1", 1, "snapkv", "r0.5", " 8", 0.0, prefill_s=2.5),
        _row("t2", 0, "snapkv", "r0.5", " 1", 1.0),
    ]
    return a, b


def test_compare_runs_counts_identical_answers_and_scores_per_press_and_budget():
    result = compare_runs(*_runs())
    cells = {(c["press"], c["budget"]): c for c in result["cells"]}
    assert [(c["press"], c["budget"]) for c in result["cells"]] == [("full", "full"), ("snapkv", "r0.5")]
    assert cells["full", "full"] == {
        "press": "full", "budget": "full", "n": 1, "identical": 1, "same_score": 1, "score_a": 100.0,
        "score_b": 100.0,
    }  # fmt: skip
    snap = cells["snapkv", "r0.5"]
    assert (snap["n"], snap["identical"], snap["same_score"]) == (2, 0, 2)
    assert (snap["score_a"], snap["score_b"]) == (50.0, 50.0)
    assert result["all"]["n"] == 3 and result["all"]["identical"] == 1
    assert (result["only_a"], result["only_b"]) == (1, 1)  # a's t2/1, b's t2/0 (a failed there)
    assert result["prefill_ratio"] == pytest.approx(3.0)  # median of 10/5 (t1/0) and 10/2.5 (t1/1)


def test_compare_runs_refuses_runs_of_different_samples():
    a, b = _runs()
    with pytest.raises(ValueError, match="share no scored row"):
        compare_runs(a, [{**r, "seed": 1} for r in b])


def test_eval_compare_prints_the_table(tmp_path, capsys):
    for name, rows in zip("ab", _runs(), strict=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval-compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "fp32", "bf16"]) == 0
    out = capsys.readouterr().out
    assert out == agreement_table(compare_runs(*_runs()), ("fp32", "bf16"))
    assert "| snapkv | r0.5 | 2 | 0 (0.0 %) | 2 | 50.0 | 50.0 |" in out
    assert "| **all** |  | 3 | 1 (33.3 %) | 3 |" in out
    with pytest.raises(FileNotFoundError, match="no predictions"):
        main(["eval-compare", str(tmp_path / "a"), str(tmp_path / "missing")])
