"""The plots of a language-model evaluation: routing decisions, executed fractions, gate contributions, the capacity
sweep."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdt.analysis import plot_executed_fraction, plot_gate_contributions, plot_routing_heatmap
from sdt.data import Tokenizer
from sdt.evaluation.capacity_sweep import sweep_plot as plot_sweep
from sdt.models import LanguageModel


def sweep_plot(sweep: list[dict[str, Any]], out_dir: str, arch: str) -> str:
    return plot_sweep(sweep, out_dir, arch)


@torch.no_grad()
def routing_plots(
    model: LanguageModel,
    tokenizer: Tokenizer,
    passage: Tensor,
    routing: str,
    table: list[dict],
    training_csv: str | None,
    out_dir: str,
    device: torch.device,
    n_tokens: int = 96,
) -> dict[str, str]:
    """(a) token-by-layer decisions on a test passage, (b) executed fraction per layer, (c) S_CE/S_CU over training."""
    plots: dict[str, str] = {}
    ids = passage[:1, :n_tokens].to(device)  # (1, n): the start of a test passage
    out = model(ids, routing=routing)
    labels = [f"layer {e['layer']}\n{e['kind']}" for e in table]
    decisions = np.stack([out.decisions[e["layer"]][0].float().cpu().numpy() for e in table])  # (layers, n)
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    plots["heatmap"] = plot_routing_heatmap(
        decisions,
        tokens,
        labels,
        os.path.join(out_dir, "routing_heatmap.png"),
        title=f"Executed tokens per routed layer ({routing} routing)",
    )
    plots["executed_fraction"] = plot_executed_fraction(
        [e["executed_fraction"] for e in table],
        labels,
        os.path.join(out_dir, "executed_fraction.png"),
        capacity=model.config.capacity,
        title=f"Executed fraction per routed layer ({routing} routing)",
    )
    if training_csv and os.path.isfile(training_csv):
        path = plot_gate_contributions(training_csv, os.path.join(out_dir, "gate_contributions.png"))
        if path:
            plots["gate_contributions"] = path
    return plots
