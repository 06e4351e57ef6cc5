"""Distributed-strategy builders that Hydra configs cannot express directly."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from sdt.models import layer_classes


def fsdp_strategy(**kwargs: Any) -> FSDPStrategy:
    """FSDP with one shard unit per layer of the stack, whatever the architecture."""
    return FSDPStrategy(auto_wrap_policy=set(layer_classes()), **kwargs)
