"""Cheap predictors of a block's update: the SDT prior and the STT transition network share this module.

It imports only torch: the input norm is handed in (the backbone's RMSNorm). Routed exports ship it
(sdt/transformers_code/).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class PriorFFN(nn.Module):
    """delta_hat = SwiGLU(norm(x)), a narrow MLP (hidden = max(2, even(ceil(f * D)))); `norm` is an RMSNorm of width
    D (its weight is the prior's `norm.weight`).

    Output projections start at zero, so delta_hat = 0 (and the KL form's log-variance = 0) at step 0: the prior
    adds nothing to a transferred model until it has learnt something.
    """

    param_role = "prior"

    def __init__(self, d_model: int, hidden: int, norm: nn.Module, predict_logvar: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.logvar_proj = nn.Linear(hidden, d_model, bias=False) if predict_logvar else None
        self.reset_routing_parameters()

    def reset_routing_parameters(self) -> None:
        nn.init.zeros_(self.down_proj.weight)
        if self.logvar_proj is not None:
            nn.init.zeros_(self.logvar_proj.weight)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.norm(x_BTD)
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        logvar = self.logvar_proj(h) if self.logvar_proj is not None else None
        return self.down_proj(h), logvar
