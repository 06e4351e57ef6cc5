"""How exactly each causal routing mode holds a routed model to its capacity, sequence by sequence.

    python benchmarks/budget_exactness.py <run>/checkpoints/last.ckpt [<ckpt> ...] --capacities 0.25,0.5,0.75 \
        --split test --out budget.json --markdown budget.md

For each checkpoint and capacity (set at run time with `set_inference_capacity`, the calibrated quantile grids) the
split is run in every causal mode the model has (budget, threshold, student). For every sequence and routed layer,
the executed share of each prefix of at least `--min-tokens` tokens (64: the budget mode's contract) is compared with
the capacity. Reported per mode: the largest deviation over every prefix, layer and sequence (`max_prefix_dev`), the
same for whole sequences only (`max_sequence_dev`), the mean absolute whole-sequence deviation, the share of
(sequence, layer) pairs whose every prefix stays within `--tolerance` (0.02, two percentage points), and the mean
executed fraction. Positions a model always executes (`model.always_execute_first`) count as executed, as they do
against its capacity. The budget mode is held to the tolerance; threshold and student are shown for contrast (their
calibration holds the capacity on average over the calibration blocks, not per sequence).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import Tensor

from sdt.data import DataConfig, Tokenizer
from sdt.data.datamodule import LMDataModule
from sdt.evaluation.loading import load_model
from sdt.models import LanguageModel
from sdt.models.calibration import mode_of_score
from sdt.routing.selection import CAUSAL_MODES
from sdt.training.checkpoint import load_checkpoint


def prefix_deviation(decisions_BT: Tensor, capacity: float, min_tokens: int) -> tuple[Tensor, Tensor]:
    """(B,) largest |executed share - capacity| over the prefixes of at least `min_tokens` tokens, and (B,) the
    whole sequence's |executed share - capacity|."""
    T = decisions_BT.shape[1]
    n = torch.arange(1, T + 1, dtype=torch.float64)
    share_BT = decisions_BT.double().cumsum(dim=1) / n
    dev_BT = (share_BT - capacity).abs()
    start = min(min_tokens, T) - 1
    return dev_BT[:, start:].max(dim=1).values, dev_BT[:, -1]


def modes_of(model: LanguageModel) -> list[str]:
    """The causal modes of `model`: budget, and each mode one of its calibrated scores routes by."""
    scored = {mode_of_score(name) for _, layer in model.routed_layers() for name in layer.thresholds()}
    return [m for m in CAUSAL_MODES if m == "budget" or m in scored]


@torch.no_grad()
def measure(
    model: LanguageModel, loader, capacity: float, mode: str, min_tokens: int, tolerance: float, max_batches: int | None
) -> dict[str, Any]:
    prefix_max, seq_max, seq_abs, within, pairs, executed, tokens = 0.0, 0.0, 0.0, 0, 0, 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = model(batch["input_ids"], routing=mode, diagnostics=False)
        for _, d_BT in sorted(out.decisions.items()):
            prefix_dev, seq_dev = prefix_deviation(d_BT, capacity, min_tokens)
            prefix_max = max(prefix_max, float(prefix_dev.max()))
            seq_max = max(seq_max, float(seq_dev.max()))
            seq_abs += float(seq_dev.sum())
            within += int((prefix_dev <= tolerance + 1e-12).sum())
            pairs += d_BT.shape[0]
            executed += float(d_BT.sum())
            tokens += d_BT.numel()
    return {
        "max_prefix_dev": prefix_max,
        "max_sequence_dev": seq_max,
        "mean_abs_sequence_dev": seq_abs / pairs,
        "share_within_tolerance": within / pairs,
        "executed_fraction": executed / tokens,
        "sequences_x_layers": pairs,
    }


def run(ckpt_path: str, capacities: list[float], args: argparse.Namespace) -> list[dict[str, Any]]:
    ckpt = load_checkpoint(ckpt_path)
    model = load_model(ckpt, torch.device("cpu"))
    if not model.is_routed:
        raise SystemExit(f"{ckpt_path}: a dense model has no capacity to hold")
    data = dict(ckpt["sdt"]["config"]["data"])
    if args.cache_dir:
        data["cache_dir"] = args.cache_dir
    datamodule = LMDataModule(DataConfig.from_dict(data), tokenizer=Tokenizer.from_json(ckpt["sdt"]["tokenizer"]))
    datamodule.prepare_data()
    datamodule.setup("test")
    loader_fn = datamodule.test_dataloader if args.split == "test" else datamodule.val_dataloader
    rows = []
    for capacity in capacities:
        model.set_inference_capacity(capacity)
        for mode in modes_of(model):
            res = measure(model, loader_fn(), capacity, mode, args.min_tokens, args.tolerance, args.max_batches)
            row = {"checkpoint": ckpt_path, "arch": model.config.arch, "capacity": capacity, "routing": mode, **res}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "checkpoint"}), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], tolerance: float, min_tokens: int) -> str:
    lines = [
        (
            f"Executed share against capacity, every prefix of >= {min_tokens} tokens of every sequence and routed layer "
            f"(tolerance {tolerance:g}):"
        ),
        "",
        (
            "| model | capacity | mode | executed | max prefix dev | max sequence dev | mean abs sequence dev "
            "| within tolerance |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['capacity']:g} | {r['routing']} | {r['executed_fraction']:.3f} "
            f"| {r['max_prefix_dev']:.4f} | {r['max_sequence_dev']:.4f} | {r['mean_abs_sequence_dev']:.4f} "
            f"| {r['share_within_tolerance']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="routed training checkpoints (.ckpt)")
    parser.add_argument("--capacities", default="0.25,0.5,0.75", help="comma-separated, each in (0, 1]")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--min-tokens", type=int, default=64, help="shortest prefix held to the tolerance")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed |executed share - capacity|")
    parser.add_argument("--max-batches", type=int, default=None, help="batches of the split (default: all)")
    parser.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file")
    parser.add_argument("--markdown", default=None, help="markdown table file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    capacities = [float(c) for c in args.capacities.split(",")]
    if not all(0 < c <= 1 for c in capacities):
        parser.error(f"--capacities must be in (0, 1], got {capacities}")
    rows = [row for path in args.checkpoints for row in run(path, capacities, args)]
    config = {k: getattr(args, k) for k in ("split", "min_tokens", "tolerance", "max_batches")}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=2)
    table = markdown(rows, args.tolerance, args.min_tokens)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
