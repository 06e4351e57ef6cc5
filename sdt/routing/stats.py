"""Routing statistics logged per routed layer (detached scalars; no host synchronisation)."""

from __future__ import annotations

import torch
from torch import Tensor

from sdt.routing.surprise import SurpriseGate, SurpriseSignals


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


def surprise_losses_and_stats(
    gate: SurpriseGate, sig: SurpriseSignals, executed_BT: Tensor, valid_BT: Tensor | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A surprise-gated layer's own loss and statistics (SDT, STT): the prior's (transition network's) change
    surprise as the "prior" loss, the signal means (`surprise_stats`) and the gate's scalars."""
    stats = surprise_stats(sig, executed_BT, valid_BT)
    stats.update(gate.scalar_stats())
    return {"prior": masked_mean(sig.d_ch, valid_BT)}, stats


def position_consensus(executed_BT: Tensor, valid_BT: Tensor | None) -> Tensor:
    """How alike the sequences of a batch route: the mean over positions t of |2 p_t - 1|, where p_t is the share
    of (valid) sequences that execute position t.

    1 means every sequence executes exactly the same positions, a router that has stopped reading the content (a
    collapse); content-dependent routing gives values well below 1 (independent random choices at capacity 0.5
    give about 1/sqrt(B)). Meaningless for a batch of one sequence.
    """
    w_BT = torch.ones_like(executed_BT, dtype=torch.float32) if valid_BT is None else valid_BT.float()
    n_T = w_BT.sum(0)  # (T,) valid sequences per position
    p_T = (executed_BT.float() * w_BT).sum(0) / n_T.clamp(min=1.0)
    has_T = (n_T > 0).float()
    return ((2 * p_T - 1).abs() * has_T).sum().div(has_T.sum().clamp(min=1.0)).detach()
