"""How a gate value g scales a selected token's block update f (spec section 0, "Gate application")."""

from __future__ import annotations

from torch import Tensor


def apply_gate(f_BKD: Tensor, g_BK: Tensor, mode: str) -> Tensor:
    """ste: forward value f exactly, gradient d/dg = f (straight-through); soft: g * f (MoD style)."""
    g = g_BK.unsqueeze(-1).to(f_BKD.dtype)
    if mode == "ste":
        return f_BKD * (1.0 + g - g.detach())
    if mode == "soft":
        return f_BKD * g
    raise ValueError(f"unknown gate mode {mode!r}")
