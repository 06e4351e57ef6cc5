"""`evaluate(cfg)`, the one entry of `python evaluate.py`: dispatches to the task's evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from sdt.errors import UserError
from sdt.evaluation.lm import evaluate_lm
from sdt.reasoning.evaluate import evaluate_reasoning
from sdt.resolvers import register_resolvers
from sdt.search.evaluate import evaluate_search

register_resolvers()  # configs may use ${package_file:...}; register before Hydra composes them

TASKS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {"lm": evaluate_lm, "reasoning": evaluate_reasoning}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`search=cola|cola_router` runs a CoLa search over `task`; otherwise `task` (lm | reasoning) picks the
    evaluation."""
    if cfg.get("search"):
        return evaluate_search(cfg)
    task = cfg.get("task", "lm")
    if task not in TASKS:
        raise UserError(f"task must be {' or '.join(TASKS)}, got {task!r}")
    return TASKS[task](cfg)
