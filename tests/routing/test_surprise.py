"""Surprise math (docs/algorithms.md, section 2): static/change surprise, CE, CU, S_CE, S_CU, g, the causal moving average, beta."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sdt.models import ModelConfig, build_model
from sdt.routing import SurpriseGate, causal_moving_average, combine_gates
from sdt.routing.surprise import change_surprise_kl, change_surprise_mse, static_surprise
from tests.conftest import tiny_model_config


def cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{"arch": "sdt", "vocab_size": 97, **kw})


def test_static_and_mse_change_surprise_by_hand():
    delta = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    delta_hat = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    torch.testing.assert_close(static_surprise(delta), torch.tensor([[2.5, 12.5]]))
    torch.testing.assert_close(change_surprise_mse(delta, delta_hat), torch.tensor([[0.5, 10.0]]))


def test_kl_change_surprise_is_the_gaussian_kl():
    torch.manual_seed(0)
    delta, delta_hat = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    logvar = torch.randn(2, 5, 8)
    # KL( N(delta, 1) || N(delta_hat, exp(logvar)) ) per dimension, averaged over dimensions.
    expected = kl_divergence(Normal(delta, 1.0), Normal(delta_hat, torch.exp(0.5 * logvar))).mean(dim=-1)
    torch.testing.assert_close(change_surprise_kl(delta, delta_hat, logvar), expected)
    # Shared unit variance: half the squared error, i.e. half the mse form.
    zero = torch.zeros_like(logvar)
    torch.testing.assert_close(change_surprise_kl(delta, delta_hat, zero), 0.5 * change_surprise_mse(delta, delta_hat))
    # The log-variance is clamped, so an extreme prediction stays finite.
    huge = torch.full_like(logvar, 1e4)
    out = change_surprise_kl(delta, delta_hat, huge)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, change_surprise_kl(delta, delta_hat, torch.full_like(logvar, 8.0)))
    assert torch.isfinite(change_surprise_kl(delta, delta_hat, -huge)).all()


def test_moving_average_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    mean, _ = causal_moving_average(x, 3)
    # t < window: the mean of the first t + 1 values (not padded with zeros or with x[0]).
    torch.testing.assert_close(mean, torch.tensor([[1.0, 1.5, 2.0, 3.0, 4.0]]))
    mean, _ = causal_moving_average(x, 1)
    torch.testing.assert_close(mean, x)
    mean, _ = causal_moving_average(x, 100)
    torch.testing.assert_close(mean, torch.tensor([[1.0, 1.5, 2.0, 2.5, 3.0]]))


def test_moving_average_is_causal_and_per_sequence():
    torch.manual_seed(0)
    x = torch.rand(3, 20)
    changed = x.clone()
    changed[:, 12:] += 10.0
    changed[2] += 5.0  # another sequence changes entirely
    a, _ = causal_moving_average(x, 4)
    b, _ = causal_moving_average(changed, 4)
    torch.testing.assert_close(a[:2, :12], b[:2, :12])
    assert (a[:2, 12:] - b[:2, 12:]).abs().min() > 1.0


def test_moving_average_skips_invalid_tokens():
    x = torch.tensor([[100.0, 1.0, 50.0, 3.0, 5.0]])
    valid = torch.tensor([[False, True, False, True, True]])  # e.g. left padding and a masked slot
    mean, _ = causal_moving_average(x, 3, valid)
    # Windows (ending at t, 3 tokens) over valid values only: [], [1], [1], [1, 3], [3, 5].
    torch.testing.assert_close(mean[:, 1:], torch.tensor([[1.0, 1.0, 2.0, 4.0]]))
    assert torch.isfinite(mean).all()


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_moving_average_incremental_equals_full(window):
    torch.manual_seed(1)
    x = torch.rand(2, 17)
    valid = torch.rand(2, 17) > 0.2
    full, _ = causal_moving_average(x, window, valid)
    pieces, history, start = [], None, 0
    for size in (5, 1, 1, 7, 3):
        mean, history = causal_moving_average(
            x[:, start : start + size], window, valid[:, start : start + size], history
        )
        pieces.append(mean)
        start += size
    assert history[0].shape[1] <= max(window - 1, 0)  # the history is bounded by the window
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.mark.parametrize("rule", ["or", "ce", "cu"])
def test_signals_and_gate_by_hand(rule):
    gate = SurpriseGate(cfg(o_ce_init=1.5, m_cu_init=0.8, beta_init=0.7, ma_window=2, gate_rule=rule))
    delta = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    delta_hat = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]])
    sig, _ = gate(delta, delta_hat, None)
    d_st, d_ch = [0.5, 2.0, 1.0], [0.5, 2.0, 0.5]
    ma = [0.5, 1.25, 1.5]  # window 2
    ce = [s - (c - math.log(1.5)) for s, c in zip(d_st, d_ch, strict=True)]
    cu = [s - 0.8 * m for s, m in zip(d_st, ma, strict=True)]
    s_ce, s_cu = [_sig(0.7 * v) for v in ce], [_sig(0.7 * v) for v in cu]
    g = {
        "or": [a + b - a * b for a, b in zip(s_ce, s_cu, strict=True)],
        "ce": s_ce,
        "cu": s_cu,
    }[rule]
    for name, expected in [
        ("d_st", d_st),
        ("d_ch", d_ch),
        ("ce", ce),
        ("cu", cu),
        ("s_ce", s_ce),
        ("s_cu", s_cu),
        ("g", g),
    ]:
        torch.testing.assert_close(getattr(sig, name), torch.tensor([expected]), msg=name)
    assert ((sig.g >= 0) & (sig.g <= 1)).all()


def test_combine_gates_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        combine_gates(torch.zeros(1), torch.zeros(1), "and")


def test_moving_average_of_cu_is_detached():
    gate = SurpriseGate(cfg(gate_rule="cu"))
    delta = torch.randn(1, 6, 4, requires_grad=True)
    sig, _ = gate(delta, torch.zeros(1, 6, 4), None)
    sig.cu.sum().backward()
    # d CU_t / d delta_t = 2 delta_t / D only: the moving average contributes nothing.
    torch.testing.assert_close(delta.grad, 2 * delta.detach() / 4)


def test_scalars_stay_positive_under_optimisation():
    gate = SurpriseGate(cfg())
    opt = torch.optim.SGD(gate.parameters(), lr=1.0)
    torch.manual_seed(0)
    delta = torch.randn(2, 10, 8)
    for _ in range(30):  # push o_ce, m_cu and both betas down hard
        sig, _ = gate(delta, torch.zeros_like(delta), None)
        loss = sig.ce.mean() - sig.cu.mean() + gate.betas().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = gate.scalar_stats()
    # A direct parametrisation would be well below zero by now (o_ce alone would be 1.025 - 30).
    assert stats["o_ce"] > 0 and stats["m_cu"] > 0
    assert stats["o_ce"] < 1e-3  # the optimiser did push it
    assert (gate.betas() > 0).all()


def test_learnable_scalars_and_their_inits():
    gate = SurpriseGate(cfg(beta_init=0.7, o_ce_init=1.025, m_cu_init=1.1))
    names = {n for n, _ in gate.named_parameters()}
    assert names == {"log_o_ce", "log_m_cu", "beta_raw"}
    torch.testing.assert_close(gate.betas(), torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(gate.scalar_stats()["o_ce"], torch.tensor(1.025))
    torch.testing.assert_close(gate.scalar_stats()["m_cu"], torch.tensor(1.1))
    fixed = SurpriseGate(cfg(learn_o_ce=False, learn_m_cu=False))
    assert {n for n, _ in fixed.named_parameters()} == {"beta_raw"}
    assert {"log_o_ce", "log_m_cu"} <= set(fixed.state_dict())


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_scheduled_beta_follows_progress(mode):
    gate = SurpriseGate(cfg(beta_mode=mode, beta_start=0.5, beta_end=5.0))
    assert not any(n == "beta_raw" for n, _ in gate.named_parameters())
    for p in (0.0, 0.25, 0.5, 0.8, 1.0, 1.7):
        gate.set_progress(p)
        q = min(p, 1.0)
        ramp = q if mode == "linear" else (1 - math.cos(math.pi * q)) / 2
        expected = 0.5 + (5.0 - 0.5) * ramp
        torch.testing.assert_close(gate.betas(), torch.tensor([expected, expected]))


@pytest.mark.parametrize("mode", ["linear", "cosine", "learnable"])
def test_trained_beta_is_in_the_checkpoint(mode):
    """Evaluation must use the beta training ended with: it travels in the state_dict."""
    torch.manual_seed(0)
    trained = build_model(cfg(n_layers=4, beta_mode=mode))
    trained.set_training_progress(0.6)
    if mode == "learnable":
        with torch.no_grad():
            for _, layer in trained.routed_layers():
                layer.surprise.beta_raw.add_(1.3)
    expected = [layer.surprise.betas().detach().clone() for _, layer in trained.routed_layers()]
    assert not torch.allclose(expected[0], torch.tensor(0.5))
    state = trained.state_dict()
    # The checkpoint holds what training changed: the learnt beta, or the schedule's progress.
    name = "layers.0.surprise.beta_raw" if mode == "learnable" else "layers.0.surprise.progress"
    fresh = build_model(cfg(n_layers=4, beta_mode=mode)).state_dict()[name]
    assert not torch.equal(state[name], fresh)
    if mode != "learnable":
        assert state[name].item() == pytest.approx(0.6)
    restored = build_model(cfg(n_layers=4, beta_mode=mode))
    restored.load_state_dict(state)
    for (_, layer), beta in zip(restored.routed_layers(), expected, strict=True):
        torch.testing.assert_close(layer.surprise.betas(), beta)
