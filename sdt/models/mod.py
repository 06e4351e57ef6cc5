"""Mixture-of-Depths (Raposo et al., 2024; docs/algorithms.md, section 9): a linear router picks the top-k tokens that run a block.

Selected tokens get x_i + gate_i * f_i with gate = sigmoid(r_i) (or raw r_i), so the router learns through the LM
loss; the rest pass through on the residual. An auxiliary BCE of r against the Top-K mask (and a small z-loss on r)
lets `threshold` routing (r >= tau) reproduce Top-K causally; a causal student router (as for SDT/STT) is the other
causal mode. The router learns through the LM loss from the gate: the router-weighted update (`mod_gate=sigmoid` or
`raw`), or `mod_gate=ste`, whose forward value is the full update (as SDT's and STT's ste gates) and whose gradient
is that of sigmoid(r), so a converted model at capacity 1.0 computes the pretrained function exactly.
The routed forward itself is `RoutedLayer`'s; this file gives it the router, the student and their losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block
from sdt.models.config import ModelConfig
from sdt.models.layer_io import ForwardContext
from sdt.models.routed_layer import Route, RoutedLayer
from sdt.routing import CausalRouter
from sdt.routing.routers import LinearRouter
from sdt.routing.stats import masked_mean


class MoDLayer(RoutedLayer):
    """A routed MoD layer. Cache sub-slot 0 holds the block's K/V for executed tokens only."""

    ranked_score = "router"
    # budget: the student, as MoD's default causal mode, against a budget-held threshold
    causal_scores: ClassVar[Mapping[str, str]] = {"threshold": "router", "student": "student", "budget": "student"}
    topk_learners: ClassVar[Mapping[str, str]] = {"router": "mod_router_bce", "student": "router"}

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate_kind = cfg.mod_gate
        self.block = Block(cfg)
        self.router = LinearRouter(cfg.d_model)
        self.student = CausalRouter(cfg.d_model, cfg.d_model // 2, normalize=cfg.student_norm)

    def score_owners(self) -> dict[str, nn.Module]:
        return {"router": self.router, "student": self.student}

    def route(self, x: Tensor, h: Tensor, ctx: ForwardContext) -> Route:
        r = self.router(x)  # (B, T)
        student_logits = self.student(x)
        # ste: forward value exactly 1 (the block's full update), gradient of sigmoid(r); otherwise the update is
        # scaled by the router weight.
        return Route(
            scores={"router": r, "student": torch.sigmoid(student_logits)},
            logits={"router": r, "student": student_logits},
            gate=r if self.gate_kind == "raw" else torch.sigmoid(r),
            gate_mode="ste" if self.gate_kind == "ste" else "soft",
        )

    def own_losses_and_stats(
        self, route: Route, executed: Tensor, ctx: ForwardContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        r = route.scores["router"]
        stats = {
            "router_score": masked_mean(r, ctx.pad_mask).detach(),
            "gate": masked_mean(route.gate, ctx.pad_mask).detach(),
        }
        return {"zloss": masked_mean(r.pow(2), ctx.pad_mask)}, stats
