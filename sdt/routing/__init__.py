"""Routing machinery shared by SDT, STT and MoD: Top-K, routed execution, gates, surprise, priors, students."""

from sdt.routing.execution import (
    causal_selection,
    execute_tokens,
    gather_tokens,
    run_routed_block,
    scatter_tokens,
)
from sdt.routing.gates import apply_gate
from sdt.routing.priors import PriorFFN
from sdt.routing.selection import (
    all_tokens,
    budget_decide,
    budget_decisions,
    leading_positions,
    select_tokens,
    topk_membership,
)
from sdt.routing.skip_maps import SkipMap, UpdateStatistics
from sdt.routing.students import CausalRouter, classification_stats, router_bce
from sdt.routing.surprise import SurpriseGate, SurpriseSignals, causal_moving_average, combine_gates
from sdt.routing.topk import capacity_k, indices_to_mask, pack_decisions, topk_indices

__all__ = [
    "CausalRouter",
    "PriorFFN",
    "SkipMap",
    "SurpriseGate",
    "SurpriseSignals",
    "UpdateStatistics",
    "all_tokens",
    "apply_gate",
    "budget_decide",
    "budget_decisions",
    "capacity_k",
    "causal_moving_average",
    "causal_selection",
    "classification_stats",
    "combine_gates",
    "execute_tokens",
    "gather_tokens",
    "indices_to_mask",
    "leading_positions",
    "pack_decisions",
    "router_bce",
    "run_routed_block",
    "scatter_tokens",
    "select_tokens",
    "topk_indices",
    "topk_membership",
]
