"""The results of a CoLa search: one row per item, the summary over items, cola.json and its report text."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sdt.models import LanguageModel
from sdt.search.cola import ColaConfig, ColaSearch
from sdt.search.plots import cola_plots, layer_edit_counts
from sdt.search.prefix_cache import PrefixReusingScorer
from sdt.search.tasks import PathScorer, Task, TaskItem

log = logging.getLogger(__name__)

ORACLE_NOTE = (
    "Per-input search rewarded with the gold answer: an oracle upper bound on per-input depth adaptation "
    "(as in the paper), not the accuracy of a deployable method."
)


def summarise(items: list[dict[str, Any]], depth: int) -> dict[str, Any]:
    """The headline figures of a search over `items` (each with original_correct and best_correct)."""
    correct = [it for it in items if it["original_correct"]]
    wrong = [it for it in items if not it["original_correct"]]
    shorter = [it for it in correct if it["best_correct"] and it["best_correct"]["length"] < depth]
    fixed = [it for it in wrong if it["best_correct"]]
    best_lengths = [it["best_correct"]["length"] for it in items if it["best_correct"]]

    def share(part: list, whole: list) -> float | None:
        return len(part) / len(whole) if whole else None

    return {
        "num_items": len(items),
        "num_originally_correct": len(correct),
        "original_accuracy": len(correct) / len(items),
        "oracle_accuracy": sum(bool(it["best_correct"]) for it in items) / len(items),
        "share_correct_with_shorter_path": share(shorter, correct),
        "share_wrong_with_correct_path": share(fixed, wrong),
        "mean_best_correct_length": statistics.fmean(best_lengths) if best_lengths else None,
        "mean_best_correct_length_originally_correct": (
            statistics.fmean(it["best_correct"]["length"] for it in correct) if correct else None
        ),
    }


def search_items(
    search: ColaSearch,
    scorer: PathScorer,
    items: Sequence[TaskItem],
    indices: Sequence[int],
    task_name: str,
    out_dir: str,
    rewards: dict[int, dict[tuple[int, ...], float]] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Search every item; one result row per item (also appended to `cola_items.jsonl` as items finish, so a run cut
    short still leaves its results) and the wall time. `rewards`, if given, collects every scored path's reward
    per item index."""
    rows = []
    start = time.perf_counter()
    with open(os.path.join(out_dir, "cola_items.jsonl"), "w") as partial:
        for index, item in zip(indices, tqdm(items, desc=f"cola {task_name}", unit="item"), strict=True):
            seen = rewards.setdefault(index, {}) if rewards is not None else {}

            def reward(path: tuple[int, ...], item: TaskItem = item, seen: dict = seen) -> float:
                seen[path] = float(scorer.correct(item, path))
                return seen[path]

            result = search.search(reward)
            correct_paths = [e for e in result.best if e["reward"] >= 1.0]
            rows.append(
                {
                    "index": index,
                    "prompt": item.prompt,
                    "answer": item.answer,
                    "original_correct": result.original_reward >= 1.0,
                    "best_correct": correct_paths[0] if correct_paths else None,
                    **result.to_dict(),
                }
            )
            partial.write(json.dumps(rows[-1]) + "\n")
            partial.flush()
    return rows, time.perf_counter() - start


def reuse_counts(scorer: PathScorer) -> dict[str, Any]:
    """Layer calls run and saved by prefix reuse (empty for the plain scorer)."""
    if not isinstance(scorer, PrefixReusingScorer):
        return {"reuse_prefix": False}
    total = scorer.layers_run + scorer.layers_reused
    return {
        "reuse_prefix": True,
        "layer_calls": scorer.layers_run,
        "layer_calls_reused": scorer.layers_reused,
        "share_of_layer_calls_reused": scorer.layers_reused / total if total else None,
    }


def result_header(task: Task, source: str | None, model: LanguageModel) -> dict[str, Any]:
    """What every CoLa result file opens with: the task, the checkpoint and the model it searched."""
    return {
        "task": task.name,
        "kind": task.kind,
        "checkpoint": source,
        "arch": model.config.arch,
        "depth": len(model.layers),
    }


def write_search_result(
    cfg: DictConfig,
    rows: list[dict[str, Any]],
    wall: float,
    task: Any,
    model: Any,
    search_cfg: ColaConfig,
    source: str | None,
    scorer: PathScorer,
    out_dir: str,
) -> dict[str, Any]:
    """cola.json (and its plots) of a search whose per-item results are `rows`."""
    depth = len(model.layers)
    evaluations = sum(r["evaluations"] for r in rows)
    options = OmegaConf.to_container(cfg.cola, resolve=True)
    out: dict[str, Any] = {
        **result_header(task, source, model),
        "simulations": search_cfg.simulations,
        "config": {**options, "block_sizes": list(search_cfg.block_sizes)},
        "oracle": True,
        "note": ORACLE_NOTE,
        **summarise(rows, depth),
        "evaluations": evaluations,
        "wall_seconds": wall,
        "seconds_per_evaluation": wall / max(evaluations, 1),
        **reuse_counts(scorer),
        "device": str(next(model.parameters()).device),
        "items": rows,
    }
    out["layer_edits"] = layer_edit_counts(out)
    if cfg.get("plots", True):
        out["plots"] = cola_plots(out, out_dir)
    with open(os.path.join(out_dir, "cola.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(format_search_report(out))
    log.info("wrote %s", os.path.join(out_dir, "cola.json"))
    return out


def format_search_report(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    mean_len = r["mean_best_correct_length"]
    return "\n".join(
        [
            f"CoLa search   {r['task']} ({r['kind']}, {r['num_items']} items), {r['checkpoint']}",
            f"model         {r['arch']}, {r['depth']} layers; {r['simulations']} simulations per item",
            (
                f"accuracy      original {pct(r['original_accuracy'])}, oracle (best path per item) "
                f"{pct(r['oracle_accuracy'])}"
            ),
            (
                f"correct -> shorter correct path   {pct(r['share_correct_with_shorter_path'])} "
                f"of {r['num_originally_correct']}"
            ),
            (
                f"wrong -> correct path             {pct(r['share_wrong_with_correct_path'])} "
                f"of {r['num_items'] - r['num_originally_correct']}"
            ),
            (
                f"mean length of best correct paths {'n/a' if mean_len is None else f'{mean_len:.2f}'} "
                f"(original {r['depth']})"
            ),
            (
                f"search        {r['evaluations']} path evaluations in {r['wall_seconds']:.1f} s "
                f"({r['seconds_per_evaluation']:.3f} s each)"
            ),
            *(
                [f"prefix reuse  {r['share_of_layer_calls_reused']:.1%} of layer calls reused"]
                if r.get("share_of_layer_calls_reused") is not None
                else []
            ),
            f"note          {r['note']}",
        ]
    )
