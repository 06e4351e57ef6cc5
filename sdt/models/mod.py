"""Mixture-of-Depths (Raposo et al., 2024; spec section 3): a linear router picks the top-k tokens that run a block.

Selected tokens get x_i + gate_i * f_i with gate = sigmoid(r_i) (or raw r_i), so the router learns through the LM
loss; the rest pass through on the residual. An auxiliary BCE of r against the Top-K mask (and a small z-loss on r)
lets `threshold` routing (r >= tau) reproduce Top-K causally; a causal student router (as for SDT/STT) is the other
causal mode. Routing is always the soft, router-weighted kind: that is what makes MoD's router trainable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdt.models.config import ModelConfig
from sdt.models.layers import Block
from sdt.models.transformer import ForwardContext, LayerOutput
from sdt.routing import (
    CausalRouter,
    capacity_k,
    causal_selection,
    classification_stats,
    execute_tokens,
    indices_to_mask,
    router_bce,
    topk_indices,
)
from sdt.routing.routers import LinearRouter
from sdt.routing.stats import masked_mean


class MoDLayer(nn.Module):
    """A routed MoD layer. Cache sub-slot 0 holds the block's K/V for executed tokens only."""

    n_blocks = 1

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.capacity, self.raw_gate = cfg.capacity, cfg.mod_gate == "raw"
        self.full_context = cfg.routed_attention == "full"
        self.block = Block(cfg)
        self.router = LinearRouter(cfg.d_model)
        self.student = CausalRouter(cfg.d_model, cfg.d_model // 2)

    def thresholds(self) -> dict[str, Tensor]:
        return {"router": self.router.threshold, "student": self.student.threshold}

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        T = x.shape[1]
        r = self.router(x)  # (B, T)
        gate = r if self.raw_gate else torch.sigmoid(r)
        student_logits = self.student(x)
        student_prob = torch.sigmoid(student_logits)
        topk_mask = None
        if ctx.cache is None and (ctx.routing == "topk" or ctx.diagnostics):
            topk_idx = topk_indices(r.detach(), capacity_k(T, self.capacity))
            topk_mask = indices_to_mask(topk_idx, T)

        if ctx.routing == "topk":
            if topk_mask is None:
                raise ValueError("topk routing is not causal and cannot be used for cached decoding")
            idx, valid = topk_idx, None
        else:
            if ctx.routing == "threshold":
                decide = r >= self.router.threshold
            elif ctx.routing == "student":
                decide = student_prob >= self.student.threshold
            else:
                raise ValueError(f"unknown routing mode {ctx.routing!r}")
            idx, valid = causal_selection(decide, ctx.pad_mask, self.full_context)
        out, executed = execute_tokens(
            self.block, x, ctx.positions, ctx.rope, idx, valid, gate, "soft",
            pad_mask_BT=ctx.pad_mask, cache=ctx.kv(0), full_context=self.full_context,
        )  # fmt: skip

        aux = {"zloss": masked_mean(r.pow(2), ctx.pad_mask)}
        stats = {
            "executed_fraction": masked_mean(executed, ctx.pad_mask),
            "router_score": masked_mean(r, ctx.pad_mask).detach(),
            "gate": masked_mean(gate, ctx.pad_mask).detach(),
            "router_threshold": self.router.threshold,
            "student_threshold": self.student.threshold,
        }
        if topk_mask is not None:
            aux["mod_router_bce"] = router_bce(r, topk_mask, ctx.pad_mask)
            aux["router"] = router_bce(student_logits, topk_mask, ctx.pad_mask)
            for name, pred in (
                ("router", r >= self.router.threshold),
                ("student", student_prob >= self.student.threshold),
            ):
                stats.update({f"{name}_{k}": v for k, v in classification_stats(pred, topk_mask).items()})
        scores = {"router": r.detach(), "student": student_prob.detach()}
        return LayerOutput(hidden=out, aux_losses=aux, stats=stats, decisions=executed, scores=scores)
