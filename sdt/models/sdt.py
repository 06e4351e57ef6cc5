"""Subjective Depth Transformer (docs/algorithms.md, section 7): a decision layer and a dynamic layer as one unit of the stack.

1. Decision layer, on every token: post = Block_a(x), delta = post - x.
2. Prior: delta_hat = PriorFFN(x), trained to predict delta (loss weight `prior_loss_weight`).
3. Surprise signals and gate g from delta and delta_hat (sdt.routing.surprise).
4. Dynamic layer: Block_b runs on the tokens chosen by the routing mode, starting from post, with the gate applied;
   the other tokens keep post exactly, or get post + skip_map(post) with a skip map (sdt.routing.skip_maps).

Routing modes: "topk" (training; non-causal oracle at evaluation), "threshold" (execute where g >= tau, causal
because g is), "student" (a causal router predicts Top-K membership), "budget" (g against a threshold that holds each
sequence's executed share). Tau and the student threshold are calibrated to the capacity on held-out training data
(sdt.models.calibration) and stored as buffers in the checkpoint. The routed forward itself is `RoutedLayer`'s.
Design choice: the surprise signals read delta detached and the prior reads x detached, so the backbone is trained by
the LM loss alone and is not pushed to reshape its states to open or close gates or to suit the prior; the gate
scalars and the prior learn through their own losses and through g.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from sdt.blocks.layers import Block, RMSNorm
from sdt.models.config import ModelConfig
from sdt.models.layer_io import ForwardContext
from sdt.models.routed_layer import Route, RoutedLayer
from sdt.routing import CausalRouter, PriorFFN, SurpriseGate
from sdt.routing.stats import surprise_losses_and_stats


class SDTPair(RoutedLayer):
    """One (decision, dynamic) pair. Cache sub-slots: 0 = decision block, 1 = dynamic block."""

    n_blocks = 2  # backbone layers this unit spans
    routed_slot = 1
    ranked_score = "gate"
    causal_scores: ClassVar[Mapping[str, str]] = {"threshold": "gate", "student": "student", "budget": "gate"}
    topk_learners: ClassVar[Mapping[str, str]] = {"student": "router"}

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

    def routed_input(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        return self.decision(x, ctx.positions, ctx.rope, cache=ctx.kv(0), pad_mask=ctx.pad_mask)  # post (B, T, D)

    def route(self, x: Tensor, post: Tensor, ctx: ForwardContext) -> Route:
        delta = (post - x).detach()
        delta_hat, logvar = self.prior(x.detach())  # the prior learns to predict; it does not shape the backbone
        history = ctx.cache.state.get((ctx.cache_key, "ma")) if ctx.cache is not None else None
        sig, history = self.surprise(delta, delta_hat, logvar, valid_BT=ctx.pad_mask, history=history)
        if ctx.cache is not None:
            ctx.cache.state[(ctx.cache_key, "ma")] = history
        student_logits = self.student(post)  # (B, T)
        return Route(
            scores={"gate": sig.g, "student": torch.sigmoid(student_logits)},
            logits={"student": student_logits},
            gate=sig.g,
            gate_mode=self.gate_mode,
            signals=sig,
        )

    def own_losses_and_stats(
        self, route: Route, executed: Tensor, ctx: ForwardContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return surprise_losses_and_stats(self.surprise, route.signals, executed, ctx.pad_mask)
