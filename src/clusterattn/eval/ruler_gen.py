"""Generators of RULER's synthetic tasks (niah, variable tracking, common/frequent words extraction).

Each ``*_builder`` draws a sample's random content once (keys, values, needle depths, variable
names, word lists) from a seed string and returns ``(build, lo, hi)``: ``build(size)`` renders the
sample with a haystack of ``size`` units (essay words, noise lines, distractor needles, list
words), monotone in prompt length, and ``[lo, hi]`` is the valid size range.  :func:`fit_size`
then finds the largest size whose prompt fits the token budget.  The rules follow RULER's
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py`` and
``freq_words_extraction.py`` (templates from its ``constants.py``); the code is our own, so
RULER's nltk sentence splitter, argparse globals and scipy are not needed.
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from clusterattn.eval.niah import _corpus, _key_words

__all__ = ["Built", "NiahConfig", "cwe_builder", "fit_size", "fwe_builder", "niah_builder", "vt_builder"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_PREAMBLE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards."
)
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))

VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (  # "assgined" is RULER's spelling
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{n} variables are assgined the value {value}, they are: "
)
VT_ICL_TOKENS = 500 - 30  # RULER fits its one-shot example into 500 tokens minus tokens_to_generate

CWE_PREAMBLE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the {n} most common words in the above list?"
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"

FWE_PREAMBLE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


class Built(NamedTuple):
    """A rendered sample: the prompt parts, the references and the depth of the first answer's needle."""

    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    depth: float | None = None


Builder = Callable[[int], Built]


@dataclass(frozen=True)
class NiahConfig:
    """One niah task of RULER's ``synthetic.yaml``."""

    haystack: str  # "repeat" | "essay" | "needle"
    type_k: str  # "words" | "numbers" | "uuids"
    type_v: str
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


# ------------------------------------------------------------------------------------------- fitting
def fit_size(measure: Callable[[int], int], length: int, lo: int, hi: int, what: str) -> int:
    """Largest ``size`` in ``[lo, hi]`` with ``measure(size) <= length`` (``measure`` ~ monotone).

    Secant steps from two probes, then galloping and bisection on real measurements.

    Raises:
        ValueError: even ``lo`` is too long, or ``hi`` still fits (the source runs out).
    """
    memo: dict[int, int] = {}

    def m(size: int) -> int:
        if size not in memo:
            memo[size] = measure(size)
        return memo[size]

    if m(lo) > length:
        raise ValueError(f"length={length} is too small for {what} (at least {m(lo)} tokens are needed)")
    a, b = lo, min(hi, lo + 16)
    for _ in range(3):
        if b == a or m(b) == m(a):
            break
        guess = int(b + (length - m(b)) * (b - a) / (m(b) - m(a)))
        a, b = b, int(np.clip(guess, lo, hi))
    fitting = [s for s, t in memo.items() if t <= length]
    best = max(fitting)
    over = [s for s, t in memo.items() if t > length and s > best]
    bad = min(over) if over else None
    step = 1
    while bad is None:  # gallop up
        if best == hi:
            raise ValueError(f"length={length} is too large for {what} (the source has {m(hi)} tokens)")
        nxt = min(hi, best + step)
        if m(nxt) <= length:
            best, step = nxt, step * 2
        else:
            bad = nxt
    while bad - best > 1:
        mid = (best + bad) // 2
        if m(mid) <= length:
            best = mid
        else:
            bad = mid
    return best


