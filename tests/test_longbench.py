"""Tests of the LongBench JSONL loader (tiny hand-written files in tmp_path, not benchmark data)."""

from __future__ import annotations

import json

import pytest

from clusterattn.eval.longbench import LONGBENCH_DATASETS, load_longbench
from clusterattn.eval.tasks import METRICS, score
from clusterattn.generation import build_prompt
from test_ruler import smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer(request):
    return smollm2_tokenizer(request.config)


def row(**overrides) -> dict:
    base = {
        "input": "What colour is the toy boat?",
        "context": "A made-up test document. The toy boat is red. It floats in the bath.",
        "answers": ["red"],
        "length": 14,
        "dataset": "qasper",
        "language": "en",
        "all_classes": None,
        "_id": "test-0",
    }
    base.update(overrides)
    return base


def write(path, rows) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return str(path)


def count_tokens(tokenizer, sample) -> int:
    head, tail = build_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix, True)
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (head, tail))


def test_dataset_table():
    assert len(LONGBENCH_DATASETS) == 21
    for name, spec in LONGBENCH_DATASETS.items():
        assert spec.metric in METRICS, name
        assert spec.context_template.count("{context}") == 1 and spec.context_template.endswith("{context}")
        assert "{context}" not in spec.question_template
        assert spec.max_new_tokens in (32, 64, 128, 512)
    assert LONGBENCH_DATASETS["gov_report"].max_new_tokens == 512
    assert LONGBENCH_DATASETS["passage_count"].metric == "count"
    assert LONGBENCH_DATASETS["lcc"].metric == "code_sim"
    assert LONGBENCH_DATASETS["trec"].metric == "classification"


def test_load_without_tokenizer(tmp_path):
    path = write(
        tmp_path / "data.jsonl", [row(), row(_id="test-1", input="Where does it float?", answers=["bath"])]
    )
    samples = load_longbench(path)
    assert [s.index for s in samples] == [0, 1]
    first = samples[0]
    assert first.task == "longbench/qasper"
    assert first.metric == "qa_f1" and first.max_new_tokens == 128
    assert first.context.startswith("You are given a scientific article and a question.")
    assert first.context.endswith("Article: " + row()["context"])
    assert first.question.startswith("Answer the question based on the above article")
    assert first.question.endswith("Question: What colour is the toy boat?\n\nAnswer:")
    assert "toy boat?" not in first.context
    assert (first.answers, first.answer_prefix, first.depth, first.n_tokens, first.length) == (
        ("red",),
        "",
        None,
        0,
        0,
    )
    assert score(first, "It is red.") == pytest.approx(0.5)  # [it, is, red] vs [red]: P = 1/3, R = 1
    assert load_longbench(path, limit=1) == samples[:1]


def test_dataset_from_argument_or_file_name(tmp_path):
    trec = row(
        input="Question: Who wrote it?\nType:", answers=["Human being"], all_classes=["Human being", "Entity"]
    )
    del trec["dataset"]
    path = write(tmp_path / "trec_e.jsonl", [trec])
    (sample,) = load_longbench(path)
    assert sample.task == "longbench/trec" and sample.metric == "classification"
    assert sample.all_classes == ("Human being", "Entity")
    assert sample.question == "Question: Who wrote it?\nType:"
    assert score(sample, "Human being\nEntity") == 1.0
    assert load_longbench(path, dataset="trec") == [sample]
    with pytest.raises(ValueError, match="'qasper' load"):
        load_longbench(write(tmp_path / "x.jsonl", [row(dataset="trec")]), dataset="qasper")


def test_unknown_dataset(tmp_path):
    path = write(tmp_path / "data.jsonl", [row(dataset="no_such_set")])
    with pytest.raises(ValueError, match="unknown LongBench dataset 'no_such_set'.*narrativeqa.*repobench-p"):
        load_longbench(path)
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        load_longbench(write(tmp_path / "ok.jsonl", [row()]), dataset="nope")


@pytest.mark.parametrize(
    "bad", ['{"input": "q", "context": ', '["a list"]', json.dumps({"input": "q", "answers": ["a"]})]
)
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = write(tmp_path / "broken.jsonl", [row(), "", bad])
    with pytest.raises(ValueError, match=r"broken\.jsonl:3"):
        load_longbench(path)


def test_bad_arguments(tmp_path):
    path = write(tmp_path / "data.jsonl", [row()])
    with pytest.raises(ValueError, match="tokenizer"):
        load_longbench(path, length=100)
    with pytest.raises(ValueError):
        load_longbench(path, limit=0)
    with pytest.raises(ValueError, match="must be lists"):
        load_longbench(write(tmp_path / "b.jsonl", [row(answers={"a": 1})]))


def test_middle_truncation_fits_length(tmp_path, tokenizer):
    words = [f"w{i:04d}" for i in range(3000)]
    long_doc = " ".join(words)
    path = write(tmp_path / "data.jsonl", [row(context=long_doc, dataset="gov_report"), row()])
    long_sample, short_sample = load_longbench(path, tokenizer=tokenizer, length=1024)
    assert long_sample.length == 1024
    assert 0.98 * 1024 <= long_sample.n_tokens == count_tokens(tokenizer, long_sample) <= 1024
    text = long_sample.context
    assert "w0000 w0001" in text and "w2998 w2999" in text  # both ends kept ...
    assert "w1500" not in text  # ... the middle removed
    assert long_sample.question == "Now, write a one-page summary of the report.\n\nSummary:"
    assert short_sample.context.endswith(row()["context"])  # short documents are left whole
    assert short_sample.n_tokens == count_tokens(tokenizer, short_sample) < 1024
    (untruncated,) = load_longbench(path, tokenizer=tokenizer, limit=1)
    assert untruncated.n_tokens == untruncated.length == count_tokens(tokenizer, untruncated) > 1024
    with pytest.raises(ValueError, match="too small"):
        load_longbench(path, tokenizer=tokenizer, length=20)
