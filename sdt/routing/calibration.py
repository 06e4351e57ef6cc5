"""Calibrating the causal routing thresholds so the executed share of tokens matches the capacity."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sdt.models.transformer import LanguageModel


def quantile(x: Tensor, q: float) -> Tensor:
    """Exact q-quantile (lower interpolation) of a 1-D tensor of any size (torch.quantile caps the input size)."""
    k = min(max(1, round(q * x.numel())), x.numel())
    return x.float().kthvalue(k).values


@torch.no_grad()
def calibrate_thresholds(model: LanguageModel, batches: Iterable[Tensor], capacity: float | None = None) -> dict:
    """Set each routed layer's thresholds to the (1 - capacity) quantile of its scores on `batches`.

    Scores are collected under Top-K routing (the training behaviour), so a threshold selects the same share of
    tokens that Top-K selects. Returns {layer index: {score name: threshold}}.
    """
    capacity = model.config.capacity if capacity is None else capacity
    routed = dict(model.routed_layers())
    if not routed:
        return {}
    collected: dict[int, dict[str, list[Tensor]]] = {i: {} for i in routed}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for ids in batches:
        out = model(ids.to(device), routing="topk")
        for i, scores in out.scores.items():
            for name, value in scores.items():
                collected[i].setdefault(name, []).append(value.flatten().float().cpu())
    model.train(was_training)
    result: dict[int, dict[str, float]] = {}
    for i, layer in routed.items():
        result[i] = {}
        for name, buf in layer.thresholds().items():
            if name in collected[i]:
                tau = quantile(torch.cat(collected[i][name]), 1.0 - capacity)
                buf.fill_(tau.to(buf.device))
                result[i][name] = float(tau)
    return result
