"""The routed forward, written once: SDT, STT and MoD are this skeleton plus what is theirs (docs/architecture.md).

A routed layer runs its routed block on a share of the tokens (the capacity) and lets the others skip it.
`RoutedLayer.forward`, for every architecture:

1. `routed_input(x, ctx)` (hook): what the routed block reads, by default x (SDT: the output of its decision block).
   Routing "full" runs the routed block on it for every token, no gate: the layer's dense function; nothing below.
2. `route(x, h, ctx)` (hook): the layer's named per-token scores, the gate of the executed tokens' updates and the
   logits of the routers that learn Top-K, as a `Route`.
3. The tokens, for the routing mode in force: Top-K over the score named `ranked_score`, computed once, is what
   "topk" executes and the target the Top-K learners train on; a causal mode compares the score that
   `causal_scores[mode]` names with its owner's calibrated threshold ("budget": with one that holds each
   sequence's executed share at the capacity, sdt.routing.selection).
4. `execute_tokens`: the routed block on those tokens, the gate applied; the skip map's estimate for the others.
   With `model.routed_sublayer` attention or mlp, only that sub-layer of the routed block is routed (gate and skip
   map apply to its update) and the other sub-layer runs on every token: the MLP after the routed attention, or the
   attention (writing every token's K/V) before the routed MLP.
5. Losses and statistics: the executed share, the architecture's own (`own_losses_and_stats` hook), and for each
   router that learns Top-K (`topk_learners`) its threshold, and against the Top-K mask its BCE and accuracy.
   A decoding step without diagnostics skips this step; Top-K is never computed while decoding (it ranks the
   whole sequence).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from sdt.blocks.layers import Block
from sdt.models.config import ModelConfig, RoutedSublayer
from sdt.models.layer_io import ForwardContext, LayerOutput
from sdt.routing import (
    PriorFFN,
    SkipMap,
    SurpriseGate,
    all_tokens,
    budget_decide,
    classification_stats,
    execute_tokens,
    router_bce,
    select_tokens,
    topk_membership,
)
from sdt.routing.execution import RoutedFunction
from sdt.routing.gates import GateMode
from sdt.routing.stats import masked_mean


@dataclass
class Route:
    """What a routed architecture computes before its tokens are chosen (its `route` hook)."""

    # Score name -> (B, T), compared with the threshold of `score_owners()[name]`; reported detached in LayerOutput.
    scores: dict[str, Tensor]
    # Score name -> (B, T) logit of a router that learns Top-K membership (`RoutedLayer.topk_learners`).
    logits: dict[str, Tensor] = field(default_factory=dict)
    gate: Tensor | None = None  # (B, T) applied to the executed tokens' updates; None: the full update
    gate_mode: GateMode = "ste"
    signals: Any = None  # what the layer's `own_losses_and_stats` reads (SDT, STT: the surprise signals)


class RoutedLayer(nn.Module):
    """The routed forward (this module's docstring), and what every routed layer is to the model around it: a
    capacity in force, the leading positions it always executes, a KV share, and named routing scores, each owned by
    a module that holds the score's calibrated `threshold` and its `quantiles` grid (the run-time capacity dial).

    A subclass builds its routed block (`self.block`, or another one named by `routed_block`) and implements
    `score_owners` and `route`; it names the score Top-K ranks (`ranked_score`), the score each causal mode it offers
    thresholds (`causal_scores`), and the routers that learn Top-K with the name of their BCE loss (`topk_learners`).
    """

    n_blocks = 1  # backbone layers this unit spans (an SDT pair: 2)
    routed_slot = 0  # the routed block's KV cache sub-slot (an SDT pair: 1, after its decision block)
    ranked_score: ClassVar[str]  # the score Top-K ranks (its owner's threshold serves the "threshold" mode)
    causal_scores: ClassVar[Mapping[str, str]]  # causal mode -> the score it thresholds; a mode not named is refused
    topk_learners: ClassVar[Mapping[str, str]] = {}  # score name -> its auxiliary loss: a BCE against Top-K

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.capacity = cfg.capacity  # the one in force: the run-time dial (set_inference_capacity) moves it
        self.always_first = cfg.always_execute_first
        self.routed_sublayer: RoutedSublayer = cfg.routed_sublayer
        # Routed queries attend to every earlier token (which all write K/V); moot when attention is not routed.
        self.full_context = cfg.routed_attention == "full" and cfg.routed_sublayer != "mlp"
        self.kv_every_token = cfg.routed_kv_every_token
        # What the tokens that skip the routed function get: None (nothing) or a linear estimate of its update.
        self.skip_map = SkipMap(cfg.d_model, cfg.rms_norm_eps) if cfg.skip_map == "linear" else None

    # --- hooks

    @property
    def routed_block(self) -> Block:
        """The block whose routed function (`routed_function`) this layer runs on the selected tokens only."""
        return self.block

    def score_owners(self) -> dict[str, nn.Module]:
        """Score name (as in LayerOutput.scores) -> the module holding its threshold and quantile grid."""
        raise NotImplementedError

    def routed_input(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """What the routed block reads, (B, T, D): x, unless the layer runs something on every token first."""
        return x

    def route(self, x: Tensor, h: Tensor, ctx: ForwardContext) -> Route:
        """Scores, gate and Top-K learners' logits from the layer input x and the routed block's input h."""
        raise NotImplementedError

    def own_losses_and_stats(
        self, route: Route, executed: Tensor, ctx: ForwardContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The architecture's own auxiliary losses (unweighted) and statistics, given the executed mask (B, T)."""
        return {}, {}

    # --- the forward

    @property
    def routed_function(self) -> RoutedFunction:
        """What runs on the selected tokens only, and what the skip map stands in for: the routed block, or one of
        its sub-layers (`model.routed_sublayer`)."""
        block = self.routed_block
        if self.routed_sublayer == "attention":
            return block.attention_sublayer
        if self.routed_sublayer == "mlp":
            return block.mlp_sublayer
        return block

    def forward(self, x: Tensor, ctx: ForwardContext) -> LayerOutput:
        h = self.routed_input(x, ctx)  # (B, T, D)
        block = self.routed_block
        if ctx.routing == "full":  # the routed block on every token, no gate: the layer's dense function
            out = block(h, ctx.positions, ctx.rope, cache=ctx.kv(self.routed_slot), pad_mask=ctx.pad_mask)
            return LayerOutput(hidden=out, decisions=all_tokens(x, ctx.pad_mask))
        route = self.route(x, h, ctx)
        topk_idx, topk_mask = self.topk_oracle(route, ctx)
        if ctx.routing == "topk" and topk_idx is not None:
            idx, valid = topk_idx, None
        else:  # a causal mode (select_tokens refuses Top-K while decoding, and a mode the layer does not offer)
            idx, valid = select_tokens(
                ctx.routing,
                capacity=self.capacity,
                positions_BT=ctx.positions,
                causal_decide=self.causal_decisions(route, ctx),
                pad_mask_BT=ctx.pad_mask,
                always_first=self.always_first,
                full_context=self.full_context,
            )
        routed_kv = None
        if self.routed_sublayer == "mlp":  # attention on every token, writing every token's K/V, then the routed MLP
            h = block.attention_sublayer(
                h, ctx.positions, ctx.rope, cache=ctx.kv(self.routed_slot), pad_mask=ctx.pad_mask
            )
        else:
            routed_kv = ctx.kv(self.routed_slot, self.kv_share)
        out, executed = execute_tokens(
            self.routed_function, h, ctx.positions, ctx.rope, idx, valid, route.gate, route.gate_mode,
            pad_mask_BT=ctx.pad_mask, cache=routed_kv, full_context=self.full_context, skip_map=self.skip_map,
        )  # fmt: skip
        if self.routed_sublayer == "attention":  # every token runs the MLP after the routed attention
            out = block.mlp_sublayer(out)
        scores = {name: score.detach() for name, score in route.scores.items()}
        if ctx.cache is not None and not ctx.diagnostics:  # a decoding step: no losses or statistics to log
            return LayerOutput(hidden=out, decisions=executed, scores=scores)
        aux, stats = self.losses_and_stats(route, executed, topk_mask, ctx)
        return LayerOutput(hidden=out, aux_losses=aux, stats=stats, decisions=executed, scores=scores)

    def topk_oracle(self, route: Route, ctx: ForwardContext) -> tuple[Tensor | None, Tensor | None]:
        """Top-K over the ranked score, (indices (B, K), mask (B, T)): what "topk" executes and what the Top-K
        learners train on. (None, None) while decoding (Top-K ranks the whole sequence), when the route has no
        ranked score (STT's student path), and in a causal mode without diagnostics (nothing reads it)."""
        score = route.scores.get(self.ranked_score)
        if score is None or ctx.cache is not None or not (ctx.routing == "topk" or ctx.diagnostics):
            return None, None
        return topk_membership(score.detach(), self.capacity, ctx.positions, self.always_first)

    def causal_decisions(self, route: Route, ctx: ForwardContext) -> dict[str, Tensor]:
        """{mode in force: (B, T) bool decisions} for a causal mode the layer offers and computed a score for; {}
        otherwise. Only the mode in force is computed: budget decisions advance the decoding state."""
        name = self.causal_scores.get(ctx.routing)
        if name not in route.scores:
            return {}
        score, owner = route.scores[name], self.score_owners()[name]
        if ctx.routing == "budget":
            decide = budget_decide(
                score, owner, capacity=self.capacity, positions_BT=ctx.positions, pad_mask_BT=ctx.pad_mask,
                always_first=self.always_first, cache_state=ctx.cache_state, key=(ctx.cache_key, "budget"),
            )  # fmt: skip
        else:
            decide = score >= owner.threshold
        return {ctx.routing: decide}

    def losses_and_stats(
        self, route: Route, executed: Tensor, topk_mask: Tensor | None, ctx: ForwardContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        aux, own_stats = self.own_losses_and_stats(route, executed, ctx)
        stats = {"executed_fraction": masked_mean(executed, ctx.pad_mask), **own_stats}
        owners = self.score_owners()
        learners = [name for name in self.topk_learners if name in route.logits]
        for name in learners:
            stats[f"{name}_threshold"] = owners[name].threshold
        if topk_mask is not None:
            for name in learners:
                aux[self.topk_learners[name]] = router_bce(route.logits[name], topk_mask, ctx.pad_mask)
            for name in learners:
                predicted = route.scores[name] >= owners[name].threshold
                stats.update({f"{name}_{k}": v for k, v in classification_stats(predicted, topk_mask).items()})
        return aux, stats

    # --- what the model reads and sets

    @property
    def kv_share(self) -> float:
        """Share of tokens the routed block writes to its KV cache: every token with full-context attention or when
        only the MLP is routed (attention runs on every token), else the capacity's share."""
        return 1.0 if self.kv_every_token else self.capacity

    def reset_routing_parameters(self) -> None:
        """Re-apply the own initialisation of the layer's priors / transition networks and skip map after the
        model's generic one: they start at zero, so a converted model starts as the pretrained one."""
        for module in self.modules():
            if isinstance(module, (PriorFFN, SkipMap)):
                module.reset_routing_parameters()

    def set_progress(self, progress: float) -> None:
        """Share of training done, in [0, 1], for the layer's surprise gates (scheduled betas)."""
        for module in self.modules():
            if isinstance(module, SurpriseGate):
                module.set_progress(progress)

    def thresholds(self) -> dict[str, Tensor]:
        """Calibrated thresholds by score name."""
        return {name: owner.threshold for name, owner in self.score_owners().items()}

    def score_quantiles(self) -> dict[str, Tensor]:
        """Calibrated quantile grids by score name (sdt.routing.quantiles)."""
        return {name: owner.quantiles for name, owner in self.score_owners().items()}
