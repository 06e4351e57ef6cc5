"""Which tokens a routed layer executes: one selection rule for SDT, STT and MoD, in every routing mode.

- "topk" (training, and the non-causal oracle at evaluation): the k = max(1, floor(capacity * T)) highest scores of
  each sequence; static shapes.
- "threshold" / "student" (causal): the layer's per-token decision for that mode (its score against a calibrated
  threshold); rows are packed to a common K with invalid fillers.
- "budget" (causal): the score of the layer's own causal mode against a threshold that follows each sequence's
  running count of executed tokens, inside a band that holds the executed share of every sequence of 64 tokens or
  more within 2 percentage points of the capacity (`budget_decisions`).
In every mode the first `always_first` positions execute, counted inside k: pretrained models park attention on
the first token (the attention sink), and a routed layer that drops it from its context loses far more than the
token's own update.
"""

from __future__ import annotations

from collections.abc import Hashable, MutableMapping
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from sdt.routing.execution import causal_selection
from sdt.routing.quantiles import is_calibrated, threshold_at
from sdt.routing.topk import capacity_k, indices_to_mask, topk_indices

# topk: the k best scores of the whole sequence (training; not causal) | threshold: the layer's own score against its
# calibrated threshold | student: a causal router's score | budget: the own score against a threshold that holds the
# executed share of each sequence at the capacity
RoutingMode = Literal["topk", "threshold", "student", "budget"]
CausalMode = Literal["threshold", "student", "budget"]
ROUTING_MODES: tuple[RoutingMode, ...] = get_args(RoutingMode)
CAUSAL_MODES: tuple[CausalMode, ...] = get_args(CausalMode)

# Budget mode: |executed - capacity * n| <= BUDGET_TOLERANCE * max(n, BUDGET_MIN_TOKENS) tokens after n real tokens of
# a sequence, so from 64 tokens on the executed share is within 1.95 points of the capacity (the target is 2).
BUDGET_TOLERANCE = 0.0195
BUDGET_MIN_TOKENS = 64
# Inside the band, a deficit (or surplus) of one token moves the threshold to the quantile of capacity +- 1/16:
# the running count is made up over about this many tokens instead of at the band's edge.
BUDGET_HORIZON = 16.0


def leading_positions(positions_BT: Tensor, always_first: int) -> Tensor | None:
    """(B, T) bool mask of the positions below `always_first`, or None when there are none to force."""
    return positions_BT < always_first if always_first > 0 else None


