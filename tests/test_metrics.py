"""Unit tests of the sample type and the metrics (hand-computed values)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from clusterattn.eval.tasks import (
    METRICS,
    Sample,
    classification,
    code_sim,
    count,
    normalize_answer,
    qa_f1,
    retrieval,
    rouge_l,
    score,
    string_match_all,
    string_match_part,
)


def make_sample(**overrides) -> Sample:
    fields = dict(
        task="niah_single_2",
        length=1024,
        index=3,
        context="Some text. One of the special magic numbers for a-b is: 1234567.",
        question="What is the special magic number for a-b mentioned in the provided text?",
        answer_prefix="The special magic number for a-b mentioned in the provided text is",
        answers=("1234567",),
        metric="string_match_all",
        max_new_tokens=128,
        n_tokens=1020,
        depth=0.5,
        seed=7,
    )
    fields.update(overrides)
    return Sample(**fields)


def test_metric_names():
    assert set(METRICS) == {
        "string_match_all",
        "string_match_part",
        "qa_f1",
        "rouge_l",
        "classification",
        "code_sim",
        "count",
        "retrieval",
    }


def test_string_match_all_and_part():
    pred = "The numbers are 123 and 456."
    assert string_match_all(pred, ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABCDE and fghij", ["abcde", "FGHIJ"]) == 1.0
    assert string_match_all("nothing", ["x1"]) == 0.0
    assert string_match_part(pred, ["789", "456"]) == 1.0
    assert string_match_part("The Rumford Medal", ["rumford medal"]) == 1.0
    assert string_match_part(pred, ["789"]) == 0.0


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"


def test_qa_f1_hand_values():
    # pred tokens [cat, sat], reference [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert qa_f1("The cat sat.", ["a cat sat down"]) == pytest.approx(0.8)
    assert qa_f1("The cat sat.", ["dog", "cat sat"]) == 1.0  # maximum over references
    assert qa_f1("dog", ["cat"]) == 0.0
    assert qa_f1("", ["cat"]) == 0.0
    # repeated tokens count once per occurrence: pred [a1, a1], ref [a1]: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1("a1 a1", ["a1"]) == pytest.approx(2 / 3)
    # Chinese: one token per character: [北, 京] vs [北, 京, 市] -> 0.8
    assert qa_f1("北京", ["北京市"]) == pytest.approx(0.8)


def test_rouge_l_hand_values():
    # LCS = 6 ("the cat was under the bed"), P = 6/7, R = 6/6 -> F = 12/13
    assert rouge_l("the cat was found under the bed", ["the cat was under the bed"]) == pytest.approx(12 / 13)
    assert rouge_l("The Cat.", ["the cat"]) == 1.0
    assert rouge_l("x y", ["a b", "y"]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert rouge_l("", ["a"]) == 0.0


def test_classification_hand_values():
    classes = ["Location", "Entity", "Human", "Human being"]
    assert classification("Location", ["Location"], classes) == 1.0
    assert classification("Location or Entity", ["Location"], classes) == 0.5
    assert classification("Entity", ["Location"], classes) == 0.0
    # "Human" is a proper substring of the reference "Human being": it does not share the credit
    assert classification("Human being", ["Human being"], classes) == 1.0
    assert classification("it is Location", ["Location"]) == 1.0  # without classes: containment


def test_code_sim_hand_values():
    pred = "```python\n# a comment\nx = foo(1)\nmore"
    # first code-like line "x = foo(1)" vs "x = foo(2)": LCS 9 of 10 + 10 chars -> 18/20
    assert code_sim(pred, ["x = foo(2)"]) == pytest.approx(0.9)
    assert code_sim("\n\nreturn a", ["return a"]) == 1.0
    assert code_sim("// only comments", ["x"]) == 0.0
    assert code_sim("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)


def test_count_and_retrieval_hand_values():
    assert count("There are 3 unique paragraphs, not 4.", ["3"]) == 0.5
    assert count("3", [3]) == 1.0  # LongBench stores counts as ints
    assert count("no number", ["3"]) == 0.0
    assert retrieval("Paragraph 12", ["Paragraph 12"]) == 1.0
    assert retrieval("Paragraph 12 or Paragraph 3", ["Paragraph 12"]) == 0.5
    assert retrieval("答案是段落5", ["段落5"]) == 1.0
    assert retrieval("Paragraph 2", ["Paragraph 12"]) == 0.0
    assert retrieval("none", ["Paragraph 1"]) == 0.0


def test_scores_stay_in_unit_interval():
    preds = ["", "a", "The cat 12 Paragraph 3", "x = 1\n# y", "北京 Location"]
    refs = ["cat", "Paragraph 3", "x = 2", "Location", "3"]
    for name, fn in METRICS.items():
        for pred in preds:
            value = fn(pred, refs)
            assert 0.0 <= value <= 1.0, (name, pred, value)


def test_score_dispatch():
    sample = make_sample()
    assert score(sample, " 1234567.") == 1.0
    assert score(sample, "7654321") == 0.0
    trec = make_sample(
        task="longbench/trec",
        answers=("Location",),
        metric="classification",
        all_classes=("Location", "Entity"),
        depth=None,
    )
    assert score(trec, "Location\nEntity") == 1.0  # few-shot datasets: first line only
    assert score(trec, "Location or Entity") == 0.5
    qa = make_sample(task="longbench/qasper", answers=("cat sat",), metric="qa_f1", depth=None)
    assert score(qa, "cat sat\nand more") == pytest.approx(2 / 3)  # not a first-line dataset
    with pytest.raises(TypeError):
        score(sample, None)  # type: ignore[arg-type]


def test_sample_json_round_trip_and_validation():
    sample = make_sample(answers=["1234567", "7654321"])
    assert sample.answers == ("1234567", "7654321")
    d = json.loads(json.dumps(sample.to_dict()))
    assert Sample.from_dict(d) == sample
    assert Sample.from_dict({k: v for k, v in d.items() if k not in ("depth", "seed", "all_classes")}) == (
        dataclasses.replace(sample, depth=None, seed=0)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.task = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown metric"):
        make_sample(metric="bleu")
    with pytest.raises(TypeError):
        make_sample(answers="1234567")
    for bad in ({**d, "extra": 1}, {k: v for k, v in d.items() if k != "context"}, {**d, "length": "1"}):
        with pytest.raises(ValueError):
            Sample.from_dict(bad)
    with pytest.raises(ValueError):
        Sample.from_dict({**d, "answers": [1]})
    with pytest.raises(ValueError):
        Sample.from_dict([1, 2])  # type: ignore[arg-type]
