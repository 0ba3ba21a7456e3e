"""Loader for LongBench-format JSONL files (LongBench v1 and LongBench-E), for users who bring the data.

Each line holds ``input`` (the question, may be empty), ``context`` (the long document),
``answers`` (references), ``length``, ``dataset``, ``language``, ``all_classes`` (classification
labels or null) and ``_id``.  Each dataset's LongBench prompt is split into a context template
(instruction + document, compressed in both settings) and a question template (what follows
the document), so the query-agnostic setting compresses the document alone.  With a tokenizer and
a ``length``, the document is cut in the middle, as LongBench truncates its prompts, until the
prompt built by ``clusterattn.generation.build_prompt`` fits ``length`` tokens.  No LongBench
data ships with this package (none is available offline).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterattn.eval.tasks import Sample

__all__ = ["LONGBENCH_DATASETS", "LongBenchDataset", "load_longbench"]


@dataclass(frozen=True)
class LongBenchDataset:
    """LongBench's prompt for one dataset, split at the document, with its metric and output budget."""

    context_template: str  # contains {context}
    question_template: str  # may contain {input}; joined to the context with a blank line
    metric: str  # a key of clusterattn.eval.tasks.METRICS
    max_new_tokens: int  # LongBench's dataset2maxlen


_QA_EN = (
    "Answer the question based on the given passages. "
    "Only give me the answer and do not output any other words."
)
_MULTIDOC = LongBenchDataset(
    f"{_QA_EN}\n\nThe following are given passages.\n{{context}}",
    f"{_QA_EN}\n\nQuestion: {{input}}\nAnswer:",
    "qa_f1",
    32,
)
_NARRATIVE = (  # "asconcisely" is LongBench's spelling
    "Answer the question asconcisely as you can, using a single phrase if possible. "
    "Do not provide any explanation."
)
_QASPER = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
    'answered based on the information in the article, write "unanswerable". If the question is a yes/no '
    'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)

LONGBENCH_DATASETS: dict[str, LongBenchDataset] = {
    "narrativeqa": LongBenchDataset(
        "You are given a story, which can be either a novel or a movie script, and a question. "
        f"{_NARRATIVE}\n\nStory: {{context}}",
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        "qa_f1",
        128,
    ),
    "qasper": LongBenchDataset(
        "You are given a scientific article and a question. "
        f"Answer the question {_QASPER}\n\nArticle: {{context}}",
        f"Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}\n\nAnswer:",
        "qa_f1",
        128,
    ),
    "multifieldqa_en": LongBenchDataset(
        "Read the following text and answer briefly.\n\n{context}",
        "Now, answer the following question based on the above text, only give me the answer and do not "
        "output any other words.\n\nQuestion: {input}\nAnswer:",
        "qa_f1",
        64,
    ),
    "multifieldqa_zh": LongBenchDataset(
        "阅读以下文字并用中文简短回答：\n\n{context}",
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
        "qa_f1",
        64,
    ),
    "hotpotqa": _MULTIDOC,
    "2wikimqa": _MULTIDOC,
    "musique": _MULTIDOC,
    "dureader": LongBenchDataset(
        "请基于给定的文章回答下述问题。\n\n文章：{context}",
        "请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        "rouge_l",
        128,
    ),
    "gov_report": LongBenchDataset(
        "You are given a report by a government agency. "
        "Write a one-page summary of the report.\n\nReport:\n{context}",
        "Now, write a one-page summary of the report.\n\nSummary:",
        "rouge_l",
        512,
    ),
    "qmsum": LongBenchDataset(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}",
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:",
        "rouge_l",
        512,
    ),
    "multi_news": LongBenchDataset(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}",
        "Now, write a one-page summary of all the news.\n\nSummary:",
        "rouge_l",
        512,
    ),
    "vcsum": LongBenchDataset(
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}",
        "会议总结：",
        "rouge_l",
        512,
    ),
    "trec": LongBenchDataset(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}",
        "{input}",
        "classification",
        64,
    ),
    "triviaqa": LongBenchDataset(
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}",
        "{input}",
        "qa_f1",
        32,
    ),
    "samsum": LongBenchDataset(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}",
        "{input}",
        "rouge_l",
        128,
    ),
    "lsht": LongBenchDataset(
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}", "{input}", "classification", 64
    ),
    "passage_count": LongBenchDataset(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}",
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        "count",
        32,
    ),
    "passage_retrieval_en": LongBenchDataset(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}",
        "The following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the "
        'abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.'
        "\n\nThe answer is: ",
        "retrieval",
        32,
    ),
    "passage_retrieval_zh": LongBenchDataset(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}",
        '下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        "retrieval",
        32,
    ),
    "lcc": LongBenchDataset(
        "Please complete the code given below. \n{context}", "Next line of code:\n", "code_sim", 64
    ),
    "repobench-p": LongBenchDataset(
        "Please complete the code given below. \n{context}", "{input}Next line of code:\n", "code_sim", 64
    ),
}
_FIELDS = ("input", "context", "answers")