def select_tokens(
    routing: str,
    *,
    capacity: float,
    positions_BT: Tensor,
    topk_score_BT: Tensor | None = None,
    causal_decide: dict[str, Tensor] | None = None,
    pad_mask_BT: Tensor | None = None,
    always_first: int = 0,
    full_context: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(idx (B, K), valid (B, K) or None) for `execute_tokens`; (None, None) when no token executes.

    `topk_score_BT` is what Top-K ranks (detached); `causal_decide` maps each causal mode to its (B, T) bool
    decisions (budget: from `budget_decide`). A mode whose input is missing is not available for this layer.
    """
    forced = leading_positions(positions_BT, always_first)
    if routing == "topk":
        if topk_score_BT is None:
            raise ValueError("topk routing is not causal and cannot be used for cached decoding")
        score = topk_score_BT if forced is None else topk_score_BT.masked_fill(forced, float("inf"))
        return topk_indices(score, capacity_k(score.shape[1], capacity)), None
    if routing in CAUSAL_MODES and causal_decide is not None and routing in causal_decide:
        decide = causal_decide[routing]
        if forced is not None:
            decide = decide | forced
        return causal_selection(decide, pad_mask_BT, full_context)
    raise ValueError(f"routing mode {routing!r} is not available for this layer")


def topk_membership(
    score_BT: Tensor, capacity: float, positions_BT: Tensor, always_first: int = 0
) -> tuple[Tensor, Tensor]:
    """Top-K indices (B, K) and mask (B, T) as training selects them: the students' target."""
    idx, _ = select_tokens(
        "topk", capacity=capacity, positions_BT=positions_BT, topk_score_BT=score_BT, always_first=always_first
    )
    return idx, indices_to_mask(idx, score_BT.shape[1])


def all_tokens(x_BTD: Tensor, pad_mask_BT: Tensor | None) -> Tensor:
    """(B, T) executed mask of routing="full": every real token."""
    ones = torch.ones(x_BTD.shape[:2], dtype=torch.bool, device=x_BTD.device)
    return ones if pad_mask_BT is None else ones & pad_mask_BT


BudgetState = tuple[Tensor, Tensor]  # per sequence (B,) float64: real tokens seen, tokens executed


@torch.no_grad()
def budget_decisions(
    score_BT: Tensor,
    *,
    capacity: float,
    threshold: Tensor,
    grid: Tensor | None = None,
    pad_mask_BT: Tensor | None = None,
    forced_BT: Tensor | None = None,
    state: BudgetState | None = None,
) -> tuple[Tensor, BudgetState]:
    """Causal per-sequence budget: (B, T) bool decisions and the running counts to continue from.

    Token t of a sequence that has seen n real tokens (t included) and executed e before t:
    - must execute when e < capacity * n - w, must skip when e + 1 > capacity * n + w, w = BUDGET_TOLERANCE *
      max(n, BUDGET_MIN_TOKENS) (w >= 1.25 tokens, so the two never clash and e stays in the band);
    - otherwise executes when its score reaches the threshold of the capacity corrected by the running deficit,
      capacity + (capacity * n - e) / BUDGET_HORIZON, read from the quantile `grid` (the fixed calibrated
      `threshold` when the layer has no grid).
    Forced positions (`forced_BT`) execute and count. Padding neither executes nor counts. Sequential over T, so a
    full forward and cached decoding (which carries `state`) take the same decisions.
    """
    B, T = score_BT.shape
    device = score_BT.device
    if state is None:
        state = (torch.zeros(B, dtype=torch.float64, device=device), torch.zeros(B, dtype=torch.float64, device=device))
    seen, done = state
    use_grid = grid is not None and is_calibrated(grid)
    real_BT = torch.ones(B, T, dtype=torch.bool, device=device) if pad_mask_BT is None else pad_mask_BT.bool()
    score = score_BT.float()
    columns = []
    for t in range(T):
        real = real_BT[:, t]
        seen = seen + real.double()
        target = capacity * seen
        slack = BUDGET_TOLERANCE * seen.clamp(min=BUDGET_MIN_TOKENS)
        must = done < target - slack
        may = done + 1 <= target + slack
        if use_grid:
            tau = threshold_at(grid, (capacity + (target - done) / BUDGET_HORIZON).clamp(0.0, 1.0))
        else:
            tau = threshold
        decide = must | (may & (score[:, t] >= tau))
        if forced_BT is not None:
            decide = decide | forced_BT[:, t]
        decide = decide & real
        done = done + decide.double()
        columns.append(decide)
    return torch.stack(columns, dim=1), (seen, done)


def budget_decide(
    score_BT: Tensor,
    owner: nn.Module,
    *,
    capacity: float,
    positions_BT: Tensor,
    pad_mask_BT: Tensor | None,
    always_first: int,
    cache_state: MutableMapping[Hashable, object] | None,
    key: Hashable,
) -> Tensor:
    """A routed layer's budget decisions on the score that `owner` (its router or gate) thresholds, continuing
    from and updating the running counts in `cache_state[key]` when decoding."""
    decide, state = budget_decisions(
        score_BT,
        capacity=capacity,
        threshold=owner.threshold,
        grid=getattr(owner, "quantiles", None),
        pad_mask_BT=pad_mask_BT,
        forced_BT=leading_positions(positions_BT, always_first),
        state=cache_state.get(key) if cache_state is not None else None,
    )
    if cache_state is not None:
        cache_state[key] = state
    return decide
