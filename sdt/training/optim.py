"""Optimiser configuration: AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sdt.common.config_checks import Removed, from_mapping
from sdt.common.errors import UserError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # handed to the Trainer (gradient_clip_val); 0 disables
    # Learning rates per parameter role (see `parameter_role`); roles not listed use `lr`.
    group_lr: dict[str, float] = field(default_factory=dict)

    REMOVED: ClassVar[dict[str, Removed]] = {
        "router_warmup_steps": Removed(
            0,
            "training only the routing modules for the first steps measured 3.1% worse than the conversion recipe "
            "without it (docs/pretrained.md, 'One option at a time')",
        ),
    }

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise UserError(f"optim.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            raise UserError(f"optim.eps must be positive, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.grad_clip < 0:
            raise UserError(f"optim.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for role, lr in self.group_lr.items():
            if lr <= 0:
                raise UserError(f"optim.group_lr.{role} must be positive, got {lr}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimConfig:
        return from_mapping(cls, d, "optim")


# Roles whose parameters are scalars of the routing math (temperatures, offsets): never weight-decayed.
NO_DECAY_ROLES = frozenset({"surprise"})


def parameter_role(model: nn.Module, name: str) -> str:
    """The role of a parameter, which picks its learning rate: "base" unless a module declares otherwise.

    Routed modules declare `param_role = "prior" | "surprise" | "router" | ...` as a class attribute; the role of a
    parameter is that of its innermost module that declares one.
    """
    role = "base"
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        role = getattr(module, "param_role", role)
    return role


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: one per (role, decay) pair. Matrices decay; vectors (norms, biases) and scalars do not."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear twice
            continue
        seen.add(id(p))
        role = parameter_role(model, name)
        decay = p.ndim >= 2 and role not in NO_DECAY_ROLES
        groups.setdefault((role, decay), []).append(p)
    out = []
    for (role, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.group_lr.get(role, cfg.lr),
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "name": f"{role}{'' if decay else '_no_decay'}",
            }
        )
    return out


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup, then cosine to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused (one CUDA kernel for every parameter's update) when every parameter is on a
    CUDA device, torch's default (foreach) elsewhere, where the fused kernel brings nothing or does not exist."""
    groups = param_groups(model, cfg)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if on_cuda else None)


def group_role(group: dict[str, Any]) -> str:
    """The parameter role of an optimizer group of `param_groups` (its decayed and undecayed halves share one)."""
    return group.get("name", "base").removesuffix("_no_decay")


def role_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each parameter role (base, prior, surprise, router, ...), for logging."""
    return {group_role(g): float(g["lr"]) for g in optimizer.param_groups}


def clip_grad_norm_by_role(optimizer: torch.optim.Optimizer, max_norm: float) -> dict[str, float]:
    """Clip the gradients of each parameter role (the groups of `param_groups`) to `max_norm`, separately.

    Returns the pre-clipping norm of each role (for logging)."""
    by_role: dict[str, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        role = group_role(group)
        by_role.setdefault(role, []).extend(p for p in group["params"] if p.grad is not None)
    return {role: float(_clip_role(ps, max_norm)) for role, ps in by_role.items() if ps}


def _clip_role(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` for one role, also when FSDP2 shards some of its parameters (DTensor gradients) and keeps
    others whole (0-d scalars, `sdt.training.distributed.shard_model`): the norm is then that of the whole gradient, the
    same on every rank, and each part is scaled by one factor."""
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [p for p in params if not isinstance(p.grad, DTensor)]
    squares = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor().pow(2)
    if whole:
        squares = squares + torch.nn.utils.get_total_norm([p.grad for p in whole]).to(squares.device).pow(2)
    total = squares.sqrt()
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    if scale < 1.0:
        for p in params:
            p.grad.mul_(scale)
    return total
