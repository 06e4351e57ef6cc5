"""The backbone and routed execution of the exported `sdt` models: RMSNorm, RoPE, attention, SwiGLU, the decoder
block, the KV caches, and running a block on a subset of tokens. Shipped beside `modeling_sdt.py` in every routed
export; like it, imports only torch and transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, hd), computed in float64 as sdt's precomputed tables are."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    freqs = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().unsqueeze(1), emb.sin().float().unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def attention_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor) -> Tensor:
    """(B, 1, Tq, S): valid keys at positions up to the query's; a query with no admissible key sees all."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask.unsqueeze(1)


class KVCache:
    """Keys/values of one attention call site with each entry's absolute position and validity."""

    def __init__(self) -> None:
        self.k = self.v = self.pos = self.valid = None

    def append(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.k is None:
            self.k, self.v, self.pos, self.valid = k, v, pos, valid
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.pos = torch.cat([self.pos, pos], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.k, self.v, self.pos, self.valid

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.numel() * self.k.element_size() * 2


class RoutedCache:
    """The decoding state of a routed model: one KVCache per block call site, plus per-layer state (the surprise
    moving-average history, STT's previous-token input), and how many tokens it has seen."""

    def __init__(self) -> None:
        self.layers: dict[tuple[int, int], KVCache] = {}
        self.state: dict[tuple[int, str], Any] = {}
        self.seen = 0

    def kv(self, key: tuple[int, int]) -> KVCache:
        return self.layers.setdefault(key, KVCache())

    def num_entries(self) -> int:
        return sum(c.length for c in self.layers.values())

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


@dataclass
class Inputs:
    """What every unit's forward needs besides x."""

    positions: Tensor  # (B, T)
    pad_mask: Tensor | None  # (B, T) True for real tokens; None: no padding
    cache: RoutedCache | None
    routing: str


class Attention(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        self.theta = float(c["rope_theta"])
        d, bias = c["d_model"], bool(c["qkv_bias"])
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        kv_input: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        kv_x, kv_pos, kv_pad = (x, positions, pad_mask) if kv_input is None else kv_input
        S = kv_x.shape[1]
        k = self.k_proj(kv_x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, *rope_tables(positions, self.head_dim, self.theta))
        k = apply_rope(k, *rope_tables(kv_pos, self.head_dim, self.theta))
        gqa = self.n_kv_heads != self.n_heads
        if cache is None and pad_mask is None and kv_input is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            valid = torch.ones_like(kv_pos, dtype=torch.bool) if kv_pad is None else kv_pad.bool()
            if cache is not None:
                k, v, k_pos, k_valid = cache.append(k, v, kv_pos, valid)
            else:
                k_pos, k_valid = kv_pos, valid
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask(positions, k_pos, k_valid), enable_gqa=gqa
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block under Llama's names."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.mlp = MLP(c["d_model"], c["intermediate_size"])

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        context: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        kv_input = None if context is None else (self.input_layernorm(context[0]), context[1], context[2])
        h = x + self.self_attn(self.input_layernorm(x), positions, cache, pad_mask, kv_input)
        return h + self.mlp(self.post_attention_layernorm(h))


# --- routing (mirrors sdt/routing/*.py, causal modes)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    return torch.sort(torch.topk(scores, k, dim=1, sorted=False).indices, dim=1).values


def indices_to_mask(idx: Tensor, seq_len: int, valid: Tensor | None = None) -> Tensor:
    mask = torch.zeros(idx.shape[0], seq_len, dtype=torch.bool, device=idx.device)
    return mask.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool) if valid is None else valid)


def causal_selection(decide: Tensor, pad_mask: Tensor | None, full_context: bool) -> tuple[Tensor, Tensor] | None:
    """Per-token decisions (B, T) -> (idx, valid) (B, K), K the largest count in a row; None when none executes."""
    if pad_mask is not None:
        decide = decide & pad_mask
    k = max(int(decide.sum(dim=1).max()), 1 if full_context else 0)
    if k == 0:
        return None
    idx = topk_indices(decide.float(), k)
    return idx, torch.gather(decide, 1, idx)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def apply_gate(f: Tensor, g: Tensor, mode: str) -> Tensor:
    g = g.unsqueeze(-1).to(f.dtype)
    return f + f * (g - g.detach()) if mode == "ste" else f * g


def execute_tokens(
    block: Block,
    x: Tensor,
    inp: Inputs,
    selection: tuple[Tensor, Tensor] | None,
    gate: Tensor | None,
    gate_mode: str,
    cache: KVCache | None,
    full_context: bool,
) -> tuple[Tensor, Tensor]:
    """Run `block` on the selected tokens only; the others keep x. Returns (output, executed (B, T))."""
    B, T, _ = x.shape
    if selection is None:
        return x, torch.zeros(B, T, dtype=torch.bool, device=x.device)
    idx, valid = selection
    x_sel = gather_tokens(x, idx)
    pos_sel = torch.gather(inp.positions, 1, idx)
    attend = valid if inp.pad_mask is None else valid & torch.gather(inp.pad_mask, 1, idx)
    context = (x, inp.positions, inp.pad_mask) if full_context else None
    f = block(x_sel, pos_sel, cache, attend, context) - x_sel
    if gate is not None:
        f = apply_gate(f, torch.gather(gate, 1, idx), gate_mode)
    f = f * valid.unsqueeze(-1).to(f.dtype)
    out = x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x_sel + f)
    executed = indices_to_mask(idx, T, valid)
    return out, executed if inp.pad_mask is None else executed & inp.pad_mask
