"""Mixture-of-Depths (Raposo et al., 2024; docs/algorithms.md, section 9): a linear router picks the top-k tokens that run a block.

Selected tokens get x_i + gate_i * f_i with gate = sigmoid(r_i) (or raw r_i), so the router learns through the LM
loss; the rest pass through on the residual. An auxiliary BCE of r against the Top-K mask (and a small z-loss on r)
lets `threshold` routing (r >= tau) reproduce Top-K causally; a causal student router (as for SDT/STT) is the other
causal mode. The router learns through the LM loss from the gate: the router-weighted update (`mod_gate=sigmoid` or
`raw`), or `mod_gate=ste`, whose forward value is the full update (as SDT's and STT's ste gates) and whose gradient
is that of sigmoid(r), so a converted model at capacity 1.0 computes the pretrained function exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block
from sdt.models.config import ModelConfig
from sdt.models.transformer import ForwardContext, LayerOutput, RoutedLayer
from sdt.routing import (
    CausalRouter,
    all_tokens,
    budget_decide,
    classification_stats,
    execute_tokens,
    router_bce,
    select_tokens,
    topk_membership,
)
from sdt.routing.routers import LinearRouter
from sdt.routing.stats import masked_mean


class MoDLayer(RoutedLayer):
    """A routed MoD layer. Cache sub-slot 0 holds the block's K/V for executed tokens only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate_kind = cfg.mod_gate
        self.block = Block(cfg)
        self.router = LinearRouter(cfg.d_model)
        self.student = CausalRouter(cfg.d_model, cfg.d_model // 2, normalize=cfg.student_norm)

    def score_owners(self) -> dict[str, nn.Module]:
        return {"router": self.router, "student": self.student}

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        if ctx.routing == "full":  # the block on every token, no router weight: the layer's dense function
            out = self.block(x, ctx.positions, ctx.rope, cache=ctx.kv(0), pad_mask=ctx.pad_mask)
            return LayerOutput(hidden=out, decisions=all_tokens(x, ctx.pad_mask))
        r = self.router(x)  # (B, T)
        gate = r if self.gate_kind == "raw" else torch.sigmoid(r)
        student_logits = self.student(x)
        student_prob = torch.sigmoid(student_logits)
        topk_mask = None
        if ctx.cache is None and (ctx.routing == "topk" or ctx.diagnostics):
            _, topk_mask = topk_membership(r.detach(), self.capacity, ctx.positions, self.always_first)
        causal_decide = {"threshold": r >= self.router.threshold, "student": student_prob >= self.student.threshold}
        if ctx.routing == "budget":  # the student, as MoD's default causal mode, against a budget-held threshold
            causal_decide["budget"] = budget_decide(
                student_prob, self.student, capacity=self.capacity, positions_BT=ctx.positions,
                pad_mask_BT=ctx.pad_mask, always_first=self.always_first, cache_state=ctx.cache_state,
                key=(ctx.cache_key, "budget"),
            )  # fmt: skip
        idx, valid = select_tokens(
            ctx.routing,
            capacity=self.capacity,
            positions_BT=ctx.positions,
            topk_score_BT=r.detach() if ctx.cache is None else None,
            causal_decide=causal_decide,
            pad_mask_BT=ctx.pad_mask,
            always_first=self.always_first,
            full_context=self.full_context,
        )
        # ste: forward value exactly 1 (the block's full update), gradient of sigmoid(r); otherwise the update is
        # scaled by the router weight.
        out, executed = execute_tokens(
            self.block, x, ctx.positions, ctx.rope, idx, valid, gate, "ste" if self.gate_kind == "ste" else "soft",
            pad_mask_BT=ctx.pad_mask, cache=ctx.kv(0, self.kv_share), full_context=self.full_context,
            skip_map=self.skip_map,
        )  # fmt: skip

        scores = {"router": r.detach(), "student": student_prob.detach()}
        if ctx.cache is not None and not ctx.diagnostics:  # a decoding step: no losses or statistics to log
            return LayerOutput(hidden=out, decisions=executed, scores=scores)
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
        return LayerOutput(hidden=out, aux_losses=aux, stats=stats, decisions=executed, scores=scores)
