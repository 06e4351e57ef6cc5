"""Static layer pruning, the equal-compute baseline of a routed conversion: drop the layers that change their input
least, as ShortGPT (arXiv 2403.03853) does.

ShortGPT scores each layer by its Block Influence, 1 - cos(x_in, x_out) averaged over the tokens of some text: a
layer whose output points where its input did adds little and goes first. The kept layers load with
`model.init_layers=[...]` beside `model.init_from`, and the pruned model is fine-tuned like any conversion.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from sdt.blocks.layers import Block

from .transformer import LanguageModel


@torch.no_grad()
def layer_similarities(model: LanguageModel, batches: Iterable[Tensor]) -> list[float]:
    """Mean cosine similarity between each backbone block's input and output hidden state, over every token of
    `batches` ((B, T) token ids), in stack order. 1 - similarity is ShortGPT's Block Influence."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0

    def record(i: int):
        def hook(_module, args, output) -> None:
            x_BTD = args[0]
            sums[i] += F.cosine_similarity(x_BTD.double(), output.double(), dim=-1).sum().cpu()

        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids.to(next(model.parameters()).device), routing="full", diagnostics=False)
            count += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to measure layer similarities on")
    return (sums / count).tolist()


def layers_to_keep(similarities: list[float], n_keep: int) -> list[int]:
    """The `n_keep` layers to keep, in stack order: every layer but the len - n_keep most similar to their input."""
    if not 1 <= n_keep <= len(similarities):
        raise ValueError(f"n_keep must be in [1, {len(similarities)}], got {n_keep}")
    by_influence = sorted(range(len(similarities)), key=lambda i: similarities[i])  # least similar first
    return sorted(by_influence[:n_keep])
