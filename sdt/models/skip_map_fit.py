"""Fitting the skip maps of a converted model to its pretrained blocks, in closed form, before any training.

Each routed layer's skip map is set to the ridge least-squares map from the input of what the layer routes (its
block, or the sub-layer `model.routed_sublayer` names) to the update that adds, gathered on the model's dense pass
(`routing="full"`: every block on every token, the pretrained function). Positions the model always executes are
left out: they never skip.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sdt.blocks.layers import Block
from sdt.models.transformer import LanguageModel
from sdt.routing.skip_maps import UpdateStatistics


@torch.no_grad()
def fit_skip_maps(model: LanguageModel, batches: Iterable[Tensor]) -> dict[int, float]:
    """Fit every routed layer's skip map on token batches (B, T); returns {layer index: explained variance}."""
    layers = [(i, layer) for i, layer in model.routed_layers() if layer.skip_map is not None]
    if not layers:
        return {}
    device = next(model.parameters()).device
    skip = model.config.always_execute_first
    stats = {i: UpdateStatistics(model.config.d_model, layer.skip_map.eps, device) for i, layer in layers}

    def collect(i: int, sublayer: str):
        def hook(block: Block, args: tuple, kwargs: dict, output: Tensor) -> None:
            x, y = args[0], output  # (B, T, D): the block's input and output
            if sublayer != "block":  # the state between the two sub-layers splits the block's update in two
                h = block.attention_sublayer(*args, **kwargs)
                x, y = (x, h) if sublayer == "attention" else (h, y)
            x, y = x[:, skip:], y[:, skip:]  # the tokens that can skip
            stats[i].add(x.reshape(-1, x.shape[-1]), (y - x).reshape(-1, x.shape[-1]))

        return hook

    handles = [
        layer.routed_block.register_forward_hook(collect(i, layer.routed_sublayer), with_kwargs=True)
        for i, layer in layers
    ]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids.to(device), routing="full", diagnostics=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: layer.skip_map.fit(stats[i]) for i, layer in layers}
