"""The sample type shared by all evaluation tasks, and the metrics that score predictions.

A :class:`Sample` carries everything the runner needs: the ``context`` (compressed in both the
query-aware and the query-agnostic setting), the ``question`` and ``answer_prefix`` that follow it,
the references, the metric name (a key of :data:`METRICS`) and the number of tokens to generate.

Metrics take ``(prediction, references)`` and return a score in ``[0, 1]``:

* RULER's ``string_match_all`` (fraction of references found in the prediction, case-insensitive)
  and ``string_match_part`` (1 if any reference is found);
* LongBench's ``qa_f1``, ``rouge_l``, ``classification``, ``code_sim``, ``count`` and
  ``retrieval``, written in pure Python.  Chinese text is split into single characters where
  LongBench segments it with ``jieba`` (not available offline), so scores on the Chinese datasets
  are close to, not identical with, LongBench's.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["METRICS", "Sample", "score"]

# LongBench datasets whose prediction is cut to its first line before scoring (few-shot tasks).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PUNCTUATION = set(string.punctuation) | set("，。！？；：“”‘’（）《》【】、…—·「」『』〈〉～")
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt with its references (RULER or LongBench)."""

    task: str  # "niah_single_1", ..., "qa_2", or f"longbench/{dataset}"
    length: int  # target prompt length in tokens
    index: int  # sample number within (task, length, seed)
    context: str  # compressed in both settings (instruction preamble + haystack)
    question: str  # appended after the context
    answer_prefix: str  # generation continues after it ("" when none)
    answers: tuple[str, ...]  # references
    metric: str  # a key of METRICS
    max_new_tokens: int  # RULER's tokens_to_generate / LongBench's per-dataset maximum
    n_tokens: int  # measured prompt tokens (head + tail of ``build_prompt``)
    depth: float | None = None  # needle depth in [0, 1] (niah tasks), else None
    seed: int = 0
    all_classes: tuple[str, ...] = ()  # LongBench classification labels (trec, lsht), else empty

    def __post_init__(self) -> None:
        if isinstance(self.answers, str) or not isinstance(self.answers, Sequence):
            raise TypeError(f"answers must be a sequence of strings, got {type(self.answers).__name__}")
        object.__setattr__(self, "answers", tuple(str(a) for a in self.answers))
        object.__setattr__(self, "all_classes", tuple(str(c) for c in self.all_classes))
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {sorted(METRICS)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["answers"] = list(self.answers)
        d["all_classes"] = list(self.all_classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing, unknown or mistyped fields."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        missing = {n for n, f in fields.items() if f.default is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise ValueError(f"bad Sample dict: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        for name in ("task", "context", "question", "answer_prefix", "metric"):
            if not isinstance(d[name], str):
                raise ValueError(f"Sample field {name!r} must be a string, got {d[name]!r}")
        for name in ("length", "index", "max_new_tokens", "n_tokens", "seed"):
            if name in d and (isinstance(d[name], bool) or not isinstance(d[name], int)):
                raise ValueError(f"Sample field {name!r} must be an int, got {d[name]!r}")
        for name in ("answers", "all_classes"):
            value = d.get(name, [])
            if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
                raise ValueError(f"Sample field {name!r} must be a list of strings, got {value!r}")
        depth = d.get("depth")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))):
            raise ValueError(f"Sample field 'depth' must be a number or null, got {depth!r}")
        kwargs = dict(d)
        kwargs["answers"] = tuple(d["answers"])
        kwargs["all_classes"] = tuple(d.get("all_classes", ()))
        kwargs["depth"] = None if depth is None else float(depth)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------- RULER
def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` contained in ``prediction`` (case-insensitive); RULER's niah/vt/cwe/fwe."""
    if not references:
        return 0.0
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is contained in ``prediction`` (case-insensitive); RULER's qa metric."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# ----------------------------------------------------------------------------------------- LongBench
def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_tokens(text: str) -> list[str]:
    """Normalised tokens; each CJK character is a token of its own."""
    return _TOKEN.findall(normalize_answer(text))


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: Sequence[str]) -> float:
    """Token F1 after LongBench's normalisation, maximum over references."""
    pred = _answer_tokens(prediction)
    return max((_f1(pred, _answer_tokens(r)) for r in references), default=0.0)


def _lcs(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 over lower-cased word tokens (CJK: characters), maximum over references."""
    pred = _WORD.findall(prediction.lower())

    def one(ref: str) -> float:
        tokens = _WORD.findall(ref.lower())
        lcs = _lcs(pred, tokens) if pred and tokens else 0
        if lcs == 0:
            return 0.0
        precision, recall = lcs / len(pred), lcs / len(tokens)
        return 2 * precision * recall / (precision + recall)

    return max((one(r) for r in references), default=0.0)


def classification(prediction: str, references: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """LongBench classification: the class names found in ``prediction`` share the credit.

    Names that are proper substrings of the reference are not counted against it.  Without
    ``all_classes`` this is 1.0 iff the reference occurs in the prediction.
    """

    def one(ref: str) -> float:
        if not all_classes:
            return float(ref in prediction)
        found = [c for c in all_classes if c in prediction]
        found = [c for c in found if c == ref or c not in ref]
        return 1.0 / len(found) if ref in found else 0.0

    return max((one(r) for r in references), default=0.0)


def _first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, references: Sequence[str]) -> float:
    """Edit similarity of the first code-like line: ``2 * LCS(chars) / (len(a) + len(b))``.

    This is the normalised insertion/deletion similarity that LongBench computes with
    ``fuzz.ratio`` (there rounded to whole percent), maximum over references.
    """
    line = _first_code_line(prediction)

    def one(ref: str) -> float:
        total = len(line) + len(ref)
        return 1.0 if total == 0 else 2 * _lcs(line, ref) / total

    return max((one(r) for r in references), default=0.0)


def count(prediction: str, references: Sequence[str]) -> float:
    """LongBench passage_count: share of the numbers in the prediction that equal the reference."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return max((sum(n == str(r).strip() for n in numbers) / len(numbers) for r in references), default=0.0)


def retrieval(prediction: str, references: Sequence[str]) -> float:
    """LongBench passage_retrieval: share of the numbers in the prediction that equal the paragraph id.

    The id is read from the reference, ``"Paragraph 12"`` (English) or ``"段落12"`` (Chinese).
    """
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0

    def one(ref: str) -> float:
        match = re.search(r"(?:Paragraph\s*|段落)(\d+)", ref)
        if match is None:
            return 0.0
        return sum(n == match.group(1) for n in numbers) / len(numbers)

    return max((one(r) for r in references), default=0.0)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "code_sim": code_sim,
    "count": count,
    "retrieval": retrieval,
}


def score(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` against ``sample.answers`` with ``sample.metric`` (a value in ``[0, 1]``).

    LongBench's few-shot datasets (trec, triviaqa, samsum, lsht) are scored on the first line of the
    prediction, as LongBench does; classification uses ``sample.all_classes``.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if sample.task.startswith("longbench/") and sample.task.split("/", 1)[1] in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if sample.metric == "classification":
        return classification(prediction, sample.answers, sample.all_classes)
    return float(METRICS[sample.metric](prediction, sample.answers))
