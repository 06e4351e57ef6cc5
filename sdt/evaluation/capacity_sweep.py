"""Quality against compute at run time: one checkpoint evaluated at several inference capacities, and the
executed share of each routing mode (`evaluate.py ... inference_capacity=[...]`).

Each capacity sets the routed layers' thresholds from their calibrated quantile grids
(`LanguageModel.set_inference_capacity`), with no retraining; the FLOP and KV ratios come from the executed fractions
measured on the split, not from the capacity asked for.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdt.analysis import plot_capacity_sweep
from sdt.common.errors import UserError
from sdt.models import LanguageModel
from sdt.models.compute import measured_flops, measured_kv_entries


def executed_fractions(model: LanguageModel, stats: dict[str, float]) -> dict[int, float]:
    """Routed layer index -> executed fraction, from a split's mean stats (`run_split`)."""
    return {i: stats[f"layers.{i}.executed_fraction"] for i, _ in model.routed_layers()}


def mean_executed_fraction(model: LanguageModel, stats: dict[str, float]) -> float:
    return statistics.fmean(executed_fractions(model, stats).values())


def measured_ratios(model: LanguageModel, fractions: dict[int, float], seq_len: int) -> dict[str, float]:
    """FLOP and KV ratios to dense of a sequence of `seq_len` tokens whose routed layers executed `fractions`."""
    executed = [fractions[i] * seq_len for i, _ in model.routed_layers()]
    flops = measured_flops(model.config, seq_len, executed)
    kv = measured_kv_entries(model.config, seq_len, executed)
    return {
        "flops_ratio_vs_dense": flops["flops_ratio_vs_dense"],
        "kv_bytes_ratio_vs_dense": kv / (model.config.n_layers * seq_len),
    }


def check_capacities(capacities: Sequence[Any]) -> list[float]:
    values = list(capacities)
    bad = [c for c in values if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1]
    if bad:
        raise UserError(f"inference_capacity must list numbers in (0, 1], got {bad}")
    return [float(c) for c in values]


@torch.no_grad()
def capacity_sweep(
    model: LanguageModel,
    capacities: Sequence[float],
    run: Callable[[str], dict[str, Any]],
    mode: str,
    seq_len: int,
) -> list[dict[str, Any]]:
    """One entry per capacity: `capacity`, `perplexity`, `nll`, `executed_fraction` (mean over routed layers),
    `executed_fraction_by_layer`, `flops_ratio_vs_dense`, `kv_bytes_ratio_vs_dense`. `run(mode)` evaluates the
    split (`run_split`). The model's thresholds and capacity are restored afterwards."""
    saved = model.routing_state()
    entries = []
    try:
        for capacity in check_capacities(capacities):
            model.set_inference_capacity(capacity)
            res = run(mode)
            fractions = executed_fractions(model, res["stats"])
            entries.append(
                {
                    "capacity": capacity,
                    "routing": mode,
                    "perplexity": math.exp(min(res["nll"], 700.0)),
                    "nll": res["nll"],
                    "executed_fraction": statistics.fmean(fractions.values()),
                    "executed_fraction_by_layer": {str(i): f for i, f in fractions.items()},
                    **measured_ratios(model, fractions, seq_len),
                }
            )
    finally:
        model.restore_routing_state(saved)
    return entries


def sweep_plot(sweep: list[dict[str, Any]], out_dir: str, arch: str) -> str:
    return plot_capacity_sweep(
        sweep,
        os.path.join(out_dir, "capacity_sweep.png"),
        title=f"{arch}: test perplexity against compute ({sweep[0]['routing']} routing)",
    )


def format_sweep(sweep: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"{'capacity':>9}{'executed':>10}{'ppl':>10}{'FLOPs/dense':>13}{'KV/dense':>10}"]
    for e in sweep:
        lines.append(
            f"{e['capacity']:>9.3f}{e['executed_fraction']:>10.3f}{e['perplexity']:>10.2f}"
            f"{e['flops_ratio_vs_dense']:>13.3f}{e['kv_bytes_ratio_vs_dense']:>10.3f}"
        )
    return lines
