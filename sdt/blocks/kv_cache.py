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

    def nbytes_per_sequence(self) -> Tensor | None:
        """(B,) bytes of each sequence's valid entries: what the sequence needs held, without padding and the
        fillers of rows packed to a common length."""
        if self.k is None:
            return None
        per_entry = self.k.shape[1] * self.k.shape[3] * (self.k.element_size() + self.v.element_size())
        return self.valid.sum(dim=1) * per_entry


class ModelCache:
    """All KV caches of one model for one batch of sequences, keyed by call site."""

    def __init__(self) -> None:
        self.layers: dict[Hashable, KVCache] = {}
        # Other per-layer decoding state that is not K/V (e.g. the surprise moving-average history).
        self.state: dict[Hashable, object] = {}
        self.next_pos: Tensor | None = None  # (B, 1) absolute position of the next token to feed
        # Compute accounting per sequence, by routed layer index: real tokens that reached the layer, and how
        # many of them it executed (a layer visited twice on a layer path counts both visits).
        self.routed_tokens: dict[int, Tensor] = {}  # (B,) int64
        self.routed_executed: dict[int, Tensor] = {}  # (B,) int64

    def record_routed(self, layer: int, decisions_BT: Tensor, pad_mask_BT: Tensor | None) -> None:
        """Add one forward's decisions (B, T) of routed layer `layer` to the per-sequence counts."""
        real = decisions_BT.shape[1] if pad_mask_BT is None else pad_mask_BT.sum(dim=1)
        seen = torch.zeros(decisions_BT.shape[0], dtype=torch.long, device=decisions_BT.device) + real
        done = decisions_BT.sum(dim=1)
        self.routed_tokens[layer] = self.routed_tokens.get(layer, 0) + seen
        self.routed_executed[layer] = self.routed_executed.get(layer, 0) + done

    def get(self, key: Hashable) -> KVCache:
        if key not in self.layers:
            self.layers[key] = KVCache()
        return self.layers[key]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())

    def nbytes_per_sequence(self) -> Tensor | None:
        """(B,) bytes of valid K/V entries each sequence holds, over every call site; None before any forward."""
        parts = [b for b in (c.nbytes_per_sequence() for c in self.layers.values()) if b is not None]
        return torch.stack(parts).sum(dim=0) if parts else None

    def num_entries(self) -> int:
        return sum(c.length for c in self.layers.values())
