"""RULER's 13 synthetic tasks, generated offline and fitted to an exact token budget.

``make_ruler_samples(task, length, n, tokenizer)`` returns ``n`` :class:`~clusterattn.eval.tasks.Sample`
objects whose prompt, as the runner builds it (``clusterattn.generation.build_prompt``: chat
template when ``chat`` and the tokenizer has one, head and tail tokenised separately), has
``n_tokens <= length`` tokens, as close to ``length`` as the haystack's granularity allows (a word
for essays, word lists and documents; a line for the noise and distractor-needle haystacks).

Task semantics follow RULER's ``synthetic.yaml`` and ``constants.py`` (see ``ruler_gen`` and
``ruler_qa``): haystack kind, needle types and counts, templates, answer prefixes,
``tokens_to_generate`` and the metric.  Each template is split into ``context`` (the instruction
preamble and the haystack) and ``question`` (its last line), so the query-agnostic setting
compresses a context that does not contain the question.  Differences from RULER: the prompt
fills ``length`` itself (RULER reserves ``tokens_to_generate`` inside ``max_seq_length``),
sentences are split with a regex instead of nltk, and the random draws are our own (seeded per
task, seed and index: the same samples on every machine, whatever ``n``).

``load_ruler_samples`` caches samples as JSONL under
``<cache_dir or $CLUSTERATTN_CACHE or ~/.cache/clusterattn>/data/<tokenizer fingerprint>/ruler/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterattn.eval.ruler_gen import (
    Builder,
    NiahConfig,
    cwe_builder,
    fit_size,
    fwe_builder,
    niah_builder,
    vt_builder,
)
from clusterattn.eval.ruler_qa import QA_DATASETS, qa_builder
from clusterattn.eval.tasks import Sample

__all__ = ["RULER_TASKS", "load_ruler_samples", "make_ruler_samples", "tokenizer_fingerprint"]

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)

NIAH_CONFIGS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("repeat", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", n_values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", n_queries=4),
}
# RULER's tokens_to_generate per task family (constants.py).
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
DATA_VERSION = 1  # bump when generated samples change, to invalidate caches
_PROBE = (
    "Fingerprint: The quick brown fox jumps over 1234567 lazy dogs; 3f2a-9c0e naïve café, 東京, 😀\n\tend "
)


def _family(task: str) -> str:
    if task.startswith("niah_"):
        return "niah"
    return "qa" if task in QA_DATASETS else task


def _check(task: str, length: Any, n: Any) -> None:
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(RULER_TASKS)}")
    for name, value, low in (("length", length, 1), ("n", n, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _counter(tokenizer: Any, chat: bool) -> tuple[Callable[[str, str, str], int], Callable[[str], int]]:
    """``(prompt_tokens(context, question, prefix), text_tokens(text))`` as the runner counts them."""
    from clusterattn.generation import build_prompt

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(context: str, question: str, answer_prefix: str) -> int:
        head, tail = build_prompt(tokenizer, context, question, answer_prefix, chat)
        return text_tokens(head) + text_tokens(tail)

    return prompt_tokens, text_tokens


def _builder(task: str, length: int, index: int, seed: int, text_tokens: Callable[[str], int]):
    sample_seed = f"ruler:{task}:{seed}:{index}"
    family = _family(task)
    if family == "niah":
        return niah_builder(NIAH_CONFIGS[task], sample_seed)
    if family == "vt":
        return vt_builder(sample_seed, text_tokens)
    if family == "cwe":
        return cwe_builder(sample_seed, length)
    if family == "fwe":
        return fwe_builder(sample_seed, length)
    return qa_builder(QA_DATASETS[task], seed, index, length, sample_seed)


def _make_one(task: str, length: int, index: int, seed: int, counters: tuple) -> Sample:
    prompt_tokens, text_tokens = counters
    build: Builder
    build, lo, hi = _builder(task, length, index, seed, text_tokens)
    size = fit_size(lambda s: prompt_tokens(*build(s)[:3]), length, lo, hi, f"task {task!r}")
    built = build(size)
    family = _family(task)
    return Sample(
        task=task,
        length=length,
        index=index,
        context=built.context,
        question=built.question,
        answer_prefix=built.answer_prefix,
        answers=built.answers,
        metric="string_match_part" if family == "qa" else "string_match_all",
        max_new_tokens=TOKENS_TO_GENERATE[family],
        n_tokens=prompt_tokens(built.context, built.question, built.answer_prefix),
        depth=built.depth,
        seed=seed,
    )


def make_ruler_samples(
    task: str, length: int, n: int, tokenizer: Any, *, seed: int = 0, chat: bool = True
) -> list[Sample]:
    """Generate samples ``0 .. n-1`` of a RULER ``task`` whose prompts fit ``length`` tokens.

    Args:
        task: one of :data:`RULER_TASKS`.
        length: target prompt length in tokens (head + tail of ``build_prompt``).
        n: number of samples (``>= 1``); sample ``i`` does not depend on ``n``.
        tokenizer: a Hugging Face tokenizer; lengths are measured with it.
        seed: the seed; equal seeds give identical samples on every machine.
        chat: count the prompt with the tokenizer's chat template (when it has one), as the runner.

    Raises:
        ValueError: unknown task, ``n < 1``, or ``length`` too small / too large for the task.
    """
    _check(task, length, n)
    counters = _counter(tokenizer, chat)
    return [_make_one(task, length, i, seed, counters) for i in range(n)]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what makes token counts differ: vocabulary size, chat template, probe tokenisations.

    The probes are a fixed string with digits, hex and non-ASCII text plus the start of the essays,
    so the same tokenizer loaded from different places (GGUF file, saved copy) shares one cache.
    """
    from clusterattn.eval.niah import load_essays

    probe = _PROBE + load_essays()[:4000]
    info = {
        "size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": str(getattr(tokenizer, "bos_token", None)),
        "probe": list(tokenizer(probe, add_special_tokens=False)["input_ids"]),
    }
    blob = json.dumps(info, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CLUSTERATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clusterattn"


def _read_cache(path: Path, task: str, length: int, seed: int, chat_key: str) -> list[Sample] | None:
    """Samples ``0..m-1`` from ``path``, or None when the file is missing, corrupt or partial."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if header != {
            "version": DATA_VERSION,
            "task": task,
            "length": length,
            "seed": seed,
            "chat": chat_key,
        }:
            return None
        samples = [Sample.from_dict(json.loads(line)) for line in lines[1:]]
    except (OSError, IndexError, ValueError, TypeError, KeyError):
        return None
    ok = all((s.task, s.length, s.seed, s.index) == (task, length, seed, i) for i, s in enumerate(samples))
    return samples if ok and samples else None


def _write_cache(path: Path, header: dict[str, Any], samples: list[Sample]) -> None:
    """Write atomically (temporary file + rename), so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in [header, *(s.to_dict() for s in samples)])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_ruler_samples(
    task: str,
    length: int,
    n: int,
    tokenizer: Any,
    *,
    seed: int = 0,
    chat: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[Sample]:
    """:func:`make_ruler_samples` with a JSONL cache on disk (one file per task, length, seed, chat).

    The file lives under ``<root>/data/<tokenizer fingerprint>/ruler/v<version>/<task>/``, where
    ``root`` is ``cache_dir``, else ``$CLUSTERATTN_CACHE``, else ``~/.cache/clusterattn``.  A file
    with at least ``n`` samples is read; a shorter one is extended; a corrupt or partial one is
    regenerated.
    """
    _check(task, length, n)
    chat_key = "chat" if chat and getattr(tokenizer, "chat_template", None) else "plain"
    folder = _cache_root(cache_dir) / "data" / tokenizer_fingerprint(tokenizer) / "ruler" / f"v{DATA_VERSION}"
    path = folder / task / f"len{length}-seed{seed}-{chat_key}.jsonl"
    cached = _read_cache(path, task, length, seed, chat_key) or []
    if len(cached) >= n:
        return cached[:n]
    counters = _counter(tokenizer, chat)
    samples = cached + [_make_one(task, length, i, seed, counters) for i in range(len(cached), n)]
    header = {"version": DATA_VERSION, "task": task, "length": length, "seed": seed, "chat": chat_key}
    _write_cache(path, header, samples)
    return samples
