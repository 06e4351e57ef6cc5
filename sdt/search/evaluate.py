"""`python evaluate.py search=cola task=<task> ckpt_path=... | model.init_from=...`: CoLa search per task item.

For every item, MCTS (sdt/search/cola.py) searches layer paths whose answer is correct, rewarding 1 for a correct
answer and 0 otherwise. The reward uses the gold answer, so the results are an oracle upper bound on what a
per-input path could achieve, as in the paper, not an accuracy a deployable method reaches. Written to `cola.json`
with three plots next to it (docs/cola.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, get_args

import torch
from omegaconf import DictConfig, OmegaConf

from sdt.common.errors import UserError
from sdt.evaluation.loading import load_model_and_tokenizer, pick_device
from sdt.search.cola import ColaConfig, ColaSearch
from sdt.search.prefix_cache import PrefixReusingScorer
from sdt.search.results import search_items, write_search_result
from sdt.search.router_run import evaluate_router
from sdt.search.tasks import PathScorer, load_task

log = logging.getLogger(__name__)


# cola.* options of the run rather than of the tree search (ColaConfig)
RUN_OPTIONS = ("reuse_prefix", "prefix_cache_mb", "batch_paths", "router")


# cola: a CoLa search per task item (cola.json) | cola_router: search a training split, train a path router on it and
# apply it to held-out items (cola_router.json)
SearchMode = Literal["cola", "cola_router"]
SEARCH_MODES: tuple[SearchMode, ...] = get_args(SearchMode)


def make_scorer(
    model: Any, tokenizer: Any, task: Any, device: torch.device, valid_vocab: int, run_options: dict[str, Any]
) -> PathScorer:
    """The path scorer of a search run: with prefix reuse (`cola.reuse_prefix`, the default) or the plain one."""
    if run_options.get("reuse_prefix", True):
        megabytes = float(run_options.get("prefix_cache_mb", 512))
        batch = int(run_options.get("batch_paths", 4))
        if batch < 1:
            raise UserError(f"cola.batch_paths must be >= 1, got {batch}")
        return PrefixReusingScorer(
            model, tokenizer, task, device, valid_vocab, cache_bytes=int(megabytes * 2**20), batch_paths=batch
        )
    return PathScorer(model, tokenizer, task, device, valid_vocab)


def evaluate_search(cfg: DictConfig) -> dict[str, Any]:
    """search=cola | cola_router over `cfg.task` (a task item source, not one of evaluate.py's own tasks: the
    dispatcher checks that)."""
    if cfg.get("search") not in SEARCH_MODES:
        raise UserError(
            f"search must be one of {', '.join(SEARCH_MODES)} (or null for no search), got {cfg.get('search')!r}"
        )
    task_spec = cfg.get("task")
    options = OmegaConf.to_container(cfg.cola, resolve=True)
    num_items = options.pop("num_items", None)
    run_options = {key: options.pop(key) for key in RUN_OPTIONS if key in options}
    search_cfg = ColaConfig.from_dict(options)
    if cfg.search == "cola" and run_options.get("router"):
        raise UserError("cola.router applies a saved path router: use it with search=cola_router")

    device = pick_device(cfg.get("device", "auto"))
    torch.manual_seed(int(cfg.seed))
    model, tokenizer, valid_vocab, ckpt = load_model_and_tokenizer(cfg, device)
    source = os.path.abspath(cfg.ckpt_path) if ckpt is not None else OmegaConf.select(cfg, "model.init_from")
    task = load_task(str(task_spec))
    scorer = make_scorer(model, tokenizer, task, device, valid_vocab, run_options)
    out_dir = str(cfg.paths.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    if cfg.search == "cola_router":
        return evaluate_router(cfg, model, task, scorer, search_cfg, source, run_options, out_dir)

    items = task.items[: int(num_items)] if num_items else task.items
    depth = len(model.layers)
    rows, wall = search_items(ColaSearch(depth, search_cfg), scorer, items, range(len(items)), task.name, out_dir)
    return write_search_result(cfg, rows, wall, task, model, search_cfg, source, scorer, out_dir)
