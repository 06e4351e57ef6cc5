"""The decoder building blocks under their former path; they live in `sdt.blocks.layers` (benchmarks/compute.py
still imports them from here)."""

from sdt.blocks.layers import MLP, Attention, Block, RMSNorm, RotaryEmbedding, apply_rope, attention_mask

__all__ = ["MLP", "Attention", "Block", "RMSNorm", "RotaryEmbedding", "apply_rope", "attention_mask"]
