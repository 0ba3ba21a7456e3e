"""Paired bootstrap intervals of the head-to-head gap, against a loop reference."""

from __future__ import annotations

import pytest
import torch

from clusterattn.eval.bootstrap import bootstrap_gaps, gap_interval, paired_differences
from clusterattn.eval.compare import head_to_head
from clusterattn.eval.report import aggregate


def _row(press, budget, task, index, score, error=None):
    return {
        "model": "m", "task": task, "length": 2048, "setting": "query_aware", "press": press,
        "budget": budget, "index": index, "score": score, "error": error,
    }  # fmt: skip


def naive_bootstrap(differences: dict, resamples: int, seed: int) -> list[float]:
    """One resample at a time: the same draws (one randint per task, tasks in sorted order), then
    plain Python means per task and over tasks."""
    generator = torch.Generator().manual_seed(seed)
    draws = {t: torch.randint(len(differences[t]), (resamples, len(differences[t])), generator=generator)
             for t in sorted(differences)}  # fmt: skip
    gaps = []
    for r in range(resamples):
        task_means = []
        for task in sorted(differences):
            values = [float(differences[task][i]) for i in draws[task][r].tolist()]
            task_means.append(sum(values) / len(values))
        gaps.append(sum(task_means) / len(task_means))
    return gaps


def test_bootstrap_matches_loop_reference():
    generator = torch.Generator().manual_seed(3)
    differences = {t: 100.0 * (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5)
                   for t, n in (("b", 7), ("a", 10), ("c", 1))}  # fmt: skip
    fast = bootstrap_gaps(differences, resamples=300, seed=5)
    assert fast.shape == (300,)
    assert torch.allclose(fast, torch.tensor(naive_bootstrap(differences, 300, 5), dtype=torch.float64))
    assert torch.equal(fast, bootstrap_gaps(differences, resamples=300, seed=5))  # reproducible


def test_paired_differences_pair_by_sample_and_skip_failures():
    rows = [
        _row("clusterattn", "64", "a", 0, 1.0), _row("snapkv", "64", "a", 0, 0.0),
        _row("clusterattn", "64", "a", 1, 0.5), _row("snapkv", "64", "a", 1, 0.5),
        _row("clusterattn", "64", "a", 2, 1.0), _row("snapkv", "64", "a", 2, None, error="boom"),
        _row("clusterattn", "64", "b", 0, 0.0), _row("snapkv", "64", "b", 0, 1.0),
        _row("clusterattn", "128", "a", 0, 0.0), _row("streamingllm", "64", "a", 0, 1.0),
        _row("clusterattn", "64", "c", 0, 1.0),  # no rival sample: no pair for task c
    ]  # fmt: skip
    differences = paired_differences(rows, "clusterattn", "snapkv", "64")
    assert sorted(differences) == ["a", "b"]
    assert differences["a"].tolist() == [100.0, 0.0]
    assert differences["b"].tolist() == [-100.0]


def test_interval_of_identical_and_shifted_presses():
    same = {"a": torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)}
    assert gap_interval(same) == (0.0, 0.0)
    full = lambda n, value: torch.full((n,), value, dtype=torch.float64)  # noqa: E731
    shifted = {"a": full(5, 20.0), "b": full(3, 10.0)}
    low, high = gap_interval(shifted)
    assert low == pytest.approx(15.0) and high == pytest.approx(15.0)
    mixed = {"a": torch.tensor([100.0, 0.0, 0.0, -100.0, 100.0], dtype=torch.float64)}
    low, high = gap_interval(mixed)
    assert low < 20.0 < high  # the point gap lies inside
    assert gap_interval(mixed, level=0.5)[1] - gap_interval(mixed, level=0.5)[0] < high - low


BAD = [({"level": 1.0}, "level"), ({"level": 0.0}, "level"), ({"resamples": 0}, "resamples")]


@pytest.mark.parametrize(("kwargs", "word"), BAD)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        gap_interval({"a": torch.zeros(2, dtype=torch.float64)}, **kwargs)
    with pytest.raises(ValueError, match="no paired samples"):
        gap_interval({})


def test_head_to_head_prints_the_interval_with_predictions():
    rows = []
    for i in range(4):
        rows += [_row("clusterattn", "64", "a", i, 1.0), _row("snapkv", "64", "a", i, float(i % 2))]
        rows += [_row("clusterattn", "64", "b", i, 0.0), _row("snapkv", "64", "b", i, 0.0)]
    metrics = aggregate(rows)
    plain = head_to_head(metrics)
    assert "| 64 | 50.0 | snapkv 25.0 | +25.0 | best | 1 of 1 |" in plain
    table = head_to_head(metrics, predictions=rows)
    assert "95 % interval of the gap" in table
    low, high = gap_interval(paired_differences(rows, "clusterattn", "snapkv", "64"))
    assert f"| 64 | 50.0 | snapkv 25.0 | +25.0 | {low:+.1f} to {high:+.1f} | best | 1 of 1 |" in table
    assert 0.0 <= low < 25.0 < high <= 50.0
