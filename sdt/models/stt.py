"""Subjective Timescale Transformer (docs/algorithms.md, section 8): a temporal router skips a block, and its K/V, for tokens
whose change was predictable from the previous token.

Training (teacher): a dense pass of the block gives each token's update delta; the transition network (TPN)
predicts it from the previous token's output of this layer; surprise signals give g; Top-K on g picks the tokens;
the block is re-run on those tokens only (so attention sees exactly what inference will see), gate applied; the
other tokens pass through unchanged. A causal student router learns the Top-K mask.

Inference (student): the student alone decides per token whether the layer runs: no teacher pass, and skipped
tokens neither run the block nor write K/V, so the KV cache of a routed layer holds only executed tokens.

Choices we made (docs/algorithms.md, section 8): the TPN's input for token t is the previous token's *dense-pass*
output of this layer (what the layer would produce with full compute), detached; STT needs `ste` gates, because
its inference path has no teacher pass from which a soft gate value could be computed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block, RMSNorm
from sdt.errors import UserError
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


def shift_right(x_BTD: Tensor, first: Tensor | None = None) -> Tensor:
    """x_{t-1} at position t; position 0 gets `first` (B, 1, D), or zeros."""
    first = torch.zeros_like(x_BTD[:, :1]) if first is None else first
    return torch.cat([first, x_BTD[:, :-1]], dim=1)


class STTLayer(RoutedLayer):
    """A routed STT layer. Cache sub-slot 0 holds the block's K/V for executed tokens only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        if cfg.gate_mode != "ste":
            raise UserError(
                "model=stt supports model.gate_mode=ste only: its inference path has no teacher pass "
                "to compute a soft gate from"
            )
        self.gate_mode = cfg.gate_mode
        self.use_prev = cfg.student_input == "x_prev"
        self.block = Block(cfg)
        norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.transition = PriorFFN(cfg.d_model, cfg.prior_hidden_size, norm, cfg.change_surprise == "kl")
        self.surprise = SurpriseGate(cfg)
        d_in = 2 * cfg.d_model if self.use_prev else cfg.d_model
        self.student = CausalRouter(d_in, cfg.d_model // 2, normalize=cfg.student_norm)

    def score_owners(self) -> dict[str, nn.Module]:
        return {"gate": self.surprise, "student": self.student}

    def _student_logits(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.use_prev:
            return self.student(x)
        key = (ctx.cache_key, "x_prev")
        first = ctx.cache.state.get(key) if ctx.cache is not None else None
        x_in = x if ctx.pad_mask is None else x * ctx.pad_mask.unsqueeze(-1).to(x.dtype)
        prev = shift_right(x_in, first)
        if ctx.cache is not None:
            ctx.cache.state[key] = x_in[:, -1:].detach()
        return self.student(torch.cat([x, prev], dim=-1))

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        if ctx.routing == "full":  # the block on every token, no gate: the layer's dense function
            out = self.block(x, ctx.positions, ctx.rope, cache=ctx.kv(0), pad_mask=ctx.pad_mask)
            return LayerOutput(hidden=out, decisions=all_tokens(x, ctx.pad_mask))
        student_logits = self._student_logits(x, ctx)
        student_prob = torch.sigmoid(student_logits)
        if ctx.routing in ("student", "budget"):
            return self._student_forward(x, ctx, student_prob)
        if ctx.cache is not None:
            raise UserError(
                "STT decodes with routing=student or budget: the teacher needs a dense pass over the whole sequence"
            )

        # Teacher: dense pass for the surprise signals. Only read detached, so no graph: no activations kept for a
        # backward that never reaches it (and its FLOPs count once in training, see sdt.compute).
        with torch.no_grad():
            dense_out = self.block(x, ctx.positions, ctx.rope, pad_mask=ctx.pad_mask)  # (B, T, D)
        delta = dense_out - x.detach()
        delta_hat, logvar = self.transition(shift_right(dense_out))  # token t sees only tokens < t
        sig, _ = self.surprise(delta, delta_hat, logvar, valid_BT=ctx.pad_mask)
        topk_idx, topk_mask = topk_membership(sig.g.detach(), self.capacity, ctx.positions, self.always_first)
        if ctx.routing == "topk":
            idx, valid = topk_idx, None
        else:
            # full_context=True keeps one slot: the teacher's threshold mode only runs in full forwards
            idx, valid = select_tokens(
                ctx.routing,
                capacity=self.capacity,
                positions_BT=ctx.positions,
                causal_decide={"threshold": sig.g >= self.surprise.threshold},
                pad_mask_BT=ctx.pad_mask,
                always_first=self.always_first,
                full_context=True,
            )
        out, executed = execute_tokens(
            self.block, x, ctx.positions, ctx.rope, idx, valid, sig.g, self.gate_mode,
            pad_mask_BT=ctx.pad_mask, full_context=self.full_context,
            skip_map=self.skip_map,
        )  # fmt: skip
        aux = {
            "prior": masked_mean(sig.d_ch, ctx.pad_mask),
            "router": router_bce(student_logits, topk_mask, ctx.pad_mask),
        }
        stats = {"executed_fraction": masked_mean(executed, ctx.pad_mask)}
        stats.update(surprise_stats(sig, executed, ctx.pad_mask))
        stats.update(self.surprise.scalar_stats())
        stats["student_threshold"] = self.student.threshold
        student_pred = student_prob >= self.student.threshold
        stats.update({f"student_{k}": v for k, v in classification_stats(student_pred, topk_mask).items()})
        scores = {"gate": sig.g.detach(), "student": student_prob.detach()}
        return LayerOutput(hidden=out, aux_losses=aux, stats=stats, decisions=executed, scores=scores)

    def _student_forward(self, x: Tensor, ctx: ForwardContext, student_prob: Tensor) -> LayerOutput:
        """Inference: run the block only where the student says so (against its calibrated threshold, or one that
        holds each sequence's budget); no teacher pass, no K/V for skipped tokens."""
        if ctx.routing == "budget":
            decide = budget_decide(
                student_prob, self.student, capacity=self.capacity, positions_BT=ctx.positions,
                pad_mask_BT=ctx.pad_mask, always_first=self.always_first, cache_state=ctx.cache_state,
                key=(ctx.cache_key, "budget"),
            )  # fmt: skip
        else:
            decide = student_prob >= self.student.threshold
        idx, valid = select_tokens(
            ctx.routing,
            capacity=self.capacity,
            positions_BT=ctx.positions,
            causal_decide={ctx.routing: decide},
            pad_mask_BT=ctx.pad_mask,
            always_first=self.always_first,
            full_context=self.full_context,
        )
        out, executed = execute_tokens(
            self.block, x, ctx.positions, ctx.rope, idx, valid, None, self.gate_mode,
            pad_mask_BT=ctx.pad_mask, cache=ctx.kv(0, self.kv_share), full_context=self.full_context,
            skip_map=self.skip_map,
        )  # fmt: skip
        scores = {"student": student_prob.detach()}
        if ctx.cache is not None and not ctx.diagnostics:  # a decoding step: no statistics to log
            return LayerOutput(hidden=out, decisions=executed, scores=scores)
        stats = {"executed_fraction": masked_mean(executed, ctx.pad_mask), "student_threshold": self.student.threshold}
        return LayerOutput(hidden=out, stats=stats, decisions=executed, scores=scores)
