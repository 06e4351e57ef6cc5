"""Score quantile grids: the run-time capacity dial maps any capacity to the threshold calibration would give."""

import pytest
import torch

from sdt.models.calibration import quantile
from sdt.routing.quantiles import GRID_SIZE, empty_grid, is_calibrated, quantile_grid, threshold_at


def test_grid_levels_are_the_calibration_quantiles():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    grid = quantile_grid(x)
    assert grid.shape == (GRID_SIZE,)
    assert torch.all(grid[1:] >= grid[:-1])  # monotone
    for capacity in (0.125, 0.25, 0.5, 0.75, 0.999):
        # On a grid level the dial returns exactly the threshold calibrate_thresholds sets for that capacity.
        assert threshold_at(grid, capacity) == quantile(x, 1.0 - capacity)


@pytest.mark.parametrize("capacity", [0.05, 0.3333, 0.6, 0.9])
def test_threshold_executes_the_capacity_between_grid_levels(capacity):
    x = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    tau = threshold_at(quantile_grid(x), capacity)
    assert abs(float((x >= tau).float().mean()) - capacity) < 2e-3


def test_capacity_one_executes_everything_and_per_sequence_capacities_work():
    x = torch.randn(1000)
    grid = quantile_grid(x)
    assert threshold_at(grid, 1.0) == float("-inf")  # every token, even below the calibration minimum
    taus = threshold_at(grid, torch.tensor([0.25, 0.5, 0.75]))
    assert taus.shape == (3,) and taus[0] > taus[1] > taus[2]


def test_forced_positions_stay_infinite_and_grids_know_whether_they_are_calibrated():
    x = torch.cat([torch.full((100,), float("inf")), torch.rand(900)])  # 10% always execute
    grid = quantile_grid(x)
    assert threshold_at(grid, 0.05) == float("inf")  # below the forced share nothing else is admitted
    assert torch.isfinite(threshold_at(grid, 0.5))
    assert not torch.isnan(threshold_at(grid, 0.0999)).any()
    assert is_calibrated(grid) and not is_calibrated(empty_grid())
