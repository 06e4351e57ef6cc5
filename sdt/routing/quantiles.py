"""Score quantile grids: the run-time capacity dial of a calibrated routed layer.

Calibration stores, next to each causal threshold, the quantiles of the score it thresholds at `GRID_SIZE` evenly
spaced levels (0, 1/(G-1), ..., 1) as a buffer, so the checkpoint carries them. Executing the share c of tokens
means thresholding at the (1 - c) quantile, so any capacity in (0, 1] maps to a threshold by one lookup, with no
retraining and no pass over data. An uncalibrated grid holds NaN.

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRID_SIZE = 1001  # quantile levels 0, 0.001, ..., 1: a capacity resolution of 0.1 percentage point


def empty_grid() -> Tensor:
    """(GRID_SIZE,) NaN: the buffer an uncalibrated threshold owner registers."""
    return torch.full((GRID_SIZE,), float("nan"))


def is_calibrated(grid: Tensor) -> bool:
    return not bool(torch.isnan(grid).any())


def quantile_grid(scores: Tensor, size: int = GRID_SIZE) -> Tensor:
    """(size,) quantiles of a 1-D tensor at levels j / (size - 1), by the lower-rank rule of
    `sdt.models.calibration.quantile` (so the grid at 1 - c is exactly the threshold calibrated at capacity c)."""
    x = scores.float().flatten().sort().values
    n = x.numel()
    levels = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    ranks = (levels * n).round().long().clamp(1, n)  # 1-based ranks, as kthvalue takes them
    return x[ranks - 1]


def threshold_at(grid: Tensor, capacity: float | Tensor) -> Tensor:
    """The threshold that executes the share `capacity` of tokens: the grid linearly interpolated at 1 - capacity.

    `capacity` may be a tensor (one per sequence, as the budget mode asks). Capacity 1 gives -inf. An infinite grid value (positions that
    always execute enter calibration as +inf) stays infinite: nothing else is admitted there.
    """
    q = 1.0 - torch.as_tensor(capacity, dtype=torch.float64, device=grid.device).clamp(0.0, 1.0)
    pos = q * (grid.numel() - 1)
    lo = pos.floor().long().clamp(0, grid.numel() - 1)
    hi = (lo + 1).clamp(max=grid.numel() - 1)
    frac = (pos - lo).to(grid.dtype)
    a, b = grid[lo], grid[hi]
    mixed = torch.where((frac > 0) & (a != b), a + frac * (b - a), a)
    # Capacity 1 executes every token, also those scoring below anything calibration saw.
    return torch.where(q <= 0, torch.full_like(mixed, float("-inf")), mixed)
