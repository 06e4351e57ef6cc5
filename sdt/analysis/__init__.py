"""Analysis of trained models: routing plots."""

from sdt.analysis.plots import (
    plot_capacity_sweep,
    plot_executed_fraction,
    plot_gate_contributions,
    plot_routing_heatmap,
)

__all__ = ["plot_capacity_sweep", "plot_executed_fraction", "plot_gate_contributions", "plot_routing_heatmap"]
