"""Key/value caches for incremental decoding.

A `KVCache` belongs to one attention call site (one block at one position in the layer path). It stores keys and
values together with each entry's absolute position and a validity flag, because the entries of a routed layer are
not a contiguous prefix of the sequence: a layer that skipped a token stores nothing for it, and left-padded
prompts store padding that must never be attended to. Attention masks are built from the stored positions, so the
same code serves dense layers, routed layers and padded batches.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor


class KVCache:
    """Keys/values of one attention call site: k, v (B, H_kv, S, hd); pos, valid (B, S)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None
        self.valid: Tensor | None = None

    def append(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add new entries and return everything cached so far (including them)."""
        if self.k is None:
            self.k, self.v, self.pos, self.valid = k, v, pos, valid
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.pos = torch.cat([self.pos, pos], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.k, self.v, self.pos, self.valid

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        """Bytes actually held by the key and value tensors."""
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class ModelCache:
    """All KV caches of one model for one batch of sequences, keyed by call site."""

    def __init__(self) -> None:
        self.layers: dict[Hashable, KVCache] = {}
        # Other per-layer decoding state that is not K/V (e.g. the surprise moving-average history).
        self.state: dict[Hashable, object] = {}
        self.next_pos: Tensor | None = None  # (B, 1) absolute position of the next token to feed

    def get(self, key: Hashable) -> KVCache:
        if key not in self.layers:
            self.layers[key] = KVCache()
        return self.layers[key]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())

    def num_entries(self) -> int:
        return sum(c.length for c in self.layers.values())
