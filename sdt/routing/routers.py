"""Learned token scorers that drive Top-K routing directly (the MoD router).

Routed exports ship this file verbatim (sdt/transformers_code/), so it imports only torch, the standard library and
other shipped files, relatively.
"""

from __future__ import annotations

import torch
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
        return self.proj(x_BTD).squeeze(-1).float()  # (B, T)
