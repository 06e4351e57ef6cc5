"""Bayesian surprise signals and the gate built from them (docs/algorithms.md, section 2).

All signals are per token, shape (B, T):
- static surprise   D_st = ||delta||^2 / D               how much the full computation changes the token
- change surprise   D_ch = ||delta - delta_hat||^2 / D   (mse) or the Gaussian KL (kl): what the prior failed to predict
- expected change   CE = D_st - (D_ch - log o_ce)
- unexpected change CU = D_st - m_cu * MA(D_st)          MA: causal trailing mean over `ma_window` tokens, detached
- S_CE = sigmoid(beta_ce * CE), S_CU = sigmoid(beta_cu * CU), g = S_CE + S_CU - S_CE * S_CU (rule "or")

Routed exports ship this file (sdt/transformers_code/), so it imports only torch, the standard library and other
shipped modules of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantiles import empty_grid

LOGVAR_CLAMP = 8.0  # the KL form's predicted log-variance is clamped to [-8, 8] so exp() stays finite


def static_surprise(delta_BTD: Tensor) -> Tensor:
    return delta_BTD.float().pow(2).mean(dim=-1)


def change_surprise_mse(delta_BTD: Tensor, delta_hat_BTD: Tensor) -> Tensor:
    return (delta_BTD.float() - delta_hat_BTD.float()).pow(2).mean(dim=-1)


def change_surprise_kl(delta_BTD: Tensor, delta_hat_BTD: Tensor, logvar_BTD: Tensor) -> Tensor:
    """Mean over dimensions of KL( N(delta, 1) || N(delta_hat, exp(logvar)) ).

    Per dimension: 0.5 * (logvar + (1 + (delta - delta_hat)^2) / exp(logvar) - 1). With logvar = 0 this is half the
    squared error, the shared-variance proxy that the mse form uses (up to the factor 1/2).
    """
    logvar = logvar_BTD.float().clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    sq = (delta_BTD.float() - delta_hat_BTD.float()).pow(2)
    return (0.5 * (logvar + (1.0 + sq) * torch.exp(-logvar) - 1.0)).mean(dim=-1)


def causal_moving_average(
    x_BT: Tensor, window: int, valid_BT: Tensor | None = None, history: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Trailing mean of x over the at most `window` tokens ending at t (inclusive), per sequence.

    Averages only over tokens that exist and are valid (no padding with token 0's value). `history` carries the
    last window-1 values and validity flags from earlier calls (incremental decoding); the new history is returned.
    """
    valid = torch.ones_like(x_BT, dtype=torch.bool) if valid_BT is None else valid_BT
    if history is not None:
        x_full = torch.cat([history[0], x_BT], dim=1)
        v_full = torch.cat([history[1], valid], dim=1)
    else:
        x_full, v_full = x_BT, valid
    T, H = x_BT.shape[1], x_full.shape[1] - x_BT.shape[1]
    w = v_full.to(x_full.dtype)
    first = max(x_full.shape[1] - (window - 1), 0)
    if T == 1:  # one decoding step: the window is the history and this token, summed directly
        window_x, window_w = (x_full * w)[:, -window:], w[:, -window:]
        mean = window_x.sum(dim=1, keepdim=True) / window_w.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mean, (x_full[:, first:], v_full[:, first:])
    sums = F.pad(torch.cumsum(x_full * w, dim=1), (1, 0))  # (B, H+T+1): sums[:, i] = sum of the first i values
    counts = F.pad(torch.cumsum(w, dim=1), (1, 0))
    end = torch.arange(H + 1, H + T + 1, device=x_BT.device)  # one past each new token
    start = (end - window).clamp(min=0)
    mean = (sums[:, end] - sums[:, start]) / (counts[:, end] - counts[:, start]).clamp(min=1.0)
    # first (clamped at 0): with fewer than window - 1 values so far, a negative start would wrap around.
    new_history = (x_full[:, first:], v_full[:, first:])
    return mean, new_history


def combine_gates(s_ce: Tensor, s_cu: Tensor, rule: str) -> Tensor:
    if rule == "or":  # probabilistic OR: either kind of surprise can open the gate
        return s_ce + s_cu - s_ce * s_cu
    if rule == "ce":
        return s_ce
    if rule == "cu":
        return s_cu
    raise ValueError(f"unknown gate rule {rule!r}")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclass
class SurpriseSignals:
    d_st: Tensor  # (B, T)
    d_ch: Tensor  # (B, T), differentiable w.r.t. the prior
    ce: Tensor
    cu: Tensor
    s_ce: Tensor
    s_cu: Tensor
    g: Tensor  # (B, T) gate in [0, 1]


