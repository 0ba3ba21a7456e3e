"""What one ``clusterattn bench`` case is, and the measuring helpers its runs share: the case
itself, the press it builds, the prompt it feeds, process memory (RSS and its peak) and device
memory, and the KV cache's peak during a prefill."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from clusterattn.chunked import check_chunk
from clusterattn.compiled import BACKENDS
from clusterattn.hf import find_cache, kv_bytes
from clusterattn.integration import attention_modules
from clusterattn.presses import PRESSES, DecodingPress
from clusterattn.steps import Inputs


@dataclass
class Case:
    """One measured configuration."""

    model: str = "smollm2-135m"
    length: int = 4096
    press: str = "full"
    budget: int | None = None
    batch: int = 1
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    prefill_chunk: int | None = None  # tokens per layer call of the prefill; None: one pass
    compile: str | None = None  # decode from a static cache with the step compiled by this backend
    decode_budget: int | None = None  # DecodingPress(press, decode_budget, interval); None: prompt only
    interval: int = 128

    def __post_init__(self) -> None:
        if self.length < 2 or self.batch < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError(f"bench case needs length, new_tokens >= 2 and batch, repeats >= 1: {self}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype name (float32, bfloat16, ...)")
        check_chunk(self.prefill_chunk)
        if self.compile is not None and self.compile not in BACKENDS:
            raise ValueError(f"compile must be None or one of {BACKENDS}, got {self.compile!r}")
        if self.decode_budget is not None and self.compile is not None:
            raise ValueError("decode_budget needs the eager decode path (a static cache cannot shrink)")
        make_press(self.press, self.budget, self.decode_budget, self.interval)  # bad values fail here


def make_press(name: str, budget: int | None, decode_budget: int | None = None, interval: int = 128):
    """The press ``name`` at ``budget`` (None for ``full``), wrapped in a
    :class:`~clusterattn.presses.decoding.DecodingPress` when ``decode_budget`` is given."""
    if name not in PRESSES:
        raise ValueError(f"press {name!r} unknown; choose from {sorted(PRESSES)}")
    if name == "full":
        if decode_budget is not None:
            raise ValueError("the full cache has no rule to compress while decoding; pick a press")
        return None
    if budget is None:
        raise ValueError(f"press {name!r} needs a budget")
    press = PRESSES[name](budget=budget)
    return press if decode_budget is None else DecodingPress(press, decode_budget, interval)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


@lru_cache(maxsize=4)
def _essay_ids(tokenizer, length: int) -> tuple[int, ...]:
    from clusterattn.eval.niah import load_essays

    text = load_essays()[: length * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"length {length} exceeds the essay text")
    return tuple(ids[:length])


def prompt_inputs(tokenizer, length: int, batch: int, device, ids: torch.Tensor | None = None) -> Inputs:
    """A batch of ``batch`` identical prompts of exactly ``length`` tokens: the first ``length`` of
    ``ids`` (1-D token ids) when given, else of the essay haystack in ``tokenizer``'s tokens."""
    if ids is None:
        row = torch.tensor([_essay_ids(tokenizer, length)], device=device)
    elif ids.ndim != 1 or ids.shape[0] < length:
        raise ValueError(f"ids: need a 1-D tensor of >= {length} token ids, got shape {tuple(ids.shape)}")
    else:
        row = ids[None, :length].to(device=device, dtype=torch.long)
    ids = row.repeat(batch, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Inputs(ids, torch.ones_like(ids), None, True, pad)


class CachePeak:
    """Largest KV-cache size seen during prefill, sampled as each attention layer finishes (before
    a press swaps that layer's compressed selection in, so the transient full layer counts)."""

    def __init__(self, model) -> None:
        self.peak = 0
        self.handles = [
            m.register_forward_hook(self._hook, with_kwargs=True) for m in attention_modules(model).values()
        ]

    def _hook(self, module, args, kwargs, output):
        cache = find_cache(args, kwargs)
        if cache is not None:
            self.peak = max(self.peak, kv_bytes(cache))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _load(case: Case):
    """``case.model`` and its tokenizer on ``case.device`` in ``case.dtype``, with ``case.threads``."""
    import clusterattn as ca

    torch.set_num_threads(case.threads)
    return ca.load_model(case.model, device=case.device, dtype=getattr(torch, case.dtype))


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_allocated(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
