"""`python -m sdt.report <sweep dir>`: evaluate every run of a sweep and write a comparison report into that dir.

Writes `report.md`, `report.csv` and PNG plots: validation perplexity against FLOPs per token (one line per model
family), KV-cache ratio against capacity, and validation loss curves. Routed models are quoted with their causal
routing mode's perplexity; the non-causal Top-K oracle is a separate column.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sdt.analysis.sweep_plots import plot_kv_ratio, plot_loss_curves, plot_pareto
from sdt.cli.dispatch import evaluate
from sdt.common.errors import UserError

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FAMILY_ORDER = ("dense", "mod", "sdt", "stt")
COLUMNS = (
    "run",
    "arch",
    "capacity",
    "routing",
    "global_step",
    "tokens_seen",
    "num_parameters",
    "val_perplexity",
    "test_perplexity",
    "val_perplexity_topk_oracle",
    "bits_per_byte",
    "flops_per_token",
    "flops_ratio_vs_dense",
    "train_flops_ratio_vs_dense",
    "kv_entries_ratio_vs_dense",
)


def find_runs(sweep_dir: str) -> list[Path]:
    """Job dirs of the sweep that hold a final checkpoint (dense jobs that were the same point hold none)."""
    return sorted(p.parent.parent for p in Path(sweep_dir).rglob("checkpoints/last.ckpt"))


def evaluate_run(run_dir: Path, cache_dir: str | None, max_batches: int | None, force: bool) -> dict[str, Any]:
    """eval.json of a run, computed with `sdt.cli.dispatch.evaluate` unless it is already there."""
    out = run_dir / "eval"
    if (out / "eval.json").is_file() and not force:
        return json.loads((out / "eval.json").read_text())

    overrides = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"paths.output_dir={out}",
        f"paths.root_dir={os.getcwd()}",
        "samples.prompts=[]",
        "generation.max_new_tokens=0",
        "plots=false",
    ]
    if cache_dir:
        overrides.append(f"paths.cache_dir={cache_dir}")
    if max_batches:
        overrides.append(f"max_batches={max_batches}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    GlobalHydra.instance().clear()
    return evaluate(cfg)


def read_curve(run_dir: Path, column: str = "val/loss") -> tuple[list[int], list[float]]:
    path = run_dir / "csv" / "metrics.csv"
    steps, values = [], []
    if path.is_file():
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    steps.append(int(row["step"]))
                    values.append(float(row[column]))
    return steps, values


def summarise(run_dir: Path, sweep_dir: str, ev: dict[str, Any]) -> dict[str, Any]:
    ckpt_cfg = (
        json.loads((run_dir / "train_result.json").read_text()) if (run_dir / "train_result.json").is_file() else {}
    )
    config = _run_config(run_dir)
    by_routing = ev.get("perplexity_by_routing", {})
    mode = ev.get("routing_mode", "dense")
    c = ev["compute"]
    batch, seq_len = config.get("data", {}).get("batch_size"), config.get("data", {}).get("seq_len")
    step = ev.get("global_step")
    return {
        "run": os.path.relpath(run_dir, sweep_dir),
        "arch": ev["arch"],
        "capacity": None if ev["arch"] == "dense" else c["capacity"],
        "routing": mode,
        "global_step": step,
        "tokens_seen": step * batch * seq_len * ckpt_cfg.get("world_size", 1) if step and batch and seq_len else None,
        "num_parameters": ev["num_parameters"],
        "val_perplexity": by_routing.get(mode, {}).get("val", ev["splits"].get("val", {}).get("perplexity")),
        "test_perplexity": by_routing.get(mode, {}).get("test", ev["splits"].get("test", {}).get("perplexity")),
        "val_perplexity_topk_oracle": by_routing.get("topk", {}).get("val"),
        "bits_per_byte": ev["bits_per_byte"],
        "flops_per_token": c["flops_per_token"],
        "flops_ratio_vs_dense": c["flops_ratio_vs_dense"],
        "train_flops_ratio_vs_dense": c["train_flops_ratio_vs_dense"],
        "kv_entries_ratio_vs_dense": c["kv_entries_ratio_vs_dense"],
    }


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config, from Hydra's record of it (no checkpoint needs loading)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def write_report(rows: list[dict[str, Any]], runs: dict[str, Path], sweep_dir: str) -> dict[str, str]:
    rows = sorted(rows, key=lambda r: (FAMILY_ORDER.index(r["arch"]), r["capacity"] or 0.0))
    with open(os.path.join(sweep_dir, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    plots = {
        "pareto": plot_pareto(rows, os.path.join(sweep_dir, "pareto_ppl_vs_flops.png")),
        "kv": plot_kv_ratio(rows, os.path.join(sweep_dir, "kv_cache_ratio.png")),
        "loss": plot_loss_curves(
            {r["run"]: read_curve(runs[r["run"]]) for r in rows}, rows, os.path.join(sweep_dir, "loss_curves.png")
        ),
    }
    lines = [
        "# Sweep report",
        "",
        (
            f"Sweep: `{os.path.abspath(sweep_dir)}`, {len(rows)} runs. Perplexity of routed models is measured in their "
            "causal routing mode (`routing`); the non-causal Top-K oracle is shown separately and is not the model's "
            "perplexity. FLOPs are analytic forward FLOPs per token at inference (`sdt/models/compute.py`); ratios are "
            "to the dense model of the same dimensions."
        ),
        "",
        (
            "| model | capacity | routing | steps | tokens | val ppl | test ppl | oracle val ppl | MFLOPs/token "
            "| FLOPs vs dense | train FLOPs vs dense | KV vs dense |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {_fmt(r['capacity'])} | {r['routing']} | {_fmt(r['global_step'])} | "
            f"{_fmt(r['tokens_seen'])} | {_fmt(r['val_perplexity'], 2)} | {_fmt(r['test_perplexity'], 2)} | "
            f"{_fmt(r['val_perplexity_topk_oracle'], 2)} | {r['flops_per_token'] / 1e6:.2f} | "
            f"{r['flops_ratio_vs_dense']:.3f} | {r['train_flops_ratio_vs_dense']:.3f} | "
            f"{r['kv_entries_ratio_vs_dense']:.3f} |"
        )
    lines += [
        "",
        "![perplexity vs FLOPs](pareto_ppl_vs_flops.png)",
        "",
        "![KV cache](kv_cache_ratio.png)",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    with open(os.path.join(sweep_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return plots


def build_report(
    sweep_dir: str, cache_dir: str | None = None, max_batches: int | None = None, force: bool = False
) -> list[dict[str, Any]]:
    if not os.path.isdir(sweep_dir):
        raise UserError(f"sweep dir not found: {sweep_dir}")
    runs = find_runs(sweep_dir)
    if not runs:
        raise UserError(f"no runs with checkpoints/last.ckpt under {sweep_dir}")
    rows, by_name = [], {}
    for run_dir in runs:
        log.info("evaluating %s", run_dir)
        row = summarise(run_dir, sweep_dir, evaluate_run(run_dir, cache_dir, max_batches, force))
        if not all(math.isfinite(row[k]) for k in ("val_perplexity", "flops_per_token") if row[k] is not None):
            log.warning("%s has a non-finite result", run_dir)
        rows.append(row)
        by_name[row["run"]] = run_dir
    write_report(rows, by_name, sweep_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdt.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or any folder of training runs)")
    parser.add_argument("--max-batches", type=int, default=None, help="cap evaluation batches per split")
    parser.add_argument("--cache-dir", default=os.environ.get("SDT_CACHE_DIR"), help="tokenised-data cache")
    parser.add_argument("--force", action="store_true", help="re-evaluate runs that already have eval/eval.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = build_report(
            args.sweep_dir, args.cache_dir or os.path.join(os.getcwd(), ".cache", "sdt"), args.max_batches, args.force
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(Path(args.sweep_dir, "report.md").read_text())
    print(f"\n{len(rows)} runs; wrote report.md, report.csv and plots into {args.sweep_dir}")


if __name__ == "__main__":
    main()
