"""Subjective Timescale Transformer (docs/algorithms.md, section 8): a temporal router skips a block, and its K/V, for tokens
whose change was predictable from the previous token.

Training (teacher): a dense pass of the block gives each token's update delta; the transition network (TPN)
predicts it from the previous token's output of this layer; surprise signals give g; Top-K on g picks the tokens;
the block is re-run on those tokens only (so attention sees exactly what inference will see), gate applied; the
other tokens pass through unchanged. A causal student router learns the Top-K mask.

Inference (student): the student alone decides per token whether the layer runs: no teacher pass, and skipped
tokens neither run the block nor write K/V, so the KV cache of a routed layer holds only executed tokens.
The routed forward itself is `RoutedLayer`'s; this file gives it the student and the teacher pass.

Choices we made (docs/algorithms.md, section 8): the TPN's input for token t is the previous token's *dense-pass*
output of this layer (what the layer would produce with full compute), detached; STT needs `ste` gates, because
its inference path has no teacher pass from which a soft gate value could be computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block, RMSNorm
from sdt.common.errors import UserError
from sdt.models.config import ModelConfig
from sdt.models.layer_io import ForwardContext
from sdt.models.routed_layer import Route, RoutedLayer
from sdt.routing import CausalRouter, PriorFFN, SurpriseGate
from sdt.routing.stats import surprise_losses_and_stats


def shift_right(x_BTD: Tensor, first: Tensor | None = None) -> Tensor:
    """x_{t-1} at position t; position 0 gets `first` (B, 1, D), or zeros."""
    first = torch.zeros_like(x_BTD[:, :1]) if first is None else first
    return torch.cat([first, x_BTD[:, :-1]], dim=1)


class STTLayer(RoutedLayer):
    """A routed STT layer. Cache sub-slot 0 holds the block's K/V for executed tokens only."""

    ranked_score = "gate"
    causal_scores: ClassVar[Mapping[str, str]] = {"threshold": "gate", "student": "student", "budget": "student"}
    topk_learners: ClassVar[Mapping[str, str]] = {"student": "router"}

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

    def route(self, x: Tensor, h: Tensor, ctx: ForwardContext) -> Route:
        student_logits = self._student_logits(x, ctx)
        student = {"student": torch.sigmoid(student_logits)}
        if ctx.routing in ("student", "budget"):
            # Inference: the student alone decides, no teacher pass; skipped tokens neither run nor write K/V.
            return Route(scores=student, logits={"student": student_logits})
        if ctx.cache is not None:
            raise UserError(
                "STT decodes with routing=student or budget: the teacher needs a dense pass over the whole sequence"
            )
        # Teacher: dense pass for the surprise signals. Only read detached, so no graph: no activations kept for a
        # backward that never reaches it (and its FLOPs count once in training, see sdt.models.compute).
        with torch.no_grad():
            dense_out = self.block(x, ctx.positions, ctx.rope, pad_mask=ctx.pad_mask)  # (B, T, D)
        delta = dense_out - x.detach()
        delta_hat, logvar = self.transition(shift_right(dense_out))  # token t sees only tokens < t
        sig, _ = self.surprise(delta, delta_hat, logvar, valid_BT=ctx.pad_mask)
        return Route(
            scores={"gate": sig.g, **student},
            logits={"student": student_logits},
            gate=sig.g,
            gate_mode=self.gate_mode,
            signals=sig,
        )

    def own_losses_and_stats(
        self, route: Route, executed: Tensor, ctx: ForwardContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if route.signals is None:  # the student path: no teacher, no surprise signals
            return {}, {}
        return surprise_losses_and_stats(self.surprise, route.signals, executed, ctx.pad_mask)
