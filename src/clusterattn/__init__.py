"""clusterattn: ClusterAttn prompt-KV compression for Hugging Face causal LMs, with its baselines."""

from clusterattn.cache import CompressedCache, CompressionStats
from clusterattn.chunked import prefill_chunks
from clusterattn.dbac import dbac, topk_indices
from clusterattn.generation import GenerationOutput, generate, generate_many
from clusterattn.models import load_model
from clusterattn.presses import (
    PRESSES,
    BasePress,
    ChunkKVPress,
    ClusterAttnPress,
    DecodingPress,
    FullKV,
    H2OPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
)
from clusterattn.scoring import accumulated_scores, key_leverage_scores, window_scores
from clusterattn.static_cache import CompressedStaticCache

__version__ = "0.1.0"


__all__ = [
    "PRESSES",
    "BasePress",
    "ChunkKVPress",
    "ClusterAttnPress",
    "CompressedCache",
    "CompressedStaticCache",
    "CompressionStats",
    "DecodingPress",
    "FullKV",
    "GenerationOutput",
    "H2OPress",
    "PyramidKVPress",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "accumulated_scores",
    "dbac",
    "generate",
    "generate_many",
    "key_leverage_scores",
    "load_model",
    "prefill_chunks",
    "topk_indices",
    "window_scores",
]
