"""Static-capacity Top-K routing: every sequence keeps exactly k = max(1, floor(capacity * T)) tokens.

The same k for every row keeps shapes static (no host synchronisation, compilable). Indices are sorted ascending so
that the gathered tokens are in time order and a causal mask over them is a causal mask over positions.
Legend: B batch, T tokens, K selected tokens per row.

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def capacity_k(seq_len: int, capacity: float) -> int:
    """Tokens kept per sequence: max(1, floor(capacity * T))."""
    # The small epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return max(1, min(seq_len, math.floor(capacity * seq_len + 1e-9)))


def topk_indices(scores_BT: Tensor, k: int) -> Tensor:
    """(B, T) scores -> (B, K) indices of the k highest scores of each row, sorted ascending (time order).

    Ties go to the earlier position. torch.topk leaves them to the kernel (CPU and CUDA pick differently), and ties
    do occur: a saturated sigmoid gate is exactly 1.0 for many tokens, even in fp32. A stable sort makes the choice
    the same on every device and in every recomputation (activation checkpointing re-runs the selection).
    """
    idx_BK = torch.sort(scores_BT, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(idx_BK, dim=1).values


def indices_to_mask(idx_BK: Tensor, seq_len: int, valid_BK: Tensor | None = None) -> Tensor:
    """(B, K) indices -> (B, T) bool mask of the selected tokens (only the valid ones, when given)."""
    mask_BT = torch.zeros(idx_BK.shape[0], seq_len, dtype=torch.bool, device=idx_BK.device)
    src = torch.ones_like(idx_BK, dtype=torch.bool) if valid_BK is None else valid_BK
    return mask_BT.scatter(1, idx_BK, src)


def pack_decisions(decide_BT: Tensor, min_k: int = 0) -> tuple[Tensor, Tensor] | None:
    """Per-token causal decisions (B, T) bool -> (idx (B, K), valid (B, K)) with K the largest count in a row.

    Used by the causal inference modes, where each row executes a different number of tokens, and there by skip
    maps. Rows with fewer than K executed tokens are filled with unexecuted positions marked invalid (excluded from
    attention and left unchanged). Returns None when no token executes and `min_k` is 0. Reads K on the host.
    """
    k = max(int(decide_BT.sum(dim=1).max()), min_k)
    if k == 0:
        return None
    if decide_BT.shape[1] == 1:  # one token per row (a decoding step): nothing to rank
        return torch.zeros_like(decide_BT, dtype=torch.long), decide_BT
    # Executed tokens score 1 and win; the fillers are the earliest unexecuted positions (topk_indices' tie rule).
    idx_BK = topk_indices(decide_BT.float(), k)
    return idx_BK, torch.gather(decide_BT, 1, idx_BK)
