"""How a gate value g scales a selected token's block update f (docs/algorithms.md, section 3).

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

# ste: the forward value is the full block update, the gradient flows through g | soft: the update scaled by g
GateMode = Literal["ste", "soft"]


def apply_gate(f_BKD: Tensor, g_BK: Tensor, mode: GateMode) -> Tensor:
    """ste: forward value f exactly, gradient d/dg = f (straight-through); soft: g * f (MoD style)."""
    g = g_BK.unsqueeze(-1).to(f_BKD.dtype)
    if mode == "ste":
        # f + f * (g - g) rather than f * (1 + g - g): g - g is exactly 0, while (1 + g) - g is not always exactly 1
        # in floating point, which would make the forward value depend (slightly) on g.
        return f_BKD + f_BKD * (g - g.detach())
    if mode == "soft":
        return f_BKD * g
    raise ValueError(f"unknown gate mode {mode!r}")
