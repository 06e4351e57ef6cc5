"""Backbone pieces of the Llama / Qwen2 decoder block: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Every block call takes the absolute position of each token, not just its index in the tensor: routed layers run a
block on a gathered subset of tokens, and those tokens must keep their original RoPE phases and causal order.
Parameter names follow Hugging Face's Llama/Qwen2 modules (q_proj, gate_proj, ...) so checkpoints map by name.

Routed exports ship this file and `kv_cache.py` next to their config.json (`sdt/transformers_code/`), so both
import only torch, the standard library and each other.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import KVCache


class BlockConfig(Protocol):
    """The fields a decoder block reads from its config (`sdt.models.ModelConfig` has them all)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    rms_norm_eps: float
    dropout: float


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF does) so bf16 runs match fp32 statistics.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, looked up by absolute position (HF `rotate_half` layout)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S_max, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (S_max, hd)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, hd), ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))


def attention_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor) -> Tensor:
    """Boolean mask (B, 1, Tq, S): a query attends to valid keys at positions up to its own.

    Built from absolute positions, so it is right for cached decoding, gathered subsets of tokens and left padding.
    A query with no admissible key (a padding slot) is allowed to attend everywhere: its output is finite and unused.
    """
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # (B, Tq, S)
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RotaryEmbedding,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        kv_input: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """x (B, T, D) at `positions` (B, T). `kv_input` = (x_kv (B, S, D), positions (B, S), pad (B, S) or None):
        keys and values come from these tokens instead of x (a routed block's full-context option)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        kv_x, kv_pos, kv_pad = (x, positions, pad_mask) if kv_input is None else kv_input
        S = kv_x.shape[1]
        k = self.k_proj(kv_x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, S, hd)
        v = self.v_proj(kv_x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, S, hd)
        cos_sin = rope(positions)
        q = apply_rope(q, *cos_sin)
        k = apply_rope(k, *(cos_sin if kv_input is None else rope(kv_pos)))  # one table lookup for self-attention
        gqa = self.n_kv_heads != self.n_heads
        if cache is None and pad_mask is None and kv_input is None:
            # Training fast path: tokens are in causal order (routed subsets are sorted by position), so the plain
            # causal mask over the tensor index equals the mask over positions.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            valid = torch.ones_like(kv_pos, dtype=torch.bool) if kv_pad is None else kv_pad.bool()
            if cache is not None:
                k, v, k_pos, k_valid = cache.append(k, v, kv_pos, valid)
            else:
                k_pos, k_valid = kv_pos, valid
            mask = attention_mask(positions, k_pos, k_valid)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h)).

    Its two residual sub-layers are callable on their own with the block's call shape (`attention_sublayer`,
    `mlp_sublayer`), so a routed layer can run either one on a subset of tokens as it runs the whole block.
    """

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RotaryEmbedding,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        context: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """`context` = (x (B, S, D), positions (B, S), pad (B, S) or None): attend to these tokens' keys and values
        (normalised by this block) instead of x's own; used by routed blocks with full-context attention."""
        h = self.attention_sublayer(x, positions, rope, cache=cache, pad_mask=pad_mask, context=context)
        return self.mlp_sublayer(h)

    def attention_sublayer(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RotaryEmbedding,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        context: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """h = x + Attn(RMSNorm(x)), arguments as for `forward`."""
        kv_input = None
        if context is not None:
            kv_input = (self.input_layernorm(context[0]), context[1], context[2])
        a = self.self_attn(self.input_layernorm(x), positions, rope, cache=cache, pad_mask=pad_mask, kv_input=kv_input)
        return x + self.dropout(a)

    def mlp_sublayer(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        rope: RotaryEmbedding | None = None,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        context: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """y = x + MLP(RMSNorm(x)). Token by token: the other arguments of the block's call shape are accepted and
        unused (the MLP reads no other token and keeps no cache)."""
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
