"""`evaluate(cfg)`, the one entry of `python evaluate.py`: dispatches to the task's evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from sdt.common.errors import UserError
from sdt.evaluation.lm import evaluate_lm
from sdt.reasoning.evaluate import evaluate_reasoning
from sdt.search.evaluate import SEARCH_MODES, evaluate_search
from sdt.training.resolvers import register_resolvers

register_resolvers()  # configs may use ${package_file:...}; register before Hydra composes them

# evaluate.py's own tasks (task=...), the one list of them: the command line's validation reads it from here.
TASKS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {"lm": evaluate_lm, "reasoning": evaluate_reasoning}


def check_task(task: Any, search: Any) -> None:
    """`task` without a search is one of TASKS; with `search` (one of SEARCH_MODES) it names the items to search on
    instead, so it must not be one of TASKS."""
    if search is not None:
        if search not in SEARCH_MODES:
            raise UserError(f"search must be one of {', '.join(SEARCH_MODES)} (or null for no search), got {search!r}")
        if task is None or task in TASKS:
            raise UserError(
                f"search={search} needs task=<shipped task name, .jsonl file or lm-eval .yaml> (docs/cola.md)"
            )
    elif task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)} (or name a task with search=cola), got {task!r}")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`search=cola|cola_router` runs a CoLa search over `task`; otherwise `task` (lm | reasoning) picks the
    evaluation."""
    search, task = cfg.get("search"), cfg.get("task", "lm")
    check_task(task, search)
    if search is not None:
        return evaluate_search(cfg)
    return TASKS[task](cfg)
