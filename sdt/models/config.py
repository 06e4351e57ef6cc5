"""Model configuration: one dataclass that describes every architecture `sdt` builds.

The config is plain data (serialisable to a dict, stored in every checkpoint) so a model can be rebuilt from the
checkpoint alone. Fields are validated on construction with messages that name the config key (`model.<field>`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sdt.errors import UserError

ARCHS = ("dense",)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass
class ModelConfig:
    # --- which model
    arch: str = "dense"  # one of ARCHS

    # --- backbone (Llama / Qwen2 family)
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    head_dim: int | None = None  # None means d_model // n_heads
    intermediate_size: int | None = None  # SwiGLU hidden size; None means ~8/3 * d_model rounded up to 64
    max_seq_len: int = 1024  # longest sequence (prompt + generation) the RoPE tables cover
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 uses a bias on q, k, v projections
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    # Extra, architecture-specific options live in routed model configs (added by the routed architectures).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch={self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"model.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}",
            )
            self.head_dim = self.d_model // self.n_heads
        _check(self.head_dim % 2 == 0, f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}",
        )
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.d_model / 3 / 64)
        _check(self.intermediate_size >= 1, f"model.intermediate_size must be positive, got {self.intermediate_size}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}")
        _check(self.rms_norm_eps > 0, f"model.rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (a Hydra node or a checkpoint), rejecting unknown keys with a clear message."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        _check(not unknown, f"unknown model option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
