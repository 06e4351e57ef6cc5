"""The learned path router against SDT/STT routing at equal executed layers per token, on the same held-out items.

    python benchmarks/cola_router_vs_routing.py <run>/cola_router.json <sdt run>/checkpoints/last.ckpt \
        [<stt run>/checkpoints/last.ckpt ...] --out router_vs_routing.json

`cola_router.json` (from `python evaluate.py search=cola_router ...` on a dense model) lists its held-out items and,
per item, the router's P(correct) and the correctness of every candidate path, so the router can be re-run at any
length penalty without the model. Each routed checkpoint (trained from the same backbone) answers the same items
in its causal routing mode; its executed layers per token are measured on the items' own tokens: every block that
always runs counts 1, a routed block counts the share of the item's real tokens it runs on. The router is then
taken at the length penalty whose mean path length on these items is closest to that figure (at or below it when
one exists), and both are compared item by item: accuracy, and the items only one of them gets right.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from sdt.blocks.layers import Block
from sdt.data import Tokenizer
from sdt.evaluation.loading import load_model
from sdt.search.router import choose
from sdt.search.tasks import PathScorer, load_task
from sdt.training.checkpoint import load_checkpoint


@torch.no_grad()
def routed_model_on_items(ckpt_path: str, task_name: str, indices: list[int]) -> dict[str, Any]:
    """Accuracy and executed layers per token of a routed checkpoint on the given items of a task."""
    ckpt = load_checkpoint(ckpt_path)
    model = load_model(ckpt, torch.device("cpu"))
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    vocab = int(ckpt["sdt"].get("tokenizer_vocab_size", tokenizer.vocab_size))
    task = load_task(task_name)
    scorer = PathScorer(model, tokenizer, task, torch.device("cpu"), vocab)
    blocks = sum(isinstance(m, Block) for m in model.modules())
    correct, executed = [], []
    for index in indices:
        item = task.items[index]
        correct.append(bool(scorer.correct(item, None)))
        ids, mask, _ = scorer._choice_inputs(item)
        out = model(ids, pad_mask=mask, routing=scorer.routing, diagnostics=False)
        fractions = [float(d[mask].float().mean()) for d in out.decisions.values()]  # routed blocks
        executed.append(blocks - len(fractions) + sum(fractions))
    return {
        "checkpoint": ckpt_path,
        "arch": model.config.arch,
        "routing": scorer.routing,
        "blocks": blocks,
        "accuracy": sum(correct) / len(correct),
        "executed_layers_per_token": sum(executed) / len(executed),
        "correct": correct,
    }


def router_at(router: dict[str, Any], length_penalty: float) -> tuple[list[bool], float]:
    """The router's per-item correctness and mean path length at another length penalty."""
    items = router["items"]
    probs = torch.tensor([it["probabilities"] for it in items])
    lengths = torch.tensor([c["length"] for c in router["candidates"]], dtype=torch.float32)
    picks = choose(probs, lengths, router["depth"], length_penalty).tolist()
    correct = [bool(it["candidates_correct"][k]) for it, k in zip(items, picks, strict=True)]
    return correct, float(lengths[picks].mean())


def compare(router: dict[str, Any], routed: dict[str, Any]) -> dict[str, Any]:
    budget = routed["executed_layers_per_token"]
    grid = sorted({0.0, *(s["length_penalty"] for s in router["sweep"]), *(0.05 * i for i in range(1, 201))})
    options = [(lam, *router_at(router, lam)) for lam in grid]
    below = [o for o in options if o[2] <= budget + 1e-9]
    lam, r_correct, r_len = (
        max(below, key=lambda o: (o[2], sum(o[1]))) if below else min(options, key=lambda o: abs(o[2] - budget))
    )
    d_correct = routed["correct"]
    pairs = list(zip(r_correct, d_correct, strict=True))
    return {
        "routed": {k: v for k, v in routed.items() if k != "correct"},
        "router_length_penalty": lam,
        "router_mean_path_length": r_len,
        "router_accuracy": sum(r_correct) / len(r_correct),
        "router_at_or_below_budget": bool(below),
        "dense_original_accuracy": router["original_accuracy"],
        "both_correct": sum(a and b for a, b in pairs),
        "only_router_correct": sum(a and not b for a, b in pairs),
        "only_routed_correct": sum(b and not a for a, b in pairs),
        "neither": sum(not a and not b for a, b in pairs),
        "items": len(pairs),
    }


def main() -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("router_json")
    parser.add_argument("routed_ckpt", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.router_json) as f:
        router = json.load(f)
    results = []
    for path in args.routed_ckpt:
        routed = routed_model_on_items(path, router["task"], router["heldout_indices"])
        results.append(compare(router, routed))
        r = results[-1]
        print(
            f"{routed['arch']} ({routed['routing']}): {routed['accuracy']:.1%} at "
            f"{routed['executed_layers_per_token']:.2f} layers/token; router {r['router_accuracy']:.1%} at "
            f"{r['router_mean_path_length']:.2f} (penalty {r['router_length_penalty']:g}); dense original "
            f"{r['dense_original_accuracy']:.1%} at {router['depth']}; only router right {r['only_router_correct']}, "
            f"only {routed['arch']} right {r['only_routed_correct']}, both {r['both_correct']} of {r['items']}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
