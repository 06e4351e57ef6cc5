"""Which tokens a routed layer executes: one selection rule for SDT, STT and MoD, in every routing mode.

- "topk" (training, and the non-causal oracle at evaluation): the k = max(1, floor(capacity * T)) highest scores of
  each sequence; static shapes.
- "threshold" / "student" (causal): the layer's per-token decision for that mode (its score against a calibrated
  threshold); rows are packed to a common K with invalid fillers.
In every mode the first `always_first` positions execute, counted inside k: pretrained models park attention on
the first token (the attention sink), and a routed layer that drops it from its context loses far more than the
token's own update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdt.routing.execution import causal_selection
from sdt.routing.topk import capacity_k, indices_to_mask, topk_indices

CAUSAL_MODES = ("threshold", "student")


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
    decisions. A mode whose input is missing is not available for this layer.
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