GateRule = Literal["or", "ce", "cu"]  # how S_CE and S_CU combine into g
BetaMode = Literal["learnable", "linear", "cosine"]  # learnt betas, or scheduled from beta_start to beta_end
ChangeSurprise = Literal["mse", "kl"]  # D_ch: squared error, or KL to a prior that also predicts a log-variance


class SurpriseConfig(Protocol):
    """The fields the surprise gate reads from its config (`sdt.models.ModelConfig` has them all)."""

    gate_rule: GateRule
    beta_mode: BetaMode
    ma_window: int
    beta_start: float
    beta_end: float
    beta_init: float
    change_surprise: ChangeSurprise
    o_ce_init: float
    m_cu_init: float
    learn_o_ce: bool
    learn_m_cu: bool


class SurpriseGate(nn.Module):
    """The learnable (or scheduled) scalars of the surprise math, and the calibrated threshold on g.

    o_ce and m_cu are positive through a log parametrisation; beta through softplus (or a schedule over training
    progress). All live in a "surprise" parameter group: their own learning rate, no weight decay. The schedule's
    progress and the threshold are buffers, so evaluation uses exactly the beta and threshold training ended with.
    """

    param_role = "surprise"

    def __init__(self, cfg: SurpriseConfig) -> None:
        super().__init__()
        self.rule, self.beta_mode, self.ma_window = cfg.gate_rule, cfg.beta_mode, cfg.ma_window
        self.beta_start, self.beta_end = cfg.beta_start, cfg.beta_end
        self.change_form = cfg.change_surprise
        log_o_ce = torch.tensor(math.log(cfg.o_ce_init))
        log_m_cu = torch.tensor(math.log(cfg.m_cu_init))
        if cfg.learn_o_ce:
            self.log_o_ce = nn.Parameter(log_o_ce)
        else:
            self.register_buffer("log_o_ce", log_o_ce)
        if cfg.learn_m_cu:
            self.log_m_cu = nn.Parameter(log_m_cu)
        else:
            self.register_buffer("log_m_cu", log_m_cu)
        if cfg.beta_mode == "learnable":
            self.beta_raw = nn.Parameter(torch.full((2,), _inverse_softplus(cfg.beta_init)))  # (beta_ce, beta_cu)
        self.register_buffer("progress", torch.zeros(()))  # training progress in [0, 1] for scheduled beta
        self.register_buffer("threshold", torch.full((), 0.5))  # on g, calibrated to the capacity
        self.register_buffer("quantiles", empty_grid())  # g's quantile grid: the run-time capacity dial

    def betas(self) -> Tensor:
        """(2,) = (beta_ce, beta_cu)."""
        if self.beta_mode == "learnable":
            return F.softplus(self.beta_raw)
        p = self.progress.clamp(0.0, 1.0)
        if self.beta_mode == "linear":
            beta = self.beta_start + (self.beta_end - self.beta_start) * p
        else:  # cosine ramp from beta_start to beta_end
            beta = self.beta_end + (self.beta_start - self.beta_end) * 0.5 * (1 + torch.cos(math.pi * p))
        return beta.expand(2)

    def set_progress(self, progress: float) -> None:
        self.progress.fill_(progress)

    def forward(
        self,
        delta_BTD: Tensor,
        delta_hat_BTD: Tensor,
        logvar_BTD: Tensor | None,
        *,
        valid_BT: Tensor | None = None,
        history: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[SurpriseSignals, tuple[Tensor, Tensor]]:
        """delta is the block's (detached) update; delta_hat the cheap prediction of it."""
        d_st = static_surprise(delta_BTD)
        if self.change_form == "kl":
            d_ch = change_surprise_kl(delta_BTD, delta_hat_BTD, logvar_BTD)
        else:
            d_ch = change_surprise_mse(delta_BTD, delta_hat_BTD)
        ma, history = causal_moving_average(d_st.detach(), self.ma_window, valid_BT, history)
        ce = d_st - (d_ch - self.log_o_ce)
        cu = d_st - torch.exp(self.log_m_cu) * ma
        beta = self.betas()
        s_ce = torch.sigmoid(beta[0] * ce)
        s_cu = torch.sigmoid(beta[1] * cu)
        g = combine_gates(s_ce, s_cu, self.rule)
        return SurpriseSignals(d_st=d_st, d_ch=d_ch, ce=ce, cu=cu, s_ce=s_ce, s_cu=s_cu, g=g), history

    def scalar_stats(self) -> dict[str, Tensor]:
        beta = self.betas().detach()
        return {
            "beta_ce": beta[0],
            "beta_cu": beta[1],
            "o_ce": torch.exp(self.log_o_ce.detach()),
            "m_cu": torch.exp(self.log_m_cu.detach()),
            "g_threshold": self.threshold,
        }
