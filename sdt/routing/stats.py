"""Routing statistics logged per routed layer (detached scalars; no host synchronisation)."""

from __future__ import annotations

from torch import Tensor

from sdt.routing.surprise import SurpriseSignals


def masked_mean(x_BT: Tensor, valid_BT: Tensor | None) -> Tensor:
    """Mean over the valid tokens (all tokens when `valid_BT` is None)."""
    if valid_BT is None:
        return x_BT.float().mean()
    w = valid_BT.float()
    return (x_BT.float() * w).sum() / w.sum().clamp(min=1.0)


def surprise_stats(sig: SurpriseSignals, executed_BT: Tensor, valid_BT: Tensor | None) -> dict[str, Tensor]:
    """Means of the surprise signals, and among executed tokens the share whose S_CE beats S_CU.

    The paper observes gating driven by novelty (S_CU) early in training and by prediction (S_CE) later;
    `ce_dominant_fraction` over training shows whether that happens.
    """
    stats = {
        name: masked_mean(getattr(sig, name), valid_BT).detach()
        for name in ("d_st", "d_ch", "ce", "cu", "s_ce", "s_cu", "g")
    }
    stats["ce_dominant_fraction"] = masked_mean((sig.s_ce > sig.s_cu).detach(), executed_BT)
    return stats