# --------------------------------------------------------------------------------------------- draws
@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs (lower-case letters only)."""
    try:
        from wonderwords import random_word
    except ImportError as e:  # pragma: no cover - wonderwords is a pinned dependency
        raise ModuleNotFoundError(
            "the cwe task needs the wonderwords package (pip install wonderwords)"
        ) from e
    words: set[str] = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        words.update(w for w in random_word._get_words_from_text_file(name) if re.fullmatch(r"[a-z]+", w))
    return tuple(sorted(words))


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjs, nouns = _key_words()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _draw_unique(rng: random.Random, kind: str, taken: set[str]) -> str:
    """A fresh random key/value not in ``taken`` (then added to it)."""
    for _ in range(10_000):
        value = _draw(rng, kind)
        if value not in taken:
            taken.add(value)
            return value
    raise ValueError(f"ran out of distinct random {kind} ({len(taken)} drawn); is wonderwords installed?")


def _niah_text(cfg: NiahConfig, query: str) -> tuple[str, str, str]:
    """Preamble, question and answer prefix; singular wording when one value is asked (as RULER)."""
    parts, type_v = (NIAH_PREAMBLE, NIAH_QUESTION, NIAH_PREFIX), cfg.type_v
    if cfg.n_queries * cfg.n_values == 1:
        swaps = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
        parts = tuple(functools.reduce(lambda s, ab: s.replace(*ab), swaps, p) for p in parts)
        type_v = type_v[:-1]
    preamble, question, prefix = (p.format(type_v=type_v, query=query) for p in parts)
    return preamble, question, prefix


def _insert_lines(lines: list[str], needles: list[str], fractions: list[float]) -> list[str]:
    """Insert ``needles[i]`` at line index ``int(fractions[i] * len(lines))`` (fractions sorted)."""
    out, n = list(lines), len(lines)
    for needle, frac in sorted(zip(needles, fractions, strict=True), key=lambda p: -p[1]):
        out.insert(int(frac * n), needle)
    return out


def _insert_sentences(n_words: int, needles: list[str], depths: list[float]) -> str:
    """The first ``n_words`` essay words with ``needles[i]`` before sentence ``int(n_sent * depths[i])``."""
    text, word_ends, sentence_starts = _corpus()
    hay = text[: word_ends[n_words - 1]]
    bounds = sentence_starts[: np.searchsorted(sentence_starts, len(hay))]
    cuts = np.concatenate(([0], bounds, [len(hay)]))  # sentence i spans cuts[i]:cuts[i + 1]
    n_sent = len(cuts) - 1
    pieces, prev = [], 0
    for needle, depth in sorted(zip(needles, depths, strict=True), key=lambda p: p[1]):
        pos = int(cuts[int(n_sent * depth)])
        pieces += [hay[prev:pos].strip(), needle]
        prev = pos
    pieces.append(hay[prev:].strip())
    return " ".join(p for p in pieces if p)


# ----------------------------------------------------------------------------------------------- niah
def niah_builder(cfg: NiahConfig, seed: str) -> tuple[Builder, int, int]:
    """RULER niah: needles "One of the special magic {type_v} for {key} is: {value}." in a haystack."""
    rng = random.Random(seed)
    n_keys = max(cfg.n_keys, cfg.n_queries)
    taken: set[str] = set()
    keys = [_draw_unique(rng, cfg.type_k, taken) for _ in range(n_keys)]
    values = [[_draw_unique(rng, cfg.type_v, taken) for _ in range(cfg.n_values)] for _ in keys]
    needles = [
        (NEEDLE.format(type_v=cfg.type_v, key=k, value=v), v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    if cfg.haystack == "essay":
        positions = sorted(d / 100 for d in rng.sample(DEPTHS, len(needles)))
    else:
        positions = sorted(rng.random() for _ in needles)
    queried = rng.sample(range(n_keys), cfg.n_queries)
    answers = tuple(v for i in queried for v in values[i])
    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    preamble, question, prefix = _niah_text(cfg, query)
    depth = positions[[v for _, v in needles].index(answers[0])]
    texts = [t for t, _ in needles]

    distractors: list[str] = []
    d_rng = random.Random(seed + ":haystack")

    def haystack(size: int) -> str:
        if cfg.haystack == "essay":
            return _insert_sentences(size, texts, positions)
        if cfg.haystack == "repeat":
            return "\n".join(_insert_lines([NOISE] * size, texts, positions))
        while len(distractors) < size:  # "needle": distractor needles with fresh keys and values
            key, value = _draw_unique(d_rng, cfg.type_k, taken), _draw_unique(d_rng, cfg.type_v, taken)
            distractors.append(NEEDLE.format(type_v=cfg.type_v, key=key, value=value))
        return "\n".join(_insert_lines(distractors[:size], texts, positions))

    def build(size: int) -> Built:
        return Built(f"{preamble}\n{haystack(size)}", question, prefix, answers, depth)

    if cfg.haystack not in ("essay", "repeat", "needle"):
        raise ValueError(f"unknown haystack type {cfg.haystack!r}")
    hi = len(_corpus()[1]) if cfg.haystack == "essay" else 10**6
    return build, 1, hi


# ------------------------------------------------------------------------------------- variable tracking
def _vt_body(rng: random.Random, letters: int, n_hops: int) -> tuple[Callable[[int], str], str, list[str]]:
    """Noise lines with one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... at random sorted positions."""
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(n_hops)]
    fractions = sorted(rng.random() for _ in chain)

    def render(size: int) -> str:
        lines = [NOISE + "\n"] * size
        for j, (item, frac) in enumerate(zip(chain, fractions, strict=True)):
            lines.insert(int(frac * size) + j, item)
        return " ".join(lines).replace(". \n", ".\n").rstrip()

    return render, value, names


def vt_builder(seed: str, measure_text: Callable[[str], int], n_hops: int = 4) -> tuple[Builder, int, int]:
    """RULER variable tracking (1 chain, ``n_hops`` hops) with its one-shot example of ~500 tokens."""
    rng = random.Random(seed)
    icl_render, icl_value, icl_names = _vt_body(rng, 3, n_hops)
    render, value, names = _vt_body(rng, 5, n_hops)

    def icl_text(size: int) -> str:
        prefix = VT_PREFIX.format(n=n_hops + 1, value=icl_value).rstrip()
        question = VT_QUESTION.format(value=icl_value)
        return f"{VT_PREAMBLE}\n\n{icl_render(size)}\n{question} {prefix} {' '.join(icl_names)}\n\n"

    icl = icl_text(fit_size(lambda s: measure_text(icl_text(s)), VT_ICL_TOKENS, 1, 10**4, "the vt example"))
    question = VT_QUESTION.format(value=value)
    prefix = VT_PREFIX.format(n=n_hops + 1, value=value)

    def build(size: int) -> Built:
        return Built(f"{icl}{VT_PREAMBLE}\n\n{render(size)}", question, prefix, tuple(names))

    return build, 1, 10**6


# ------------------------------------------------------------------------------------ common words (cwe)
def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_builder(seed: str, length: int, n_common: int = 10) -> tuple[Builder, int, int]:
    """RULER cwe: ``n_common`` words repeated often among rarer ones, after a one-shot example.

    Below 4096 tokens common words appear 6 times and the others once (example: 20 words, 3/1),
    from 4096 on 30 and 3 times (example: 40 words, 10/3), as in RULER.
    """
    rng = random.Random(seed)
    freq, ex_words, ex_freq = ((6, 1), 20, (3, 1)) if length < 4096 else ((30, 3), 40, (10, 3))
    pool = list(word_pool())
    rng.shuffle(pool)
    example_words, words = pool[:ex_words], pool[ex_words:]
    example_list = example_words[:n_common] * ex_freq[0] + example_words[n_common:] * ex_freq[1]
    rng.shuffle(example_list)
    question, prefix = CWE_QUESTION.format(n=n_common), CWE_PREFIX.format(n=n_common)
    example = (
        f"{CWE_PREAMBLE}\n{_numbered(example_list)}\n{question} {prefix}{_numbered(example_words[:n_common])}"
    )
    answers = tuple(words[:n_common])

    def build(size: int) -> Built:
        items = words[:n_common] * freq[0] + words[n_common:size] * freq[1]
        random.Random(f"{seed}:{size}").shuffle(items)
        return Built(f"{example}\n{CWE_PREAMBLE}\n{_numbered(items)}", question, prefix, answers)

    return build, n_common + 1, len(words)


# ---------------------------------------------------------------------------------- frequent words (fwe)
def _zeta(alpha: float) -> float:
    """Riemann zeta for ``alpha > 1`` (partial sum plus the integral tail)."""
    n = 10_000
    return float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)) + n ** (1 - alpha) / (alpha - 1)


def fwe_builder(seed: str, length: int, alpha: float = 2.0, word_len: int = 6) -> tuple[Builder, int, int]:
    """RULER fwe: coded words with Zipf counts ``N * k**-alpha / zeta(alpha)``; rank 1 is noise ``...``.

    The vocabulary has ``length // 50`` words (RULER's default); the answers are ranks 2 to 4.
    """
    rng = random.Random(seed)
    vocab_size = max(length // 50, 8)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / _zeta(alpha)

    def build(size: int) -> Built:
        counts = (size * weights).astype(int)
        words = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
        random.Random(f"{seed}:{size}").shuffle(words)
        return Built(f"{FWE_PREAMBLE} {' '.join(words)}", FWE_QUESTION, FWE_PREFIX, tuple(ranked[1:4]))

    # The smallest size where ranks 2..5 have strictly decreasing counts.
    lo = next(n for n in range(8, 10**4) if len(set((n * weights[1:5]).astype(int))) == 4)
    return build, lo, 10**7
