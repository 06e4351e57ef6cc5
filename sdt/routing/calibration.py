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


def mode_of_score(name: str) -> str:
    """The causal routing mode a threshold serves: the student's, or `threshold` for gate / router scores."""
    return "student" if name == "student" else "threshold"


@torch.no_grad()
def calibrate_thresholds(model: LanguageModel, batches: Iterable[Tensor], capacity: float | None = None) -> dict:
    """Set each routed layer's thresholds to the (1 - capacity) quantile of its scores on `batches`.

    Calibrated in the mode the threshold serves and layer by layer, bottom up: a deeper layer's input depends on
    what the layers below it executed, so its scores are collected with the layers below already routing causally
    with their calibrated thresholds (scores collected under Top-K would fit inputs the causal mode never sees).
    Costs one pass over `batches` per routed layer and mode. Returns {layer index: {score name: threshold}}.
    """
    capacity = model.config.capacity if capacity is None else capacity
    routed = model.routed_layers()
    if not routed:
        return {}
    batches = list(batches)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result: dict[int, dict[str, float]] = {i: {} for i, _ in routed}
    names = sorted({name for _, layer in routed for name in layer.thresholds()})
    for name in names:
        mode = mode_of_score(name)
        for i, layer in routed:
            buf = layer.thresholds().get(name)
            if buf is None:
                continue
            scores = [
                model(ids.to(device), routing=mode, diagnostics=False).scores[i][name].flatten().float().cpu()
                for ids in batches
            ]
            tau = quantile(torch.cat(scores), 1.0 - capacity)
            buf.fill_(tau.to(buf.device))
            result[i][name] = float(tau)
    model.train(was_training)
    return result
