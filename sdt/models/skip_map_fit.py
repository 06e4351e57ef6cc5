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

    def collect(i: int, block: Block, sublayer: str) -> list[torch.utils.hooks.RemovableHandle]:
        # The state between the two sub-layers (h = x + Attn(RMSNorm(x)), the input of the MLP sub-layer) splits the
        # block's update in two; it is read as the block computes it, not computed again.
        between: dict[str, Tensor] = {}

        def at_mlp_norm(_norm: torch.nn.Module, args: tuple) -> None:
            between["h"] = args[0]

        def at_block(_block: Block, args: tuple, output: Tensor) -> None:
            x, y = args[0], output  # (B, T, D): the block's input and output
            if sublayer == "attention":
                y = between["h"]
            elif sublayer == "mlp":
                x = between["h"]
            x, y = x[:, skip:], y[:, skip:]  # the tokens that can skip
            stats[i].add(x.reshape(-1, x.shape[-1]), (y - x).reshape(-1, x.shape[-1]))

        handles = [block.register_forward_hook(at_block)]
        if sublayer != "block":
            handles.append(block.post_attention_layernorm.register_forward_pre_hook(at_mlp_norm))
        return handles

    handles = [h for i, layer in layers for h in collect(i, layer.routed_block, layer.routed_sublayer)]
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
