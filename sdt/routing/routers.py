"""Learned token scorers that drive Top-K routing directly (the MoD router).

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantiles import empty_grid


class LinearRouter(nn.Module):
    """Mixture-of-Depths router: r = w . x, one scalar per token (no bias).

    r depends on the current token's state only, so routing by `r >= threshold` is causal; the auxiliary BCE of r
    against the Top-K mask (Raposo et al.) is what makes that threshold track Top-K.
    """

    param_role = "router"

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1, bias=False)
        self.register_buffer("threshold", torch.zeros(()))  # on r, calibrated to the capacity
        self.register_buffer("quantiles", empty_grid())  # r's quantile grid: the run-time capacity dial

    def forward(self, x_BTD: Tensor) -> Tensor:
        # In fp32 whatever the autocast: r is what Top-K ranks and the threshold cuts, and a half-precision r (8 or
        # 11 mantissa bits) ties whole groups of a sequence's tokens, so mixed-precision runs would route differently
        # from fp32 ones and calibrated thresholds would admit a tie group at once. A D -> 1 projection: no cost.
        with torch.autocast(x_BTD.device.type, enabled=False):
            return F.linear(x_BTD.float(), self.proj.weight.float()).squeeze(-1)  # (B, T)
