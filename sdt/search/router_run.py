"""`python evaluate.py search=cola_router task=<task> ckpt_path=... | model.init_from=...`: search, train, route.

1. Split the task's items by a seeded shuffle into training and held-out items (`cola_router.*` sizes).
2. CoLa search on the training items (the oracle: its reward knows the gold answer), as `search=cola`.
3. Candidates: the original path and the paths found correct most often (sdt/search/router.py); every candidate
   is scored on every training item, and a linear head learns P(correct | hidden state after the shared prefix).
4. On the held-out items the router picks a path from the hidden state alone, no gold answer, and the model
   answers under it. Writes `cola_router.pt`, `cola_router.json` and `cola_router.png` in the run directory.

`cola.router=<cola_router.pt>` skips 1-3 and applies a saved router to the held-out items of the same split.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from sdt.analysis.plots import _new_figure, _save
from sdt.common.errors import UserError
from sdt.models import LanguageModel
from sdt.models.transformer import positions_from_pad_mask
from sdt.search.cola import ColaConfig, ColaSearch
from sdt.search.prefix_cache import PrefixReusingScorer
from sdt.search.results import result_header, reuse_counts, search_items, summarise, write_search_result
from sdt.search.router import PathRouter, RouterConfig, fit_router, select_candidates, split_items
from sdt.search.tasks import PathScorer, Task, TaskItem

log = logging.getLogger(__name__)

ROUTER_NOTE = (
    "Held-out items are answered under the path the router picks from the hidden state, without the gold answer; "
    "only the search on the training items uses it."
)


@torch.no_grad()
def prefix_features(scorer: PathScorer, item: TaskItem, prefix: tuple[int, ...]) -> Tensor:
    """The hidden state after `prefix`, averaged over the input's real tokens (D,): what the router reads.

    Multiple choice: over the item's batch of prompt + choice rows (the candidates' own first layers, reused from
    the prefix cache). Short answer: over the prompt, the generation's prefill input."""
    model: LanguageModel = scorer.model
    if scorer.task.kind == "multiple_choice":
        ids, mask, _ = scorer._choice_inputs(item)
    else:
        ids = torch.tensor([scorer.tokenizer.encode(item.prompt)], device=scorer.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
    if isinstance(scorer, PrefixReusingScorer) and scorer.task.kind == "multiple_choice" and prefix:
        state = scorer.prefix_state(item, prefix)
    else:
        state = model.dropout(model.embed_tokens(ids))  # as in LanguageModel.forward
        if prefix:
            *_, state = model.layer_path_states(
                state,
                prefix,
                0,
                positions=positions_from_pad_mask(mask),
                pad_mask=mask,
                routing=scorer.routing or "topk",
                diagnostics=False,
            )
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    return ((state.float() * weights).sum((0, 1)) / weights.sum()).cpu()


def candidate_correctness(
    scorer: PathScorer,
    items: list[TaskItem],
    indices: list[int],
    candidates: list[tuple[int, ...]],
    known: dict[int, dict[tuple[int, ...], float]],
    desc: str,
) -> Tensor:
    """(N, K) correctness of every candidate on every item; rewards already scored by the search are reused."""
    out = torch.zeros(len(items), len(candidates))
    for row, (index, item) in enumerate(zip(indices, tqdm(items, desc=desc, unit="item"), strict=True)):
        seen = known.get(index, {})
        missing = [p for p in candidates if p not in seen]
        if hasattr(scorer, "correct_many"):
            scored = dict(zip(missing, scorer.correct_many(item, missing), strict=True))
        else:
            scored = {p: scorer.correct(item, p) for p in missing}
        for k, p in enumerate(candidates):
            out[row, k] = float(seen[p] if p in seen else scored[p])
    return out


def evaluate_router(
    cfg: DictConfig,
    model: LanguageModel,
    task: Task,
    scorer: PathScorer,
    search_cfg: ColaConfig,
    source: str | None,
    run_options: dict[str, Any],
    out_dir: str,
) -> dict[str, Any]:
    rcfg = RouterConfig.from_dict(OmegaConf.to_container(cfg.cola_router, resolve=True))
    depth = len(model.layers)
    original = tuple(range(depth))
    train_idx, heldout_idx = split_items(len(task.items), rcfg)
    timings: dict[str, float] = {}
    train_summary: dict[str, Any] | None = None

    if run_options.get("router"):
        router = PathRouter.load(str(run_options["router"]))
        if router.depth != depth:
            raise UserError(f"cola.router was trained on a {router.depth}-layer model, this one has {depth}")
        if router.meta.get("task") == task.name:
            leaked = sorted(set(router.meta.get("train_indices", [])) & set(heldout_idx))
            if leaked:
                raise UserError(
                    f"cola.router was trained on {len(leaked)} of this split's held-out items (e.g. {leaked[:5]}): "
                    f"pick another cola_router.split_seed / sizes, or the router's own split"
                )
        router_path = os.path.abspath(str(run_options["router"]))
    else:
        if rcfg.prefix_layers >= depth:
            raise UserError(f"cola_router.prefix_layers={rcfg.prefix_layers} must be below the depth {depth}")
        train_items = [task.items[i] for i in train_idx]
        rewards: dict[int, dict[tuple[int, ...], float]] = {}
        rows, timings["search_seconds"] = search_items(
            ColaSearch(depth, search_cfg), scorer, train_items, train_idx, task.name, out_dir, rewards
        )
        # The training split's search is a search=cola run of its own: cola.json and its plots.
        train_summary = summarise(rows, depth)
        write_search_result(cfg, rows, timings["search_seconds"], task, model, search_cfg, source, scorer, out_dir)
        correct_paths = [[p for p, r in rewards[i].items() if r >= 1.0] for i in train_idx]
        candidates = select_candidates(correct_paths, original, rcfg.prefix_layers, rcfg.num_candidates)
        start = time.perf_counter()
        labels = candidate_correctness(scorer, train_items, train_idx, candidates, rewards, "router labels")
        feats = torch.stack([prefix_features(scorer, it, original[: rcfg.prefix_layers]) for it in train_items])
        timings["label_seconds"] = time.perf_counter() - start
        meta = {
            "task": task.name,
            "checkpoint": source,
            "train_indices": train_idx,
            "heldout_indices": heldout_idx,
            "simulations": search_cfg.simulations,
            "config": OmegaConf.to_container(cfg.cola_router, resolve=True),
            "train_candidate_accuracy": labels.mean(0).tolist(),
        }
        start = time.perf_counter()
        router, _ = fit_router(feats, labels, candidates, depth, rcfg.prefix_layers, rcfg, meta)
        timings["train_seconds"] = time.perf_counter() - start
        router_path = os.path.join(out_dir, "cola_router.pt")
        router.save(router_path)

    # Held-out items: every candidate's correctness (for the length-penalty sweep and the baselines) and the
    # router's choice from the hidden state.
    start = time.perf_counter()
    heldout_items = [task.items[i] for i in heldout_idx]
    prefix = original[: router.prefix_layers]
    feats = torch.stack([prefix_features(scorer, it, prefix) for it in heldout_items])
    correct = candidate_correctness(scorer, heldout_items, heldout_idx, router.candidates, {}, "router held-out")
    timings["heldout_seconds"] = time.perf_counter() - start
    lengths = router.lengths
    picks = router.route(feats)
    probs = router.probabilities(feats)
    rows_out = [
        {
            "index": index,
            "path": list(router.candidates[k]),
            "length": len(router.candidates[k]),
            "candidate": k,
            "correct": bool(correct[n, k]),
            "original_correct": bool(correct[n, 0]),
            "probabilities": probs[n].tolist(),  # the router's P(correct) per candidate
            "candidates_correct": correct[n].bool().tolist(),
        }
        for n, (index, k) in enumerate(zip(heldout_idx, picks, strict=True))
    ]
    sweep = []
    for lam in sorted({*rcfg.length_penalties, router.length_penalty}):
        chosen = router.route(feats, lam)
        sweep.append(
            {
                "length_penalty": lam,
                "accuracy": float(correct[torch.arange(len(chosen)), chosen].mean()),
                "mean_path_length": float(lengths[chosen].mean()),
            }
        )
    train_acc = router.meta.get("train_candidate_accuracy")
    static = None
    if train_acc is not None:  # the best single path on the training items, applied to every held-out item
        k = max(range(len(train_acc)), key=lambda j: (train_acc[j], -len(router.candidates[j])))
        static = {
            "path": list(router.candidates[k]),
            "length": len(router.candidates[k]),
            "train_accuracy": train_acc[k],
            "accuracy": float(correct[:, k].mean()),
        }
    accuracy = sum(r["correct"] for r in rows_out) / len(rows_out)
    mean_len = float(np.mean([r["length"] for r in rows_out]))
    out: dict[str, Any] = {
        **result_header(task, source, model),
        "router": router_path,
        "trained_here": not run_options.get("router"),
        "num_train_items": len(router.meta.get("train_indices", [])),
        "num_heldout_items": len(heldout_idx),
        "accuracy": accuracy,
        "original_accuracy": float(correct[:, 0].mean()),
        "mean_path_length": mean_len,
        "original_path_length": depth,
        "layer_saving": 1.0 - mean_len / depth,
        "length_penalty": router.length_penalty,
        "candidate_oracle_accuracy": float(correct.max(1).values.mean()),
        "static_path": static,
        "sweep": sweep,
        "cv": router.meta.get("cv"),
        "candidates": [
            {
                "path": list(p),
                "length": len(p),
                "heldout_accuracy": float(correct[:, k].mean()),
                "train_accuracy": None if train_acc is None else train_acc[k],
            }
            for k, p in enumerate(router.candidates)
        ],
        "train_search": train_summary,
        "simulations": router.meta.get("simulations"),
        "train_indices": router.meta.get("train_indices"),
        "heldout_indices": heldout_idx,
        "config": {"cola_router": OmegaConf.to_container(cfg.cola_router, resolve=True), **run_options},
        "timings": timings,
        **reuse_counts(scorer),
        "note": ROUTER_NOTE,
        "items": rows_out,
    }
    if cfg.get("plots", True):
        out["plot"] = plot_router(out, os.path.join(out_dir, "cola_router.png"))
    with open(os.path.join(out_dir, "cola_router.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(format_router_report(out))
    log.info("wrote %s", os.path.join(out_dir, "cola_router.json"))
    return out


def plot_router(r: dict[str, Any], path: str) -> str:
    """Held-out accuracy against executed layers: each candidate path, the router's length-penalty sweep, the
    router as configured, the best static path and the original path."""
    fig = _new_figure(5.8, 3.6)
    ax = fig.add_subplot()
    cands = r["candidates"]
    ax.scatter(
        [c["length"] for c in cands],
        [c["heldout_accuracy"] for c in cands],
        s=12,
        color="0.6",
        label="candidate path, every item",
    )
    sweep = sorted(r["sweep"], key=lambda s: s["mean_path_length"])
    ax.plot(
        [s["mean_path_length"] for s in sweep],
        [s["accuracy"] for s in sweep],
        "-o",
        ms=3,
        color="tab:blue",
        label="router, length-penalty sweep",
    )
    # (length, accuracy, marker, size, colour, label) of each single point
    points = [(r["mean_path_length"], r["accuracy"], "*", 160, "tab:red", f"router (penalty {r['length_penalty']:g})")]
    if r["static_path"]:
        static = r["static_path"]
        points.append((static["length"], static["accuracy"], "s", 40, "tab:green", "best training path, every item"))
    points.append((r["original_path_length"], r["original_accuracy"], "o", 60, "black", "original path"))
    for length, accuracy, marker, size, color, label in points:
        ax.scatter([length], [accuracy], marker=marker, s=size, color=color, zorder=5, label=label)
    ax.set_xlabel("executed layers per token (mean over held-out items)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Path router on {r['task']}: {r['num_heldout_items']} held-out items", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def format_router_report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"CoLa router   {r['task']}: trained on {r['num_train_items']} items, held out {r['num_heldout_items']}",
            (
                f"held-out      router {r['accuracy']:.1%} at {r['mean_path_length']:.2f} layers; original "
                f"{r['original_accuracy']:.1%} at {r['original_path_length']} ({r['layer_saving']:.1%} fewer layers)"
            ),
            (
                "baselines     best static path "
                + (f"{r['static_path']['accuracy']:.1%} at {r['static_path']['length']}" if r["static_path"] else "n/a")
                + f"; oracle over the candidates {r['candidate_oracle_accuracy']:.1%}"
            ),
            f"router        {r['router']}",
            f"note          {r['note']}",
        ]
    )
