"""Static-capacity Top-K: k = max(1, floor(gamma * T)), same k per row, indices sorted, decisions packed per row."""

import math
from fractions import Fraction

import pytest
import torch

from sdt.routing import capacity_k, indices_to_mask, pack_decisions, topk_indices


@pytest.mark.parametrize(
    "seq_len, capacity, expected",
    [
        (100, 0.29, 29),  # 0.29 * 100 = 28.999999999999996 in floating point
        (100, 0.57, 57),  # 56.99999999999999
        (10, 0.7, 7),  # 7.000000000000001
        (100, 0.5, 50),
        (7, 0.5, 3),
        (33, 0.3, 9),
        (10, 1.0, 10),
        (1, 1.0, 1),
        (1, 0.5, 1),
        (3, 0.34, 1),
        (10, 1e-6, 1),  # tiny capacity still executes one token
        (1000, 0.001, 1),
        (64, 0.125, 8),
    ],
)
def test_capacity_k_examples(seq_len, capacity, expected):
    assert capacity_k(seq_len, capacity) == expected


def test_capacity_k_matches_exact_decimal_floor():
    # The capacities as the user writes them (decimal strings), floored in exact rational arithmetic.
    for text in ("0.01", "0.1", "0.125", "0.2", "0.25", "0.29", "0.3", "0.33", "0.5", "0.57", "0.7", "0.9", "1"):
        for seq_len in (1, 2, 3, 7, 10, 16, 33, 100, 128, 1000, 4096):
            expected = max(1, math.floor(Fraction(text) * seq_len))
            assert capacity_k(seq_len, float(text)) == expected, (text, seq_len)


@pytest.mark.parametrize("k", [1, 4, 13])
def test_topk_indices_are_the_k_largest_sorted_ascending(k):
    g = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(13, generator=g).float() for _ in range(5)])  # distinct scores per row
    idx = topk_indices(scores, k)
    assert idx.shape == (5, k)  # the same k for every row
    assert (idx[:, 1:] > idx[:, :-1]).all()  # strictly ascending: time order
    for row in range(5):
        expected = set(torch.argsort(scores[row], descending=True)[:k].tolist())
        assert set(idx[row].tolist()) == expected
        mask = indices_to_mask(idx[row : row + 1], 13)[0]
        if k < 13:
            assert scores[row][mask].min() > scores[row][~mask].max()


def test_topk_indices_sorted_when_best_scores_are_late():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # topk returns these in score order: 5, 4, 3
    assert topk_indices(scores, 3).tolist() == [[3, 4, 5]]


def test_indices_to_mask_respects_valid():
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert indices_to_mask(idx, 6).sum(dim=1).tolist() == [3, 3]
    mask = indices_to_mask(idx, 6, valid)
    assert mask.tolist() == [
        [True, False, False, False, False, True],
        [False, True, False, True, True, False],
    ]


def test_pack_decisions_valid_flags_match_decisions():
    g = torch.Generator().manual_seed(1)
    decide = torch.rand(4, 11, generator=g) < 0.4
    decide[2] = False  # a row that executes nothing
    decide[3] = True  # and one that executes everything
    idx, valid = pack_decisions(decide)
    assert idx.shape == valid.shape == (4, 11)  # K = the largest count in a row
    assert (idx[:, 1:] > idx[:, :-1]).all()
    assert valid.sum(dim=1).tolist() == decide.sum(dim=1).tolist()
    assert torch.equal(indices_to_mask(idx, 11, valid), decide)
    assert torch.equal(torch.gather(decide, 1, idx), valid)

    decide = torch.zeros(3, 9, dtype=torch.bool)
    decide[0, [2, 7]] = True
    decide[1, 4] = True
    idx, valid = pack_decisions(decide)
    assert idx.shape == (3, 2)
    assert idx[0].tolist() == [2, 7] and valid[0].all()
    assert valid[1].sum() == 1 and idx[1][valid[1]].tolist() == [4]
    assert not valid[2].any()


def test_pack_decisions_none_when_nothing_executes():
    decide = torch.zeros(2, 5, dtype=torch.bool)
    assert pack_decisions(decide) is None
    idx, valid = pack_decisions(decide, min_k=1)
    assert idx.shape == (2, 1) and not valid.any()
