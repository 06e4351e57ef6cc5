"""Key/value caches for incremental decoding.

A `KVCache` belongs to one attention call site (one block at one position in the layer path). It stores keys and
values together with each entry's absolute position and a validity flag, because the entries of a routed layer are
not a contiguous prefix of the sequence: a layer that skipped a token stores nothing for it, and left-padded
prompts store padding that must never be attended to. Attention masks are built from the stored positions, so the
same code serves dense layers, routed layers and padded batches.

Routed exports ship this file (sdt/transformers_code/): it imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
from torch import Tensor


class KVCache:
    """Keys/values of one attention call site: k, v (B, H_kv, S, hd); pos, valid (B, S).

    Entries are written in place into buffers allocated ahead (`reserve` entries, the decoding length `generate`
    knows), so a decode step copies only its new entries instead of the whole cache. A cache that outgrows its
    buffers moves to ones twice the size (amortised O(1) per entry), so reserving too little is only slower.
    `k`, `v`, `pos`, `valid` are views of the `length` entries written so far.
    """

    def __init__(self, reserve: int = 0) -> None:
        self.reserve = reserve  # entries to allocate on the first append (0: exactly what it brings)
        self.length = 0
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._pos: Tensor | None = None
        self._valid: Tensor | None = None

    @property
    def k(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @property
    def pos(self) -> Tensor | None:
        return None if self._pos is None else self._pos[:, : self.length]

    @property
    def valid(self) -> Tensor | None:
        return None if self._valid is None else self._valid[:, : self.length]

    @property
    def allocated(self) -> int:
        """Entries the buffers have room for."""
        return 0 if self._k is None else self._k.shape[2]

    def _allocate(self, like_k: Tensor, like_v: Tensor, like_pos: Tensor, size: int) -> None:
        B, H, _, hd = like_k.shape
        k = like_k.new_empty(B, H, size, hd)
        v = like_v.new_empty(B, like_v.shape[1], size, like_v.shape[3])
        pos = like_pos.new_zeros(B, size)
        valid = torch.zeros(B, size, dtype=torch.bool, device=like_k.device)
        if self._k is not None:  # growth: keep what is written
            n = self.length
            k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
            pos[:, :n], valid[:, :n] = self._pos[:, :n], self._valid[:, :n]
        self._k, self._v, self._pos, self._valid = k, v, pos, valid

    def append(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add new entries k, v (B, H_kv, S_new, hd), pos, valid (B, S_new); return everything cached so far
        (including them) as views of the buffers."""
        n, end = self.length, self.length + k.shape[2]
        if self._k is None:
            self._allocate(k, v, pos, max(end, self.reserve))
        elif end > self.allocated:
            self._allocate(k, v, pos, max(end, 2 * self.allocated))
        self._k[:, :, n:end] = k
        self._v[:, :, n:end] = v
        self._pos[:, n:end] = pos
        self._valid[:, n:end] = valid
        self.length = end
        return self.k, self.v, self.pos, self.valid

    def nbytes(self) -> int:
        """Bytes of the key and value entries written (what the cache holds as data; `reserved_nbytes` counts the
        buffers)."""
        if self._k is None:
            return 0
        return self.length * self._entry_bytes() * self._k.shape[0]

    def reserved_nbytes(self) -> int:
        """Bytes of the key and value buffers allocated, written or not."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def _entry_bytes(self) -> int:
        """K and V bytes of one entry of one sequence."""
        return self._k.shape[1] * self._k.shape[3] * self._k.element_size() + (
            self._v.shape[1] * self._v.shape[3] * self._v.element_size()
        )

    def nbytes_per_sequence(self) -> Tensor | None:
        """(B,) bytes of each sequence's valid entries: what the sequence needs held, without padding and the
        fillers of rows packed to a common length."""
        if self._k is None:
            return None
        return self.valid.sum(dim=1) * self._entry_bytes()

    def select_rows(self, rows: Tensor) -> None:
        """Keep, as row i, what row rows[i] holds (beam search: each beam continues one of the previous beams)."""
        if self._k is not None:
            self._k, self._v, self._pos, self._valid = (
                t.index_select(0, rows.to(t.device)) for t in (self._k, self._v, self._pos, self._valid)
            )


# Entries a routed call site reserves beyond its capacity's share of `max_tokens`: decisions are per token, so a
# layer may execute a little more than its share (more than this and its buffers double once).
RESERVE_SLACK = 16


class ModelCache:
    """All KV caches of one model for one batch of sequences, keyed by call site.

    `max_tokens` (tokens per sequence the cache will see, prompt included; `generate` sets it) sizes every call
    site's buffers on its first write: all of it for a dense block, the capacity's share plus `RESERVE_SLACK` for a
    routed block, which stores only the tokens it executes. Without it, buffers start at the first write's size
    and double when full.
    """

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
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

    def get(self, key: Hashable, share: float = 1.0) -> KVCache:
        """The cache of call site `key`; `share` is the fraction of tokens the site is expected to store."""
        cache = self.layers.get(key)
        if cache is None:
            reserve = 0
            if self.max_tokens is not None:
                reserve = (
                    self.max_tokens
                    if share >= 1
                    else min(self.max_tokens, math.ceil(share * self.max_tokens) + RESERVE_SLACK)
                )
            cache = self.layers[key] = KVCache(reserve)
        return cache

    def nbytes(self) -> int:
        """Bytes of the K/V entries written, over every call site."""
        return sum(c.nbytes() for c in self.layers.values())

    def reserved_nbytes(self) -> int:
        """Bytes of the K/V buffers allocated, over every call site."""
        return sum(c.reserved_nbytes() for c in self.layers.values())

    def nbytes_per_sequence(self) -> Tensor | None:
        """(B,) bytes of valid K/V entries each sequence holds, over every call site; None before any forward."""
        parts = [b for b in (c.nbytes_per_sequence() for c in self.layers.values()) if b is not None]
        return torch.stack(parts).sum(dim=0) if parts else None

    def num_entries(self) -> int:
        return sum(c.length for c in self.layers.values())

    def select_rows(self, rows: Tensor) -> None:
        """Keep, as row i, what row rows[i] holds, in every call site, the per-layer state and the compute counts
        (beam search). Every state entry is a (B, ...) tensor or a tuple of them."""
        for cache in self.layers.values():
            cache.select_rows(rows)
        self.state = {key: _select_rows(value, rows) for key, value in self.state.items()}
        self.routed_tokens = {i: _select_rows(n, rows) for i, n in self.routed_tokens.items()}
        self.routed_executed = {i: _select_rows(n, rows) for i, n in self.routed_executed.items()}
        if self.next_pos is not None:
            self.next_pos = _select_rows(self.next_pos, rows)


def _select_rows(value: object, rows: Tensor) -> object:
    if isinstance(value, Tensor):
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows) for v in value)
    raise TypeError(f"cannot select rows of a cached {type(value).__name__}")
