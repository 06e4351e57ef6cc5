"""Threshold calibration: executed fraction in the causal modes matches the capacity; thresholds are checkpointed."""

import pytest
import torch

from sdt.models import build_model
from sdt.models.calibration import calibrate_thresholds, quantile
from tests.conftest import tiny_model_config


def sdt_model(spread: bool = True, **kw):
    """spread: larger init and beta, so the gate g takes well-separated values (see the untrained-model test)."""
    base = {"arch": "sdt", "vocab_size": 97}
    if spread:
        base.update(init_std=0.2, beta_init=5.0)
    base.update(kw)
    torch.manual_seed(0)
    return build_model(tiny_model_config(**base))


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 32), generator=g) for _ in range(n)]


def executed_fraction(model, data, mode: str) -> dict[int, float]:
    counts: dict[int, float] = {}
    for ids in data:
        for i, dec in model(ids, routing=mode).decisions.items():
            counts[i] = counts.get(i, 0.0) + dec.float().sum().item()
    n = sum(ids.numel() for ids in data)
    return {i: c / n for i, c in counts.items()}


def test_quantile_is_an_order_statistic():
    x = torch.randperm(10).float()
    assert quantile(x, 0.5) == 4  # the 5th smallest
    assert quantile(x, 0.0) == 0 and quantile(x, 1.0) == 9
    assert quantile(x, 0.75) == 7  # round(7.5) = 8th smallest


@pytest.mark.parametrize("capacity", [0.25, 0.5, 0.75])
def test_calibrated_fraction_matches_capacity(capacity):
    model = sdt_model(capacity=capacity).eval()
    data = batches()
    result = calibrate_thresholds(model, data)
    layer = model.layers[0]
    assert result[0]["gate"] == pytest.approx(layer.surprise.threshold.item())
    assert result[0]["student"] == pytest.approx(layer.student.threshold.item())
    for mode in ("threshold", "student"):
        fraction = executed_fraction(model, data, mode)[0]
        # 512 calibration tokens with distinct scores: the quantile rule is exact up to one token.
        assert abs(fraction - capacity) <= 2 / 512, (mode, fraction)


def test_calibration_of_deeper_pairs_is_exact_in_the_causal_mode():
    # Deeper pairs are calibrated on the inputs the causal mode gives them (layers below already routing causally),
    # so every pair, not only the first, executes the capacity on the calibration data.
    model = sdt_model(n_layers=6).eval()
    data = batches()
    calibrate_thresholds(model, data)
    for mode in ("threshold", "student"):
        for i, fraction in executed_fraction(model, data, mode).items():
            assert abs(fraction - 0.5) <= 2 / 512, (mode, i, fraction)


def test_capacity_override_and_training_mode_restored():
    model = sdt_model().train()
    data = batches()
    calibrate_thresholds(model, data, capacity=0.25)
    assert model.training
    model.eval()
    assert abs(executed_fraction(model, data, "threshold")[0] - 0.25) <= 2 / 512


def test_untrained_model_ties_overshoot_but_never_undershoot():
    """With the default init an untrained model's g is nearly constant (the prior predicts 0, so CE is the same
    for every token, and the tiny updates barely move S_CU): many tokens tie at the threshold and `g >= tau`
    executes all of them, so the fraction overshoots the capacity. The quantile rule never undershoots."""
    model = sdt_model(spread=False).eval()
    data = batches()
    calibrate_thresholds(model, data)
    g = torch.cat([model(ids, routing="topk").scores[0]["gate"].flatten() for ids in data])
    assert g.std() < 1e-5  # the premise: g is (nearly) constant
    assert executed_fraction(model, data, "threshold")[0] >= 0.5


def test_thresholds_are_checkpointed():
    model = sdt_model(n_layers=4).eval()
    data = batches()
    result = calibrate_thresholds(model, data)
    state = model.state_dict()
    for i in (0, 1):
        assert state[f"layers.{i}.surprise.threshold"].item() == pytest.approx(result[i]["gate"])
        assert state[f"layers.{i}.student.threshold"].item() == pytest.approx(result[i]["student"])
        assert result[i]["gate"] != 0.5 and result[i]["student"] != 0.5  # moved from the defaults
    fresh = sdt_model(n_layers=4, init_std=0.02).eval()
    fresh.load_state_dict(state)
    for mode in ("threshold", "student"):
        a, b = model(data[0], routing=mode), fresh(data[0], routing=mode)
        for i in a.decisions:
            assert torch.equal(a.decisions[i], b.decisions[i])
        torch.testing.assert_close(a.logits, b.logits)


# --- The run-time capacity dial -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sdt", "mod"])
def test_inference_capacity_dial_executes_each_capacity_without_recalibration(arch):
    # Calibrated once at the default capacity; the grids in the checkpoint give every other capacity at once.
    model = sdt_model(arch=arch, n_layers=4 if arch == "mod" else 2)
    data = batches(8)
    calibrate_thresholds(model, data)
    modes = ("threshold", "student")
    for capacity in (0.125, 0.25, 0.75, 1.0):
        model.set_inference_capacity(capacity)
        assert model.capacity_in_force == capacity
        for mode in modes:
            first = min(executed_fraction(model, data, mode).items())[1]  # the first routed layer's inputs are fixed
            assert abs(first - capacity) <= 2 / (8 * 4 * 32)


def test_dial_matches_a_calibration_at_that_capacity_and_survives_the_checkpoint():
    model = sdt_model()
    data = batches()
    calibrate_thresholds(model, data, capacity=0.5)
    state = model.state_dict()
    fresh = sdt_model()
    fresh.load_state_dict(state)
    fresh.set_inference_capacity(0.25)
    reference = sdt_model()
    reference.load_state_dict(state)
    calibrate_thresholds(reference, data, capacity=0.25)
    # The first pair's scores do not depend on the capacity: the dial equals a recalibration there.
    assert fresh.layers[0].surprise.threshold.item() == pytest.approx(reference.layers[0].surprise.threshold.item())
    assert fresh.layers[0].student.threshold.item() == pytest.approx(reference.layers[0].student.threshold.item())


def test_dial_refuses_bad_capacities_and_uncalibrated_models():
    from sdt.common.errors import UserError

    model = sdt_model()
    with pytest.raises(UserError, match="quantile grid"):
        model.set_inference_capacity(0.5)
    calibrate_thresholds(model, batches())
    for bad in (0.0, 1.5, -0.2, True, "0.5"):
        with pytest.raises(UserError, match=r"capacity must be a number in \(0, 1\]"):
            model.set_inference_capacity(bad)


def test_generate_at_a_capacity_restores_the_model_afterwards():
    model = sdt_model().eval()
    calibrate_thresholds(model, batches())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = batches(1)[0][:1, :8]
    low = model.generate(prompt, 20, temperature=0.0, capacity=0.125)
    assert model.capacity_in_force == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.set_inference_capacity(0.125)
    assert torch.equal(model.generate(prompt, 20, temperature=0.0), low)


def test_forced_leading_positions_are_counted_in_the_dial():
    model = sdt_model(always_execute_first=4)
    data = batches(8)
    calibrate_thresholds(model, data)
    model.set_inference_capacity(0.25)
    for mode in ("threshold", "student", "budget"):
        out = model(data[0], routing=mode)
        assert out.decisions[0][:, :4].all()
    first = executed_fraction(model, data, "threshold")[0]
    assert abs(first - 0.25) <= 2 / (8 * 4 * 32)
