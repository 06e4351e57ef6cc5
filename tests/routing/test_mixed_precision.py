"""Routing under autocast (bf16-mixed, 16-mixed): every score a routing decision reads is computed in fp32, so the
same hidden states give the same decisions as in an fp32 run, and Top-K breaks ties the same way everywhere.

What autocast may round (the blocks, the prior's prediction) changes the hidden states themselves, as it does for a
dense model; what must not be rounded is the score ranked or thresholded: the MoD router's r, the students' logits
and the surprise gate's g (docs/gpu.md, "Where fp32 is kept")."""

from __future__ import annotations

import pytest
import torch

from sdt.models import build_model
from sdt.routing import CausalRouter, SurpriseGate, topk_indices
from sdt.routing.routers import LinearRouter
from tests.models.conftest import random_ids, tiny_config

HALF = [torch.bfloat16, torch.float16]


def hidden(seed: int = 0, shape: tuple[int, ...] = (4, 256, 64)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_topk_ties_go_to_the_earliest_positions():
    scores = torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.2, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert topk_indices(scores, 3).tolist() == [[0, 2, 3], [0, 1, 2]]
    # A saturated gate: every score is exactly 1.0 past the first token; the earliest k - 1 of them join it.
    g = torch.ones(2, 64)
    g[:, 0] = 2.0
    assert topk_indices(g, 8).tolist() == [list(range(8))] * 2


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("module", ["mod_router", "student", "student_norm"])
def test_router_scores_under_autocast_are_the_fp32_scores(module, dtype):
    torch.manual_seed(0)
    scorer = {
        "mod_router": lambda: LinearRouter(64),
        "student": lambda: CausalRouter(64, 32),
        "student_norm": lambda: CausalRouter(64, 32, normalize=True),
    }[module]()
    x = hidden()
    reference = scorer(x)
    with torch.autocast("cpu", dtype=dtype):
        mixed = scorer(x)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, reference)
    # Rounded to half precision, scores of 1024 tokens collide and Top-K / thresholds would cut through ties.
    assert mixed.unique().numel() == mixed.numel()
    k = 100
    assert torch.equal(topk_indices(mixed, k), topk_indices(reference, k))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("change", ["mse", "kl"])
def test_surprise_gate_under_autocast_is_the_fp32_gate(change, dtype):
    """g and the signals it is built from (squared norms over D, the causal moving average's cumulative sums) stay
    fp32 under autocast, whether the block's update arrives in fp32 or, as autocast's matmuls return it, in half."""
    gate = SurpriseGate(tiny_config("sdt", change_surprise=change, ma_window=16))
    delta, delta_hat, logvar = hidden(1), 0.5 * hidden(2), 0.1 * hidden(3) if change == "kl" else None
    reference, _ = gate(delta, delta_hat, logvar)
    with torch.autocast("cpu", dtype=dtype):
        mixed, _ = gate(delta, delta_hat, logvar)
        from_half, _ = gate(delta.to(dtype), delta_hat.to(dtype), None if logvar is None else logvar.to(dtype))
    for name in ("d_st", "d_ch", "cu", "g"):
        assert getattr(mixed, name).dtype == torch.float32, name
        assert torch.equal(getattr(mixed, name), getattr(reference, name)), name
        assert getattr(from_half, name).dtype == torch.float32, name
    # Half-precision inputs change g only by the rounding of the inputs, not by rounding in the surprise math.
    ref_half, _ = gate(
        delta.to(dtype).float(), delta_hat.to(dtype).float(), None if logvar is None else logvar.to(dtype).float()
    )
    assert torch.equal(from_half.g, ref_half.g)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["sdt", "stt", "mod"])
def test_routed_models_return_fp32_scores_and_static_capacity_under_autocast(arch, dtype):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, skip_map="linear"))
    ids = random_ids(2, 64)
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert out.scores, "routed layers report their scores"
    for layer_scores in out.scores.values():
        for name, score in layer_scores.items():
            assert score.dtype == torch.float32, name
    for decisions in out.decisions.values():  # Top-K keeps exactly k per row under autocast too
        assert (decisions.sum(dim=1) == 32).all()
