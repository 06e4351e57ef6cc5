"""Routed execution: run a block on a gathered subset of tokens and scatter the result back.

Each sequence's selected tokens are gathered into their own row of a (B, K, D) tensor (rows are never packed
together, so no token attends across sequences), the block runs with the tokens' original RoPE positions and a causal
mask over those positions, and its update, scaled by the gate, is scattered back. Unselected tokens keep their input
exactly: their block is skipped, not masked (or, with a skip map, get its cheap linear estimate of the update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdt.blocks.kv_cache import KVCache
from sdt.blocks.layers import RotaryEmbedding
from sdt.routing.gates import apply_gate
from sdt.routing.skip_maps import SkipMap, add_skip_estimate
from sdt.routing.topk import indices_to_mask, pack_decisions

# What a routed layer runs on its selected tokens: a `Block`, or one of its residual sub-layers
# (`Block.attention_sublayer`, `Block.mlp_sublayer`), all with the block's call shape and returning x + update.
RoutedFunction = Callable[..., Tensor]


def gather_tokens(x_BTD: Tensor, idx_BK: Tensor) -> Tensor:
    """(B, T, D), (B, K) -> (B, K, D)."""
    return torch.gather(x_BTD, 1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1]))


def scatter_tokens(x_BTD: Tensor, idx_BK: Tensor, y_BKD: Tensor) -> Tensor:
    """Out-of-place: x with rows idx replaced by y."""
    return x_BTD.scatter(1, idx_BK.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1]), y_BKD)


def run_routed_block(
    block: RoutedFunction,
    x_BTD: Tensor,
    positions_BT: Tensor,
    rope: RotaryEmbedding,
    idx_BK: Tensor,
    gate_BT: Tensor | None,
    gate_mode: str,
    *,
    valid_BK: Tensor | None = None,
    pad_mask_BT: Tensor | None = None,
    cache: KVCache | None = None,
    full_context: bool = False,
) -> Tensor:
    """x (B, T, D) -> x with the selected tokens replaced by x_i + gate(f_i), f_i = block(x_i) - x_i (the update of
    the block, or of the sub-layer, that `block` is).

    `valid_BK` marks which gathered slots really execute (causal modes fill rows up to a common K); invalid slots
    neither attend nor are attended to, and keep their input. `gate_BT` None applies the full update (no gate).
    With `full_context`, selected queries attend to every earlier token (all tokens write K/V).
    """
    x_sel = gather_tokens(x_BTD, idx_BK)  # (B, K, D)
    pos_sel = torch.gather(positions_BT, 1, idx_BK)  # (B, K)
    attend_sel = valid_BK
    if pad_mask_BT is not None:
        pad_sel = torch.gather(pad_mask_BT, 1, idx_BK)
        attend_sel = pad_sel if attend_sel is None else attend_sel & pad_sel
    context = (x_BTD, positions_BT, pad_mask_BT) if full_context else None
    y_sel = block(x_sel, pos_sel, rope, cache=cache, pad_mask=attend_sel, context=context)
    f_sel = y_sel - x_sel  # (B, K, D) the block's update
    if gate_BT is not None:
        f_sel = apply_gate(f_sel, torch.gather(gate_BT, 1, idx_BK), gate_mode)
    if valid_BK is not None:
        f_sel = f_sel * valid_BK.unsqueeze(-1).to(f_sel.dtype)
    return scatter_tokens(x_BTD, idx_BK, x_sel + f_sel)


def causal_selection(
    decide_BT: Tensor, pad_mask_BT: Tensor | None, full_context: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Per-token causal decisions (B, T) -> (idx, valid) for `execute_tokens`; (None, None) when nothing executes.

    Padding never executes. With full-context attention one (invalid) slot is kept even when no token executes,
    because every token must still write its K/V.
    """
    if pad_mask_BT is not None:
        decide_BT = decide_BT & pad_mask_BT
    packed = pack_decisions(decide_BT, min_k=1 if full_context else 0)
    return (None, None) if packed is None else packed


def execute_tokens(
    block: RoutedFunction,
    x_BTD: Tensor,
    positions_BT: Tensor,
    rope: RotaryEmbedding,
    idx_BK: Tensor | None,
    valid_BK: Tensor | None,
    gate_BT: Tensor | None,
    gate_mode: str,
    *,
    pad_mask_BT: Tensor | None = None,
    cache: KVCache | None = None,
    full_context: bool = False,
    skip_map: SkipMap | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a routed block on the selected tokens: (output (B, T, D), executed (B, T) bool).

    `idx_BK` None means no token of the batch executes: the block is skipped entirely (and writes no K/V).
    `skip_map`: the tokens that do not execute get x + skip_map(x) instead of x.
    """
    B, T, _ = x_BTD.shape
    if idx_BK is None:
        out, executed = x_BTD, torch.zeros(B, T, dtype=torch.bool, device=x_BTD.device)
    else:
        out = run_routed_block(
            block, x_BTD, positions_BT, rope, idx_BK, gate_BT, gate_mode,
            valid_BK=valid_BK, pad_mask_BT=pad_mask_BT, cache=cache, full_context=full_context,
        )  # fmt: skip
        executed = indices_to_mask(idx_BK, T, valid_BK)
        if pad_mask_BT is not None:
            executed = executed & pad_mask_BT
    if skip_map is not None:
        # Top-K (every slot valid) without padding skips exactly T - K tokens in each row: a static count.
        static = idx_BK is not None and valid_BK is None and pad_mask_BT is None
        n_skipped = T - idx_BK.shape[1] if static else None
        out = add_skip_estimate(out, x_BTD, executed, pad_mask_BT, skip_map, n_skipped)
    return out, executed
