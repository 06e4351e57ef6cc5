"""Subjective Depth Transformer (docs/algorithms.md, section 7): a decision layer and a dynamic layer as one unit of the stack.

1. Decision layer, on every token: post = Block_a(x), delta = post - x.
2. Prior: delta_hat = PriorFFN(x), trained to predict delta (loss weight `prior_loss_weight`).
3. Surprise signals and gate g from delta and delta_hat (sdt.routing.surprise).
4. Dynamic layer: Block_b runs on the tokens chosen by the routing mode, starting from post, with the gate applied;
   the other tokens keep post exactly, or get post + skip_map(post) with a skip map (sdt.routing.skip_maps).

Routing modes: "topk" (training; non-causal oracle at evaluation), "threshold" (execute where g >= tau, causal
because g is), "student" (a causal router predicts Top-K membership). Tau and the student threshold are calibrated
to the capacity on held-out training data (sdt.models.calibration) and stored as buffers in the checkpoint.
Design choice: the surprise signals read delta detached and the prior reads x detached, so the backbone is trained by
the LM loss alone and is not pushed to reshape its states to open or close gates or to suit the prior; the gate
scalars and the prior learn through their own losses and through g.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block, RMSNorm
from sdt.models.config import ModelConfig
from sdt.models.transformer import ForwardContext, LayerOutput, RoutedLayer
from sdt.routing import (
    CausalRouter,
    PriorFFN,
    SurpriseGate,
    all_tokens,
    budget_decide,
    classification_stats,
    execute_tokens,
    router_bce,
    select_tokens,
    topk_membership,
)
from sdt.routing.stats import masked_mean, surprise_stats


class SDTPair(RoutedLayer):
    """One (decision, dynamic) pair. Cache sub-slots: 0 = decision block, 1 = dynamic block."""

    n_blocks = 2  # backbone layers this unit spans

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate_mode = cfg.gate_mode
        self.decision = Block(cfg)
        self.dynamic = Block(cfg)
        norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.prior = PriorFFN(cfg.d_model, cfg.prior_hidden_size, norm, cfg.change_surprise == "kl")
        self.surprise = SurpriseGate(cfg)
        self.student = CausalRouter(cfg.d_model, cfg.d_model // 2, normalize=cfg.student_norm)

    @property
    def routed_block(self) -> Block:
        return self.dynamic

    def score_owners(self) -> dict[str, nn.Module]:
        return {"gate": self.surprise, "student": self.student}

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        post = self.decision(x, ctx.positions, ctx.rope, cache=ctx.kv(0), pad_mask=ctx.pad_mask)  # (B, T, D)
        if ctx.routing == "full":  # both blocks on every token, no gate: the pair's dense function
            out = self.dynamic(post, ctx.positions, ctx.rope, cache=ctx.kv(1), pad_mask=ctx.pad_mask)
            return LayerOutput(hidden=out, decisions=all_tokens(x, ctx.pad_mask))
        delta = (post - x).detach()
        delta_hat, logvar = self.prior(x.detach())  # the prior learns to predict; it does not shape the backbone
        history = ctx.cache.state.get((ctx.cache_key, "ma")) if ctx.cache is not None else None
        sig, history = self.surprise(delta, delta_hat, logvar, valid_BT=ctx.pad_mask, history=history)
        if ctx.cache is not None:
            ctx.cache.state[(ctx.cache_key, "ma")] = history
        student_logits = self.student(post)  # (B, T)
        student_prob = torch.sigmoid(student_logits)

        # Top-K membership: what training executes, and the target the student learns. Meaningless for one token.
        topk_mask = None
        if ctx.cache is None and (ctx.routing == "topk" or ctx.diagnostics):
            _, topk_mask = topk_membership(sig.g.detach(), self.capacity, ctx.positions, self.always_first)
        causal_decide = {
            "threshold": sig.g >= self.surprise.threshold,
            "student": student_prob >= self.student.threshold,
        }
        if ctx.routing == "budget":  # the gate, against a threshold that holds each sequence's budget
            causal_decide["budget"] = budget_decide(
                sig.g, self.surprise, capacity=self.capacity, positions_BT=ctx.positions, pad_mask_BT=ctx.pad_mask,
                always_first=self.always_first, cache_state=ctx.cache_state, key=(ctx.cache_key, "budget"),
            )  # fmt: skip
        idx, valid = select_tokens(
            ctx.routing,
            capacity=self.capacity,
            positions_BT=ctx.positions,
            topk_score_BT=sig.g.detach() if ctx.cache is None else None,
            causal_decide=causal_decide,
            pad_mask_BT=ctx.pad_mask,
            always_first=self.always_first,
            full_context=self.full_context,
        )
        out, executed = execute_tokens(
            self.dynamic, post, ctx.positions, ctx.rope, idx, valid, sig.g, self.gate_mode,
            pad_mask_BT=ctx.pad_mask, cache=ctx.kv(1, self.kv_share), full_context=self.full_context,
            skip_map=self.skip_map,
        )  # fmt: skip

        scores = {"gate": sig.g.detach(), "student": student_prob.detach()}
        if ctx.cache is not None and not ctx.diagnostics:  # a decoding step: no losses or statistics to log
            return LayerOutput(hidden=out, decisions=executed, scores=scores)
        aux = {"prior": masked_mean(sig.d_ch, ctx.pad_mask)}
        stats = {"executed_fraction": masked_mean(executed, ctx.pad_mask)}
        stats.update(surprise_stats(sig, executed, ctx.pad_mask))
        stats.update(self.surprise.scalar_stats())
        stats["student_threshold"] = self.student.threshold
        if topk_mask is not None:
            aux["router"] = router_bce(student_logits, topk_mask, ctx.pad_mask)
            student_pred = student_prob >= self.student.threshold
            stats.update({f"student_{k}": v for k, v in classification_stats(student_pred, topk_mask).items()})
        return LayerOutput(hidden=out, aux_losses=aux, stats=stats, decisions=executed, scores=scores)
