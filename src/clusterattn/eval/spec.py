"""Press specifications on the command line: ``name[:key=value,...]`` and ``kvpress:name[:...]``.

``clusterattn:num_block=16,span_width=8`` is our :class:`~clusterattn.ClusterAttnPress` with those
fields; ``kvpress:snapkv:window_size=32`` is kvpress's ``SnapKVPress`` run in the peers environment
(see :mod:`clusterattn.eval.peer_worker`). Budgets come from the run, not from the spec: an int is
a token budget per KV head, a float in (0, 1) a compression ratio (the share dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterattn.presses import PRESSES
from clusterattn.presses.spec import build_press, parse_fields, parse_value

# kvpress 0.5.5 presses the peers environment runs: name -> (kvpress class, wrapped press or None).
# A wrapper alone wraps SnapKV; ``wrapper_inner`` names another inner press (kvpress's own pairings).
# How each is driven (replayed hook, own prefill, question window) is in eval.peer_presses.
PEER_PRESSES = {
    "snapkv": ("SnapKVPress", None),
    "streamingllm": ("StreamingLLMPress", None),
    "knorm": ("KnormPress", None),
    "tova": ("TOVAPress", None),
    "expectedattention": ("ExpectedAttentionPress", None),
    "pyramidkv": ("PyramidKVPress", None),
    "keydiff": ("KeyDiffPress", None),
    "lagkv": ("LagKVPress", None),
    "cur": ("CURPress", None),
    "compactor": ("CompactorPress", None),
    "leveragescore": ("LeverageScorePress", None),
    "noncausalattn": ("NonCausalAttnPress", None),
    "cap": ("CapPress", None),
    "random": ("RandomPress", None),
    "observedattention": ("ObservedAttentionPress", None),
    "finch": ("FinchPress", None),
    "duoattention_onthefly": ("DuoAttentionPress", None),
    "kvzip": ("KVzipPress", None),
    "kvgrad": ("KVgradPress", None),
    "kvcompose": ("KVComposePress", None),
    "chunkkv": ("ChunkKVPress", "SnapKVPress"),
    "entropygatedchunkkv": ("EntropyGatedChunkKVPress", "SnapKVPress"),
    "chunk": ("ChunkPress", "SnapKVPress"),
    "block_keydiff": ("BlockPress", "KeyDiffPress"),
    "keyrerotation": ("KeyRerotationPress", "SnapKVPress"),
    "merging": ("MergingPress", "SnapKVPress"),
    "adakv": ("AdaKVPress", "SnapKVPress"),
    "adakv_expectedattention": ("AdaKVPress", "ExpectedAttentionPress"),
    "criticalkv": ("CriticalKVPress", "SnapKVPress"),
    "criticalkv_expectedattention": ("CriticalKVPress", "ExpectedAttentionPress"),
    "criticaladakv": ("CriticalAdaKVPress", "SnapKVPress"),
    "criticaladakv_expectedattention": ("CriticalAdaKVPress", "ExpectedAttentionPress"),
}
# kvpress 0.5.5 presses that do not run here, with the reason (README.md lists them too).
PEER_REFUSED = {
    "duoattention": "its head patterns are downloaded from the DuoAttention repository for six checkpoints; "
    "duoattention_onthefly estimates them instead",
    "qfilter": "needs Q-filters trained per model, downloaded from the Hugging Face Hub",
    "expectedattentionstats": "needs query statistics downloaded from the Hugging Face Hub",
    "kvzap": "needs trained KVzap scorer weights downloaded from the Hugging Face Hub",
    "fastkvzip": "needs trained Fast-KVzip gate weights downloaded from the Hugging Face Hub",
    "restorekv": "needs learned restoration embeddings downloaded from the Hugging Face Hub",
    "lukv": "needs per-model budget curves downloaded from the LU-KV repository",
    "think": "prunes key channels, not tokens: no token budget maps onto it",
    "simlayerkv": "keeps a share set by lazy_threshold and the prompt, not a budget",
    "dms": "evicts below a score threshold, not to a budget",
    "perlayercompression": "takes one ratio per layer and needs flash attention (kvpress: experimental)",
    "composed": "takes a list of presses, which name:key=value cannot express",
    "decoding": "compresses while decoding; the worker compresses the prefill",
    "prefilldecoding": "compresses while decoding; the worker compresses the prefill",
    "compressionratiodecoding": "compresses while decoding; the worker compresses the prefill",
    "cam": "compresses while decoding; the worker compresses the prefill",
}
PEER_SOURCES = ("kvpress",)


@dataclass(frozen=True)
class PressSpec:
    """A parsed press specification; ``label`` is its canonical text (the ``press`` column)."""

    name: str
    params: dict = field(default_factory=dict)
    source: str = "clusterattn"  # or "kvpress"

    @property
    def label(self) -> str:
        head = self.name if self.source == "clusterattn" else f"{self.source}:{self.name}"
        if not self.params:
            return head
        return head + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def is_full(self) -> bool:
        return self.source == "clusterattn" and self.name == "full"

    @property
    def is_peer(self) -> bool:
        return self.source != "clusterattn"

    def build(self, budget: int | float | None):
        """Our press object for ``budget`` (None for the full cache); peers are built by the worker."""
        if self.is_peer:
            raise ValueError(f"{self.label} runs in the peers environment, not in this process")
        if self.is_full:
            return None
        kind = "compression_ratio" if isinstance(budget, float) else "budget"
        return build_press(self.name, {kind: budget, **self.params}, self.label)


def parse_press(text: str) -> PressSpec:
    """Parse ``name[:k=v,...]`` or ``kvpress:name[:k=v,...]``; raises ValueError on anything unknown."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty press specification")
    parts = text.strip().split(":")
    source = "clusterattn"
    if parts[0] in PEER_SOURCES:
        source, parts = parts[0], parts[1:]
    if not parts or len(parts) > 2 or not parts[0]:
        raise ValueError(f"press {text!r}: expected name[:key=value,...] or kvpress:name[:key=value,...]")
    name = parts[0].lower()
    if source != "clusterattn" and name in PEER_REFUSED:
        raise ValueError(f"press {text!r}: kvpress {name} does not run here: {PEER_REFUSED[name]}")
    known = PEER_PRESSES if source != "clusterattn" else PRESSES
    if name not in known:
        raise ValueError(f"press {text!r}: unknown {source} press {name!r}; choose from {sorted(known)}")
    params = parse_fields(parts[1], text) if len(parts) == 2 else {}
    for reserved in ("budget", "compression_ratio"):
        if reserved in params:
            raise ValueError(f"press {text!r}: set {reserved} with --budgets, not in the press specification")
    return PressSpec(name=name, params=params, source=source)


def parse_budget(text: str | int | float) -> int | float:
    """``"128"`` -> 128 tokens; ``"0.5"`` -> compression ratio 0.5 (drop half)."""
    value = parse_value(str(text)) if isinstance(text, str) else text
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"budget {text!r} is neither a token count nor a ratio")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"token budget must be >= 1, got {value}")
        return value
    if not 0.0 < value < 1.0:
        raise ValueError(f"compression ratio must be in (0, 1), got {value}")
    return value


def budget_label(budget: int | float | None) -> str:
    """The ``budget`` column: ``"full"``, a token count, or ``"r0.5"`` for a compression ratio."""
    if budget is None:
        return "full"
    return f"r{budget:g}" if isinstance(budget, float) else str(budget)


def validate(specs: list[PressSpec], budgets: list[int | float]) -> None:
    """Build every (press, budget) once so that a bad parameter fails before any model loads."""
    for spec in specs:
        if spec.is_peer:
            continue
        for budget in budgets or [None]:
            spec.build(None if spec.is_full else budget)
