"""What only the export adds to the package's building blocks: the decoding cache `generate` carries, the inputs
every unit reads, and running a block on a subset of tokens (the causal modes of `sdt/routing/execution.py`, which
builds on `sdt.blocks` from another package and so cannot ship as it is).

Shipped beside `modeling_sdt.py` in every routed export; imports only torch and its sibling files (`layers.py` and
`kv_cache.py` are the package's `sdt/blocks/` files, `gates.py` and `topk.py` its `sdt/routing/` ones, shipped
verbatim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gates import apply_gate
from .kv_cache import KVCache, ModelCache
from .layers import Block, RotaryEmbedding
from .skip_maps import SkipMap, add_skip_estimate
from .topk import indices_to_mask, pack_decisions


class RoutedCache(ModelCache):
    """The package's decoding state (one preallocated, written-in-place KVCache per block call site, keyed
    (unit, sub-block), plus per-layer state such as the surprise moving-average history), and the number of
    tokens fed so far, which `generate` reads through `get_seq_length`."""

    def __init__(self, max_tokens: int | None = None) -> None:
        super().__init__(max_tokens)
        self.seen = 0  # tokens per row fed so far, padding included: the next call's input starts after them

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


@dataclass
class Inputs:
    """What every unit's forward needs besides x."""

    positions: Tensor  # (B, T) absolute positions
    rope: RotaryEmbedding
    pad_mask: Tensor | None  # (B, T) True for real tokens; None: no padding
    cache: RoutedCache | None
    routing: str  # the causal mode: "threshold" or "student"

    def kv(self, key: tuple[int, int]) -> KVCache | None:
        return None if self.cache is None else self.cache.get(key)


def causal_selection(decide: Tensor, pad_mask: Tensor | None, full_context: bool) -> tuple[Tensor, Tensor] | None:
    """Per-token decisions (B, T) -> (idx, valid) (B, K), K the largest count in a row; None when none executes.
    Padding never executes; full-context attention keeps one slot, as every token must still write its K/V."""
    if pad_mask is not None:
        decide = decide & pad_mask
    return pack_decisions(decide, min_k=1 if full_context else 0)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def execute_tokens(
    block: Block,
    x: Tensor,
    inp: Inputs,
    decide: Tensor,
    gate: Tensor | None,
    gate_mode: str,
    cache: KVCache | None,
    full_context: bool,
    skip_map: SkipMap | None = None,
) -> tuple[Tensor, Tensor]:
    """Run `block` only where `decide` (B, T) holds; the other tokens keep x (plus `skip_map`'s estimate of the
    update, when the layer has one). Returns (output, executed (B, T)). `gate` (B, T) scales the executed tokens'
    updates (None: the full update)."""
    B, T, _ = x.shape
    selection = causal_selection(decide, inp.pad_mask, full_context)
    if selection is None:
        out, executed = x, torch.zeros(B, T, dtype=torch.bool, device=x.device)
    else:
        idx, valid = selection
        x_sel = gather_tokens(x, idx)
        pos_sel = torch.gather(inp.positions, 1, idx)
        attend = valid if inp.pad_mask is None else valid & torch.gather(inp.pad_mask, 1, idx)
        context = (x, inp.positions, inp.pad_mask) if full_context else None
        f = block(x_sel, pos_sel, inp.rope, cache=cache, pad_mask=attend, context=context) - x_sel
        if gate is not None:
            f = apply_gate(f, torch.gather(gate, 1, idx), gate_mode)
        f = f * valid.unsqueeze(-1).to(f.dtype)
        out = x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x_sel + f)
        executed = indices_to_mask(idx, T, valid)
    if inp.pad_mask is not None:
        executed = executed & inp.pad_mask
    if skip_map is not None:
        out = add_skip_estimate(out, x, executed, inp.pad_mask, skip_map)
    return out, executed
