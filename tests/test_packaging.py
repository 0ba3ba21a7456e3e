"""The library installs without the harness: importing it pulls no harness dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ("matplotlib", "gguf", "sklearn", "wonderwords", "long_context_eval")


def test_library_import_pulls_no_harness_dependency():
    code = (  # what transformers itself loads (5.2 imports scikit-learn when present) is not ours
        "import sys, torch, transformers\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache\n"
        "before = set(sys.modules)\n"
        "import clusterattn as ca\n"
        "ca.ClusterAttnPress(budget=64); ca.CompressedCache; ca.generate\n"
        f"print([m for m in {HARNESS!r} if m in sys.modules and m not in before])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_dependencies_are_only_what_the_presses_need():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert names == {"torch", "transformers", "numpy"}
    assert {"eval", "analysis", "vllm", "test"} <= set(project["optional-dependencies"])


def test_every_environment_that_loads_models_can_build_their_tokenizer():
    """``load_model`` builds the tokenizer of the running transformers version from the GGUF when
    the converted folder lacks it (a model converted in another environment): each environment that
    loads converted models (the kvpress worker's, transformers 5.2's, vLLM's) pins the same gguf."""
    pins = {}
    for env in ("", "-peers", "-tf52", "-vllm"):
        name = f"requirements{env}.txt"
        lines = (ROOT / name).read_text().splitlines()
        pins[name] = [line for line in lines if line.split("==")[0].strip().lower() == "gguf"]
    assert len({tuple(pin) for pin in pins.values()}) == 1 and len(pins["requirements.txt"]) == 1, pins


def test_the_eval_package_imports_one_way():
    """data -> run -> score -> report -> plots: no module of ``clusterattn.eval`` imports (even
    lazily, inside a function) one that imports it back."""
    import re

    folder = ROOT / "src" / "clusterattn" / "eval"
    edges = {
        path.stem: set(re.findall(r"from clusterattn\.eval\.(\w+) import", path.read_text()))
        for path in folder.glob("*.py")
    }

    def reaches(start, target, seen=()):
        return any(
            n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in edges.get(start, ())
        )

    cycles = sorted(module for module in edges if reaches(module, module))
    assert not cycles, cycles


def test_every_cli_option_says_what_it_takes():
    """Every option of every subcommand has help text; its default is printed with it."""
    import argparse
    import contextlib

    from clusterattn import cli

    parser = None

    def capture(self, *args, **kwargs):
        nonlocal parser
        parser = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.suppress(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = original
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if action.option_strings and action.dest != "help" and not action.help
    ]
    assert not missing, missing
    formatters = {name: sub.formatter_class for name, sub in subparsers.choices.items()}
    assert set(formatters.values()) == {argparse.ArgumentDefaultsHelpFormatter}, formatters


def test_every_module_imports():
    """No module refers to a name that moved (the vLLM hooks need vLLM: tests_vllm covers them)."""
    import importlib
    import pkgutil

    import clusterattn

    names = [m.name for m in pkgutil.walk_packages(clusterattn.__path__, "clusterattn.")]
    skipped = {"clusterattn.vllm.hooks"}
    for name in sorted(set(names) - skipped):
        importlib.import_module(name)
    assert "clusterattn.eval.figures" in names


def test_transformers_internals_live_in_one_module():
    """Only ``clusterattn.hf`` imports transformers' submodules or touches its internals (the
    attention registry, the attention implementation, lazily built cache layers, sdpa's GQA switch).
    Elsewhere: the Auto classes that load checkpoints (``models.py``), and the kvpress worker, which
    runs in the peers environment against kvpress's own transformers."""
    import ast
    import re

    package = ROOT / "src" / "clusterattn"
    allowed_top = {"AutoModelForCausalLM", "AutoTokenizer", "PreTrainedModel", "PreTrainedTokenizerBase"}
    internals = re.compile(
        r"\b_attn_implementation\b|\.lazy_initialization\(|layer_class_to_replicate|use_gqa_in_sdpa"
        r"|AttentionInterface|ALL_ATTENTION_FUNCTIONS|ALL_MASK_ATTENTION_FUNCTIONS"
    )
    offenders = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if name in ("hf.py", "eval/peer_worker.py"):
            continue
        text = path.read_text()
        offenders += [f"{name}: {m.group(0)}" for m in internals.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                offenders += [
                    f"{name}: import {a.name}" for a in node.names if a.name.startswith("transformers")
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                names = {a.name for a in node.names}
                if node.module != "transformers" or not names <= allowed_top:
                    offenders.append(f"{name}: from {node.module} import {sorted(names)}")
    assert offenders == []