def _dataset_name(name: str, where: str) -> str:
    """Canonical dataset name (LongBench-E's ``*_e`` suffix removed); ValueError if unknown."""
    base = name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH_DATASETS else name
    if base not in LONGBENCH_DATASETS:
        raise ValueError(
            f"{where}: unknown LongBench dataset {name!r}; known: {', '.join(LONGBENCH_DATASETS)}"
        )
    return base


def _truncate_middle(tokenizer: Any, text: str, n_remove: int) -> str:
    """Remove about ``n_remove`` tokens from the middle of ``text`` (LongBench keeps both ends).

    Cuts the original string at token boundaries found from the offset mapping (fast tokenizers),
    so the kept text is verbatim; otherwise decodes the kept token ids, like LongBench.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if offsets is None else enc["input_ids"]
    keep = max(len(ids) - n_remove, 0)
    half, rest = keep // 2, keep - keep // 2
    if offsets is not None and len(offsets) == len(ids):
        head = text[: offsets[half - 1][1]] if half else ""
        tail = text[offsets[len(ids) - rest][0] :] if rest else ""
        return head + tail
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    return head + (tokenizer.decode(ids[len(ids) - rest :], skip_special_tokens=True) if rest else "")


def _fit(tokenizer: Any, spec: LongBenchDataset, document: str, question: str, length: int, chat: bool):
    """``(context, n_tokens)`` with the document middle-truncated so the prompt fits ``length``."""
    from clusterattn.generation import build_prompt

    def measure(doc: str) -> tuple[str, int]:
        context = spec.context_template.format(context=doc)
        head, tail = build_prompt(tokenizer, context, question, "", chat)
        enc = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        return context, enc(head) + enc(tail)

    context, n_tokens = measure(document)
    if length is None or n_tokens <= length:
        return context, n_tokens
    removed = n_tokens - length
    for _ in range(50):
        context, n_tokens = measure(_truncate_middle(tokenizer, document, removed))
        if n_tokens <= length:
            return context, n_tokens
        removed += n_tokens - length
    raise ValueError(
        f"length={length} is too small for this LongBench prompt ({n_tokens} tokens without text)"
    )


def load_longbench(
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    length: int | None = None,
    limit: int | None = None,
    dataset: str | None = None,
    chat: bool = True,
) -> list[Sample]:
    """Read a LongBench JSONL file into :class:`Sample` objects (``task = "longbench/<dataset>"``).

    Args:
        path: the ``.jsonl`` file.
        tokenizer: measures ``n_tokens`` (head + tail of ``build_prompt``); without one, ``n_tokens``
            is 0.
        length: with a tokenizer, cut each document in the middle so the prompt fits this many
            tokens; ``Sample.length`` is ``length``, or ``n_tokens`` when not given.
        limit: read at most this many samples.
        dataset: the dataset name; default each line's ``dataset`` field, else the file name
            (``qasper.jsonl``, ``qasper_e.jsonl``).  Lines naming another dataset are an error.
        chat: count tokens with the chat template, as the runner builds the prompt.

    Raises:
        ValueError: unknown dataset (the message lists the known ones), a malformed line (the
            message names the file and line), ``length`` without a tokenizer, or bad ``limit``.
    """
    path = Path(path)
    if length is not None and tokenizer is None:
        raise ValueError("length needs a tokenizer to measure prompts")
    for name, value in (("length", length), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    fallback = dataset or re.sub(r"\.jsonl$", "", path.name)
    forced = _dataset_name(dataset, str(path)) if dataset is not None else None
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or any(k not in row for k in _FIELDS):
                raise ValueError(f"{where}: a LongBench line needs the fields {', '.join(_FIELDS)}")
            answers, classes = row["answers"], row.get("all_classes") or []
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not isinstance(classes, list):
                raise ValueError(f"{where}: 'answers' and 'all_classes' must be lists")
            if not isinstance(row["context"], str) or not isinstance(row["input"] or "", str):
                raise ValueError(f"{where}: 'context' and 'input' must be strings")
            name = _dataset_name(row.get("dataset") or fallback, where)
            if forced is not None and name != forced:
                raise ValueError(f"{where}: line of dataset {name!r} in a {forced!r} load")
            spec = LONGBENCH_DATASETS[name]
            question = spec.question_template.format(input=row["input"] or "").lstrip("\n")
            document = row["context"] if row["context"].strip() else " "
            if tokenizer is None:
                context, n_tokens = spec.context_template.format(context=document), 0
            else:
                context, n_tokens = _fit(tokenizer, spec, document, question, length, chat)
            samples.append(
                Sample(
                    task=f"longbench/{name}",
                    length=length if length is not None else n_tokens,
                    index=len(samples),
                    context=context,
                    question=question,
                    answer_prefix="",
                    answers=tuple(str(a) for a in answers),
                    metric=spec.metric,
                    max_new_tokens=spec.max_new_tokens,
                    n_tokens=n_tokens,
                    all_classes=tuple(str(c) for c in classes),
                )
            )
    return samples
