"""Token selection shared by SDT, STT and MoD: Top-K, causal modes and the always-executed leading positions."""

import pytest
import torch

from sdt.routing import capacity_k, indices_to_mask, select_tokens


def positions(B: int, T: int) -> torch.Tensor:
    return torch.arange(T).expand(B, T)


def test_topk_keeps_exactly_k_with_the_leading_positions_inside_k():
    torch.manual_seed(0)
    scores = torch.rand(3, 16)
    scores[:, :2] = -1.0  # the lowest scores: only the forcing can select them
    idx, valid = select_tokens(
        "topk", capacity=0.25, positions_BT=positions(3, 16), topk_score_BT=scores, always_first=2
    )
    assert valid is None and idx.shape == (3, capacity_k(16, 0.25))  # k = 4, forced ones included
    mask = indices_to_mask(idx, 16)
    assert mask[:, :2].all()
    # The other k - 2 slots are the highest-scoring remaining tokens.
    rest = scores[:, 2:].topk(2, dim=1).indices + 2
    assert torch.equal(mask.nonzero()[:, 1].view(3, 4)[:, 2:].sort(dim=1).values, rest.sort(dim=1).values)


def test_without_forcing_topk_is_plain_topk():
    scores = torch.rand(2, 10)
    idx, _ = select_tokens("topk", capacity=0.3, positions_BT=positions(2, 10), topk_score_BT=scores)
    assert torch.equal(idx, scores.topk(3, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("mode", ["threshold", "student", "budget"])
def test_causal_modes_execute_the_leading_positions_and_their_decisions(mode):
    decide = torch.zeros(2, 8, dtype=torch.bool)
    decide[0, 5] = True
    idx, valid = select_tokens(
        mode, capacity=0.5, positions_BT=positions(2, 8), causal_decide={mode: decide}, always_first=1
    )
    executed = indices_to_mask(idx, 8, valid)
    expected = decide.clone()
    expected[:, 0] = True
    assert torch.equal(executed, expected)


def test_forcing_follows_absolute_positions_in_decoding():
    # One decoding step at position 7: not a leading position, so only the decision counts.
    decide = torch.zeros(1, 1, dtype=torch.bool)
    out = select_tokens(
        "threshold", capacity=0.5, positions_BT=torch.tensor([[7]]), causal_decide={"threshold": decide}, always_first=4
    )
    assert out == (None, None)
    idx, valid = select_tokens(
        "threshold", capacity=0.5, positions_BT=torch.tensor([[3]]), causal_decide={"threshold": decide}, always_first=4
    )
    assert bool(valid.all()) and idx.tolist() == [[0]]


def test_padding_never_executes_even_when_forced():
    pad = torch.tensor([[False, False, True, True]])
    pos = torch.tensor([[0, 0, 0, 1]])  # left padding: pad slots get position 0
    idx, valid = select_tokens(
        "student",
        capacity=0.5,
        positions_BT=pos,
        causal_decide={"student": torch.zeros(1, 4, dtype=torch.bool)},
        pad_mask_BT=pad,
        always_first=1,
    )
    assert indices_to_mask(idx, 4, valid).tolist() == [[False, False, True, False]]


def test_a_mode_the_layer_does_not_offer_is_refused():
    with pytest.raises(ValueError, match="not available"):
        select_tokens("student", capacity=0.5, positions_BT=positions(1, 4), causal_decide={"threshold": None})
    with pytest.raises(ValueError, match="not causal"):
        select_tokens("topk", capacity=0.5, positions_BT=positions(1, 4))
