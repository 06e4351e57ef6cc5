"""Causal student routers: predict, from the current token's state alone, whether Top-K would select it.

Top-K over a sequence looks at future tokens; a student sees only the present (and, optionally, the previous
token), so routing by it is causal and usable in generation. It trains with BCE on detached inputs against the
Top-K mask, and executes where sigmoid(logit) >= threshold, the threshold calibrated so the executed share is gamma.

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantiles import empty_grid


class CausalRouter(nn.Module):
    """MLP(D_in -> D/2 -> 1, SiLU) -> one logit per token."""

    param_role = "router"

    def __init__(self, d_in: int, d_hidden: int, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize  # RMS-normalise the input (no weight): scale-free decisions
        self.fc1 = nn.Linear(d_in, max(1, d_hidden))
        self.fc2 = nn.Linear(max(1, d_hidden), 1)
        self.register_buffer("threshold", torch.full((), 0.5))  # on sigmoid(logit), calibrated to the capacity
        self.register_buffer("quantiles", empty_grid())  # the score's quantile grid: the run-time capacity dial

    def forward(self, x_BTD: Tensor) -> Tensor:
        # In fp32 whatever the autocast, as the MoD router: the logit is thresholded against a calibrated value and
        # ranked by budget decoding; in half precision many tokens would share one logit. The student is small
        # (D * D/2 MACs per token, a few percent of a block), so this costs little under bf16-mixed.
        with torch.autocast(x_BTD.device.type, enabled=False):
            x = x_BTD.detach().float()
            if self.normalize:
                x = F.rms_norm(x, (x.shape[-1],))
            h = F.silu(F.linear(x, self.fc1.weight.float(), self.fc1.bias.float()))
            return F.linear(h, self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)  # (B, T) logits


def router_bce(logits_BT: Tensor, target_BT: Tensor, valid_BT: Tensor | None = None) -> Tensor:
    loss = F.binary_cross_entropy_with_logits(logits_BT.float(), target_BT.float(), reduction="none")
    if valid_BT is None:
        return loss.mean()
    w = valid_BT.float()
    return (loss * w).sum() / w.sum().clamp(min=1.0)


def classification_stats(pred_BT: Tensor, target_BT: Tensor) -> dict[str, Tensor]:
    """Accuracy, precision and recall of boolean predictions against the Top-K mask (no host sync)."""
    pred, target = pred_BT.bool(), target_BT.bool()
    tp = (pred & target).sum().float()
    return {
        "accuracy": (pred == target).float().mean(),
        "precision": tp / pred.sum().clamp(min=1).float(),
        "recall": tp / target.sum().clamp(min=1).float(),
    }
