"""Calibrating the causal routing thresholds so the executed share of tokens matches the capacity."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sdt.models.transformer import LanguageModel
from sdt.routing.quantiles import quantile_grid


def quantile(x: Tensor, q: float) -> Tensor:
    """Exact q-quantile (lower interpolation) of a 1-D tensor of any size (torch.quantile caps the input size)."""
    k = min(max(1, round(q * x.numel())), x.numel())
    return x.float().kthvalue(k).values


def mode_of_score(name: str) -> str:
    """The causal routing mode a threshold serves: the student's, or `threshold` for gate / router scores."""
    return "student" if name == "student" else "threshold"


@torch.no_grad()
def calibrate_thresholds(
    model: LanguageModel,
    batches: Iterable[Tensor],
    capacity: float | None = None,
    scores: Iterable[str] | None = None,
) -> dict:
    """Set each routed layer's thresholds to the (1 - capacity) quantile of its scores on `batches`.

    Calibrated in the mode the threshold serves and layer by layer, bottom up: a deeper layer's input depends on
    what the layers below it executed, so its scores are collected with the layers below already routing causally
    with their calibrated thresholds (scores collected under Top-K would fit inputs the causal mode never sees).
    Costs one pass over `batches` per routed layer and mode, each through the layers up to the one calibrated
    only. `scores` limits calibration to these score names (e.g. {"gate"}: the threshold mode alone). Returns {layer index: {score name: threshold}}.
    `capacity` defaults to the one in force (`model.set_inference_capacity` moves it). Positions the model
    always executes (`model.always_execute_first`) count inside the capacity: they take part in the quantile as
    certain winners, so the threshold admits correspondingly fewer of the other tokens.
    Each score's quantile grid is stored beside its threshold (`layer.score_quantiles()`), so that
    `model.set_inference_capacity(c)` later sets the thresholds of any capacity without another pass; a deeper
    layer's grid is collected under the capacity calibrated here, the one the dial is most exact around.
    """
    capacity = model.capacity_in_force if capacity is None else capacity
    forced = model.config.always_execute_first
    routed = model.routed_layers()
    if not routed:
        return {}
    batches = list(batches)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result: dict[int, dict[str, float]] = {i: {} for i, _ in routed}
    names = sorted({name for _, layer in routed for name in layer.thresholds()})
    if scores is not None:
        names = [name for name in names if name in set(scores)]
    for name in names:
        mode = mode_of_score(name)
        for i, layer in routed:
            buf = layer.thresholds().get(name)
            if buf is None:
                continue
            scores = []
            for ids in batches:
                # Layers above i do not change its scores: run the stack up to i, and logits for one position only.
                out = model(ids.to(device), routing=mode, diagnostics=False, layer_path=range(i + 1), logits_to_keep=1)
                score = out.scores[i][name].float()  # (B, T)
                if forced:
                    score[:, :forced] = float("inf")
                scores.append(score.flatten().cpu())
            collected = torch.cat(scores)
            tau = quantile(collected, 1.0 - capacity)
            buf.fill_(tau.to(buf.device))
            grid = layer.score_quantiles()[name]
            grid.copy_(quantile_grid(collected, grid.numel()).to(grid.device))
            result[i][name] = float(tau)
    model.train(was_training)
    return result
