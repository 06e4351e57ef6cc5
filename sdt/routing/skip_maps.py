"""Skip maps: a cheap linear stand-in for a routed block's update on the tokens that skip it.

A routed block leaves a skipped token unchanged (y = x). With a skip map the skipped token gets
y = x + W norm(x) + b instead, where norm is an RMS normalisation without weight: a linear estimate of the update
f = Block(x) - x that the block would have added. Executed tokens are unaffected. The map costs 2 D^2 FLOPs per
skipped token (under a tenth of a Llama block at D = 576).

Converted models fit the map in closed form before training (`fit_skip_map`, ridge least squares on the pretrained
block's own updates), so a converted model starts close to the pretrained function even at low capacity; from
scratch it starts at zero (y = x, the plain skip) and learns through the LM loss.

Routed exports ship this file (sdt/transformers_code/), so it imports only torch and `topk.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .topk import pack_decisions, topk_indices

# Ridge strength relative to the mean squared input feature: keeps the fit well posed on a few thousand tokens
# (a full-rank map has D^2 + D unknowns) without visibly biasing it.
RIDGE = 1e-2


class SkipMap(nn.Module):
    """f_hat = W norm(x) + b, one D x D matrix and a bias.

    Starts at zero output, so a model with skip maps computes exactly what it computes without them until they are
    trained or fitted.
    """

    param_role = "skip_map"

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.proj = nn.Linear(d_model, d_model, bias=True)
        self.reset_routing_parameters()

    def reset_routing_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BTD: Tensor) -> Tensor:
        z = F.rms_norm(x_BTD.float(), (x_BTD.shape[-1],), eps=self.eps).to(x_BTD.dtype)
        return self.proj(z)

    @torch.no_grad()
    def fit(self, stats: UpdateStatistics, ridge: float = RIDGE) -> float:
        """Set the map to the ridge least-squares fit of the updates gathered in `stats`; returns the fraction of
        the updates' variance the fit explains on those tokens."""
        W = stats.solve(ridge)  # (D + 1, D): rows 0..D-1 weigh norm(x), the last row is the bias
        self.proj.weight.copy_(W[:-1].T)
        self.proj.bias.copy_(W[-1])
        return stats.explained_variance(W)


def add_skip_estimate(
    out_BTD: Tensor,
    x_BTD: Tensor,
    executed_BT: Tensor,
    pad_mask_BT: Tensor | None,
    skip_map: SkipMap,
    n_skipped: int | None = None,
) -> Tensor:
    """out + skip_map(x) on the real tokens that did not execute. They are gathered (padded to a common count per
    row, the padding slots adding zero), so the map costs what `sdt.models.compute` counts, nothing on executed tokens.

    `n_skipped`: how many tokens every row skips, when the caller knows it (Top-K without padding skips T - K in
    each row); the gather then has a static shape and reads nothing on the host, as Top-K training needs under
    torch.compile and on accelerators. None counts the skipped tokens (the causal modes, padded batches).
    """
    skipped_BT = ~executed_BT if pad_mask_BT is None else ~executed_BT & pad_mask_BT
    if n_skipped is not None:
        if n_skipped == 0:
            return out_BTD
        idx_BS, valid_BS = topk_indices(skipped_BT.to(x_BTD.dtype), n_skipped), None
    else:
        packed = pack_decisions(skipped_BT)
        if packed is None:
            return out_BTD
        idx_BS, valid_BS = packed  # (B, S): S = the largest number of skipped tokens in a row
    idx_BSD = idx_BS.unsqueeze(-1).expand(-1, -1, x_BTD.shape[-1])
    # Under autocast the map's matmul runs in half precision while the residual stream stays in its own dtype.
    f_BSD = skip_map(torch.gather(x_BTD, 1, idx_BSD)).to(out_BTD.dtype)
    if valid_BS is not None:
        f_BSD = f_BSD * valid_BS.unsqueeze(-1).to(out_BTD.dtype)
    return out_BTD.scatter_add(1, idx_BSD, f_BSD)


class UpdateStatistics:
    """Running sums of the least-squares problem f ~ [norm(x), 1] W over many tokens, in float64: the fit needs only
    these, not the tokens themselves."""

    def __init__(self, d_model: int, eps: float = 1e-6, device: torch.device | None = None) -> None:
        self.eps = eps
        self.n = 0
        self.gram = torch.zeros(d_model + 1, d_model + 1, dtype=torch.float64, device=device)  # sum z1 z1^T
        self.cross = torch.zeros(d_model + 1, d_model, dtype=torch.float64, device=device)  # sum z1 f^T
        self.f_sum = torch.zeros(d_model, dtype=torch.float64, device=device)
        self.f_sq = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x_ND: Tensor, f_ND: Tensor) -> None:
        """Block inputs x and their updates f = Block(x) - x, (N, D) each."""
        z = F.rms_norm(x_ND.double(), (x_ND.shape[-1],), eps=self.eps)
        z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], dim=1)  # (N, D + 1)
        f = f_ND.double()
        self.n += len(z1)
        self.gram += z1.T @ z1
        self.cross += z1.T @ f
        self.f_sum += f.sum(0)
        self.f_sq += f.pow(2).sum()

    def solve(self, ridge: float) -> Tensor:
        if self.n == 0:
            raise ValueError("no tokens to fit a skip map on")
        lam = ridge * self.gram.diagonal().mean()
        eye = torch.eye(len(self.gram), dtype=self.gram.dtype, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross)

    def explained_variance(self, W: Tensor) -> float:
        """1 - residual / total sum of squares of the prediction [norm(x), 1] W, from the sums alone."""
        residual = self.f_sq - 2 * (W * self.cross).sum() + (W * (self.gram @ W)).sum()
        total = self.f_sq - self.f_sum.pow(2).sum() / self.n
        return float(1 - residual / total.clamp_min(1e-30))
