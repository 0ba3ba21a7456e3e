"""Presses: one method per module, each a small validated dataclass."""

from clusterattn.presses.base import BasePress, WindowPress
from clusterattn.presses.chunkkv import ChunkKVPress
from clusterattn.presses.clusterattn import ClusterAttnPress
from clusterattn.presses.decoding import DecodingPress
from clusterattn.presses.full import FullKV
from clusterattn.presses.h2o import H2OPress
from clusterattn.presses.pyramidkv import PyramidKVPress
from clusterattn.presses.random import RandomPress
from clusterattn.presses.snapkv import SnapKVPress
from clusterattn.presses.streaming_llm import StreamingLLMPress

PRESSES = {
    "full": FullKV,
    "clusterattn": ClusterAttnPress,
    "snapkv": SnapKVPress,
    "chunkkv": ChunkKVPress,
    "streamingllm": StreamingLLMPress,
    "h2o": H2OPress,
    "pyramidkv": PyramidKVPress,
    "random": RandomPress,
}

__all__ = [
    "PRESSES",
    "BasePress",
    "WindowPress",
    "FullKV",
    "ClusterAttnPress",
    "DecodingPress",
    "SnapKVPress",
    "ChunkKVPress",
    "StreamingLLMPress",
    "H2OPress",
    "PyramidKVPress",
    "RandomPress",
]
