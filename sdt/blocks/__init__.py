"""Building blocks of a Llama / Qwen2 decoder: RMSNorm, rotary embeddings, attention, SwiGLU MLP, the pre-norm block
and the key/value cache. The leaf of the package: it imports nothing else of `sdt` (see docs/architecture.md)."""

from sdt.blocks.kv_cache import KVCache, ModelCache
from sdt.blocks.layers import MLP, Attention, Block, BlockConfig, RMSNorm, RotaryEmbedding, apply_rope, attention_mask

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "BlockConfig",
    "KVCache",
    "ModelCache",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "attention_mask",
]
