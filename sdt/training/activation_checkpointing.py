"""Activation checkpointing per layer of the stack (`model.activation_checkpointing=true`).

Each layer (a dense block, an SDT pair, an STT or MoD layer) keeps only its input during the forward pass and runs
again during the backward pass to rebuild what the backward needs: activation memory falls from that of every block
to that of one, for about one extra forward (a third more compute). Plain `torch.utils.checkpoint` (non-reentrant),
applied from outside: the model code does not know about it, parameter names and checkpoints do not change.

The recomputation must make the same routing decisions as the first pass. It does: Top-K is deterministic (ties go
to the earlier position, `sdt.routing.topk`), the RNG state (dropout) and the autocast state are restored by
`torch.utils.checkpoint`, and no layer changes state in its training forward (decoding caches are never checkpointed:
without gradients there is nothing to save memory on).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdt.models import LanguageModel


def _checkpointed_forward(self: nn.Module, x: torch.Tensor, ctx: Any) -> Any:
    if not torch.is_grad_enabled() or ctx.cache is not None:
        return type(self).forward(self, x, ctx)
    return checkpoint(type(self).forward, self, x, ctx, use_reentrant=False)


def apply_activation_checkpointing(model: LanguageModel) -> LanguageModel:
    """Checkpoint every layer of `model.layers` (in place; applying it twice changes nothing)."""
    for layer in model.layers:
        # A method bound to the layer (not a closure over it), so copy.deepcopy of the model rebinds it to the copy.
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return model


def is_checkpointed(model: LanguageModel) -> bool:
    return all(getattr(layer.forward, "__func__", None) is _checkpointed_forward for layer in model.layers)
