"""Samples for profiling and analysis: a RULER task, the built-in needle, or a user JSONL file,
and the seeded profile / held-out split.

A JSONL file holds one object per line with ``context`` and ``question`` (required),
``answer_prefix`` (optional) and ``answers`` (a list of strings, or ``answer``: one string; optional,
needed only to score accuracy: a prediction is correct when it contains every answer).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskSample:
    """One prompt: ``context`` is compressed with ``question`` appended (query-aware).

    ``answer_prefix`` is appended after the generation prompt verbatim; ``source`` keeps the
    loader's own sample object (for its scorer).
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str = ""
    answers: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    source: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, str) or not self.context.strip():
            raise ValueError(f"sample {self.index} of {self.task}: context must be a non-empty string")
        if not isinstance(self.question, str):
            raise ValueError(f"sample {self.index} of {self.task}: question must be a string")
        if isinstance(self.answers, str):
            self.answers = [self.answers]
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def is_jsonl(task: str) -> bool:
    return str(task).endswith(".jsonl")


def ruler_tasks() -> tuple[str, ...]:
    """RULER task names the installed loader knows (empty when it is not there)."""
    try:
        from clusterattn.eval.ruler import RULER_TASKS
    except ImportError:
        return ()
    return tuple(RULER_TASKS)


def check_task(task: str) -> None:
    """``ValueError`` unless ``task`` is ``niah``, a known RULER task or an existing JSONL file."""
    if is_jsonl(task):
        if not Path(task).is_file():
            raise ValueError(f"task file {task} does not exist")
        return
    known = ("niah", *ruler_tasks())
    if task not in known:
        raise ValueError(f"unknown task {task!r}; choose one of {known} or give a .jsonl file")


def load_jsonl(path: str | Path, n: int | None = None) -> list[TaskSample]:
    samples = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "context" not in row or "question" not in row:
            raise ValueError(f"{path} line {i + 1}: needs 'context' and 'question'")
        answers = row.get("answers", row.get("answer", []))
        samples.append(
            TaskSample(
                task=Path(path).stem,
                index=len(samples),
                context=row["context"],
                question=row["question"],
                answer_prefix=row.get("answer_prefix", ""),
                answers=answers,
                max_new_tokens=int(row.get("max_new_tokens", 32)),
            )
        )
    return samples if n is None else samples[:n]


def load_samples(task: str, length: int, n: int, tokenizer, seed: int = 0) -> list[TaskSample]:
    """``n`` samples of ``task`` at ``length`` tokens (a JSONL file gives its first ``n`` lines)."""
    check_task(task)
    if is_jsonl(task):
        return load_jsonl(task, n)
    if task == "niah":
        from clusterattn.eval.niah import make_needle_samples

        return [
            TaskSample(
                task="niah",
                index=i,
                context=s.context,
                question=s.question,
                answer_prefix=" " + s.answer_prefix,
                answers=[s.answer],
                max_new_tokens=12,
                source=s,
            )
            for i, s in enumerate(make_needle_samples(tokenizer, length, n, seed=seed))
        ]
    from clusterattn.eval.ruler import load_ruler_samples

    return [
        TaskSample(
            task=task,
            index=i,
            context=s.context,
            question=s.question,
            answer_prefix=s.answer_prefix or "",
            answers=list(s.answers),
            max_new_tokens=int(s.max_new_tokens),
            source=s,
        )
        for i, s in enumerate(load_ruler_samples(task, length, n, tokenizer, seed=seed))
    ]


def score(sample: TaskSample, prediction: str) -> float:
    """The task's own metric for RULER samples, else 1.0 when every answer occurs in ``prediction``."""
    if sample.source is not None and sample.task not in ("niah",) and hasattr(sample.source, "metric"):
        from clusterattn.eval.tasks import score as task_score

        return float(task_score(sample.source, prediction))
    if not sample.answers:
        raise ValueError(f"sample {sample.index} of {sample.task} has no answers to score against")
    return float(all(a.lower() in prediction.lower() for a in sample.answers))


def split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)``: ``(profile, held_out)``, both sorted; the profile part has
    ``max(1, round(fraction * n))`` indices and the held-out part is never empty."""
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    k = min(n - 1, max(1, round(fraction * n)))
    chosen = sorted(random.Random(seed).sample(range(n), k))
    return chosen, sorted(set(range(n)) - set(chosen))
