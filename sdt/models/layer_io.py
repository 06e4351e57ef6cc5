"""What every layer of the model's stack receives besides its input (`ForwardContext`) and what it returns
(`LayerOutput`): the interface between the model (sdt.models.transformer) and its layers, routed or not."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from torch import Tensor

from sdt.blocks.kv_cache import KVCache, ModelCache
from sdt.blocks.layers import RotaryEmbedding


@dataclass
class ForwardContext:
    """What every layer needs besides its input: positions, padding, cache and the routing mode."""

    positions: Tensor  # (B, T) absolute positions of the input tokens
    rope: RotaryEmbedding
    pad_mask: Tensor | None = None  # (B, T) True for real tokens; None means no padding
    cache: ModelCache | None = None
    cache_key: Hashable = 0  # which cache slots this layer call uses (a layer visited twice gets two)
    routing: str = "topk"  # how routed layers choose tokens; dense layers ignore it
    # Causal modes also compute the Top-K oracle to score themselves against it (student accuracy etc.); turned
    # off where only the output matters (calibration, generation, benchmarks).
    diagnostics: bool = True

    @property
    def cache_state(self) -> dict[Hashable, object] | None:
        """Per-layer decoding state that is not K/V (surprise history, budget counts), or None when not decoding."""
        return None if self.cache is None else self.cache.state

    def kv(self, sub: int = 0, share: float = 1.0) -> KVCache | None:
        """The KV cache of the `sub`-th block of the current layer, or None when not decoding; `share`: the fraction
        of tokens the block stores (a routed block's capacity), which sizes its buffers."""
        return None if self.cache is None else self.cache.get((self.cache_key, sub), share)


@dataclass
class LayerOutput:
    hidden: Tensor  # (B, T, D)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted, keyed by loss name
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for logging
    decisions: Tensor | None = None  # (B, T) bool: tokens that ran the routed block (routed layers only)
    scores: dict[str, Tensor] = field(default_factory=dict)  # (B, T) per-token routing scores, e.g. gate, student
