"""Budget routing: causal per-sequence decisions whose executed share stays within 2 points of the capacity."""

import pytest
import torch

from sdt.routing.quantiles import quantile_grid
from sdt.routing.selection import BUDGET_MIN_TOKENS, budget_decisions


def run(score, capacity, grid=None, **kw):
    return budget_decisions(score, capacity=capacity, threshold=torch.tensor(0.5), grid=grid, **kw)


def adversarial_scores(B: int, T: int) -> torch.Tensor:
    """Texts whose scores drift far from the calibration data: long runs of all-high and all-low scores, a ramp,
    constant scores, and noise."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T).float()
    rows = [
        torch.ones(T),
        torch.zeros(T),
        ((t // 50) % 2).float(),
        t / T,
        torch.full((T,), 0.5),
        torch.rand(T, generator=g),
        torch.rand(T, generator=g) ** 8,
    ]
    return torch.stack([rows[i % len(rows)] for i in range(B)])


@pytest.mark.parametrize("capacity", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("calibrated", [True, False])
def test_every_prefix_of_64_tokens_or_more_is_within_two_points(capacity, calibrated):
    score = adversarial_scores(14, 400)
    grid = quantile_grid(torch.rand(5000)) if calibrated else None
    decide, (seen, done) = run(score, capacity, grid)
    prefix_fraction = decide.double().cumsum(dim=1) / torch.arange(1, 401)
    assert (prefix_fraction[:, BUDGET_MIN_TOKENS - 1 :] - capacity).abs().max() <= 0.02
    assert torch.equal(seen, torch.full((14,), 400.0, dtype=torch.float64))
    assert torch.equal(done, decide.sum(dim=1).double())


def test_decisions_follow_the_scores_inside_the_budget():
    # With a calibrated grid, a noisy text is routed by its scores: the executed tokens score higher.
    score = torch.rand(4, 300, generator=torch.Generator().manual_seed(2))
    decide, _ = run(score, 0.3, quantile_grid(torch.rand(5000)))
    assert score[decide].mean() > score[~decide].mean() + 0.3


def test_chunked_calls_with_state_equal_one_call():
    # Cached decoding feeds a prompt, then one token at a time, carrying the counts: the same decisions.
    score = adversarial_scores(7, 130)
    grid = quantile_grid(torch.rand(1000))
    whole, _ = run(score, 0.4, grid)
    state, parts = None, []
    for chunk in (score[:, :10], *score[:, 10:].split(1, dim=1)):
        part, state = run(chunk, 0.4, grid, state=state)
        parts.append(part)
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_padding_neither_executes_nor_counts_and_forced_positions_count():
    score = torch.zeros(2, 100)
    pad = torch.ones(2, 100, dtype=torch.bool)
    pad[0, :30] = False  # row 0: 30 slots of left padding
    forced = torch.zeros(2, 100, dtype=torch.bool)
    forced[0, 30] = forced[1, 0] = True  # the first real token of each row
    decide, (seen, _) = run(score, 0.25, pad_mask_BT=pad, forced_BT=forced)
    assert not decide[0, :30].any() and decide[0, 30] and decide[1, 0]
    assert seen.tolist() == [70.0, 100.0]
    # The unpadded tail of row 0 decides exactly as a 70-token sequence alone.
    alone, _ = run(score[:1, 30:], 0.25, forced_BT=forced[:1, 30:])
    assert torch.equal(decide[0, 30:], alone[0])
