"""Routing plots for papers and reports: which tokens each routed layer executes, and what drives the gate.

Figures are drawn on the Agg canvas directly (no pyplot), so nothing here touches matplotlib's global backend or
figure registry: safe to call from training callbacks and from threads, and figures are freed when they go out of
scope.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DPI = 150
MAX_TOKEN_CHARS = 12  # longer tokens are cut so one does not stretch the whole axis
CE_COLOR, CU_COLOR = "tab:blue", "tab:orange"
_ROUTING_COLUMN = re.compile(r"^routing/layers\.(\d+)\.(s_ce|s_cu|ce_dominant_fraction)$")
_ESCAPES = {"\n": "⏎", "\r": "␍", "\t": "⇥", " ": "␣", "$": r"\$"}  # "$" would otherwise start mathtext


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def display_token(token: str) -> str:
    """Make whitespace visible and keep mathtext out: "\\n" -> "⏎", " " -> "␣", "$" stays a dollar sign."""
    if not token:
        return "∅"
    if len(token) > MAX_TOKEN_CHARS:
        token = token[: MAX_TOKEN_CHARS - 1] + "…"
    return "".join(_ESCAPES.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in token)


def plot_routing_heatmap(
    decisions: np.ndarray,
    tokens: list[str],
    layer_labels: list[str],
    path: str,
    title: str = "Tokens executed by each routed layer",
) -> str:
    """`routing_heatmap_figure` written to `path` as a PNG. Returns path."""
    return _save(routing_heatmap_figure(decisions, tokens, layer_labels, title), path)


def routing_heatmap_figure(
    decisions: np.ndarray,
    tokens: list[str],
    layer_labels: list[str],
    title: str = "Tokens executed by each routed layer",
) -> Figure:
    """Heatmap of routing decisions: one row per routed layer, one column per token.

    decisions: (n_layers, T) of 0/1 decisions, or gate values in [0, 1] (then drawn with a colour bar).
    The figure widens with T so every token label stays legible (up to ~128 tokens).
    """
    decisions = np.asarray(decisions, dtype=float)
    if decisions.ndim != 2 or decisions.shape != (len(layer_labels), len(tokens)):
        raise ValueError(
            f"decisions must have shape (len(layer_labels), len(tokens)) = ({len(layer_labels)}, {len(tokens)}), "
            f"got {decisions.shape}"
        )
    n_layers, T = decisions.shape
    binary = bool(np.isin(decisions, (0.0, 1.0)).all())

    # ~0.16 inch per token column fits a rotated 9-point label; rows are kept short so T, not depth, sets the shape.
    fig = _new_figure(width=max(6.0, 2.5 + 0.16 * T), height=2.0 + 0.3 * n_layers)
    ax = fig.add_subplot()
    image = ax.imshow(
        decisions, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="Blues" if binary else "viridis"
    )
    ax.set_xticks(np.arange(T), [display_token(t) for t in tokens], rotation=90, fontsize=8, fontfamily="monospace")
    ax.set_yticks(np.arange(n_layers), layer_labels, fontsize=9)
    ax.set_xlabel("token (sequence position →)")
    ax.set_ylabel("routed layer")
    ax.set_title(title)
    # Thin white grid lines separate cells, which otherwise merge into bands at large T.
    ax.set_xticks(np.arange(T + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_layers + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)

    # Executed fraction per layer on the right, so the row's capacity can be read without counting cells.
    right = ax.secondary_yaxis("right")
    right.set_yticks(np.arange(n_layers), [f"{f:.0%}" for f in decisions.mean(axis=1)], fontsize=8)
    right.set_ylabel("executed" if binary else "mean gate", fontsize=9)

    if binary:
        cmap = image.get_cmap()
        handles = [
            Patch(color=cmap(1.0), label="executed"),
            Patch(facecolor=cmap(0.0), edgecolor="0.6", label="skipped"),
        ]
        fig.legend(handles=handles, loc="outside upper right", ncols=2, fontsize=8, frameon=False)
    else:
        fig.colorbar(image, ax=ax, pad=0.01, fraction=0.02 if T > 48 else 0.05, label="gate value g")
    return fig


def plot_executed_fraction(
    fractions: list[float],
    layer_labels: list[str],
    path: str,
    capacity: float | None = None,
    title: str = "Executed fraction per routed layer",
) -> str:
    """`executed_fraction_figure` written to `path` as a PNG. Returns path."""
    return _save(executed_fraction_figure(fractions, layer_labels, capacity, title), path)


def executed_fraction_figure(
    fractions: list[float],
    layer_labels: list[str],
    capacity: float | None = None,
    title: str = "Executed fraction per routed layer",
) -> Figure:
    """Bar chart of the share of tokens each routed layer executed, with the target capacity as a dashed line."""
    if len(fractions) != len(layer_labels):
        raise ValueError(f"got {len(fractions)} fractions for {len(layer_labels)} layer labels")
    n = len(fractions)
    # Wide enough for the title and for every label at its longest line (labels may span two lines).
    longest = max((max(len(line) for line in label.splitlines()) for label in layer_labels), default=0)
    fig = _new_figure(width=max(5.5, 1.5 + n * max(0.5, 0.075 * longest)), height=3.4)
    ax = fig.add_subplot()
    x = np.arange(n)
    bars = ax.bar(x, fractions, color="tab:blue", width=0.7, label="executed fraction")
    # Labels inside the bars: above them they would collide with the capacity line the bars sit near.
    ax.bar_label(bars, labels=[f"{f:.0%}" for f in fractions], label_type="center", color="white", fontsize=7)
    if capacity is not None:
        ax.axhline(capacity, color="black", linestyle="--", linewidth=1.0, label=f"target capacity γ = {capacity:g}")
    ax.set_xticks(x, layer_labels, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center")
    ax.set_xlabel("routed layer")
    ax.set_ylabel("executed fraction of tokens")
    ax.set_ylim(0, 1.1)  # fixed scale so plots of different runs compare at a glance
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _read_routing_series(metrics_csv: str) -> dict[str, dict[int, dict[int, float]]]:
    """{signal: {layer: {step: value}}} from a CSVLogger file whose rows only fill the columns logged that step."""
    series: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        columns = {name: m.groups() for name in reader.fieldnames or [] if (m := _ROUTING_COLUMN.match(name))}
        if not columns:
            return {}
        for row_index, row in enumerate(reader):
            step_text = row.get("step") or ""
            step = int(float(step_text)) if step_text else row_index  # no step column: fall back to row order
            for name, (layer, signal) in columns.items():
                value = row.get(name) or ""
                if value:
                    series[signal][int(layer)][step] = float(value)
    return {signal: dict(layers) for signal, layers in series.items()}


def _mean_over_layers(layers: dict[int, dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the mean over the layers logged at that step (layers may be logged at different steps)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for values in layers.values():
        for step, value in values.items():
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps])


def _plot_signal(ax, layers: dict[int, dict[int, float]], color: str, label: str) -> None:
    for values in layers.values():  # thin per-layer lines show the spread behind the mean
        steps = sorted(values)
        ax.plot(steps, [values[s] for s in steps], color=color, linewidth=0.6, alpha=0.35)
    steps, mean = _mean_over_layers(layers)
    ax.plot(steps, mean, color=color, linewidth=2.2, label=label)


def plot_gate_contributions(metrics_csv: str, path: str) -> str | None:
    """`gate_contributions_figure` written to `path` as a PNG. Returns path, or None, writing nothing, when the file
    has no routing columns."""
    fig = gate_contributions_figure(metrics_csv)
    return None if fig is None else _save(fig, path)


def gate_contributions_figure(metrics_csv: str) -> Figure | None:
    """S_CE (prediction) vs S_CU (novelty) over training, from a Lightning CSVLogger metrics.csv.

    Top panel: mean over routed layers of S_CE and S_CU (thick) with each layer thin. Bottom panel, when logged:
    the share of executed tokens whose S_CE exceeds S_CU. The paper's observation is that gating moves from novelty
    early in training to prediction later. None when the file has no routing columns.
    """
    series = _read_routing_series(metrics_csv)
    if not any(series.values()):
        return None
    has_dominance = bool(series.get("ce_dominant_fraction"))
    n_layers = len({layer for layers in series.values() for layer in layers})

    fig = _new_figure(width=6.5, height=5.5 if has_dominance else 3.4)
    axes = fig.subplots(2 if has_dominance else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if series.get("s_ce"):
        _plot_signal(ax, series["s_ce"], CE_COLOR, r"$S_{CE}$ (expected change: prediction)")
    if series.get("s_cu"):
        _plot_signal(ax, series["s_cu"], CU_COLOR, r"$S_{CU}$ (unexpected change: novelty)")
    ax.set_ylabel("mean surprise signal (0–1)")
    ax.set_title(f"What drives the gate during training ({n_layers} routed layer{'s' if n_layers != 1 else ''})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)

    if has_dominance:
        ax = axes[1]
        _plot_signal(ax, series["ce_dominant_fraction"], "tab:green", "mean over layers")
        ax.axhline(0.5, color="black", linestyle=":", linewidth=1.0, label="even split")
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.set_ylabel("share of executed tokens\nwith $S_{CE} > S_{CU}$")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    return fig


def plot_capacity_sweep(sweep: list[dict], path: str, title: str = "Quality against compute") -> str:
    """Perplexity against the FLOP ratio to dense, one point per inference capacity (each labelled with it and
    the executed fraction it measured)."""
    if not sweep:
        raise ValueError("the capacity sweep is empty")
    fig = _new_figure(width=5.5, height=3.6)
    ax = fig.add_subplot()
    x = [e["flops_ratio_vs_dense"] for e in sweep]
    y = [e["perplexity"] for e in sweep]
    ax.plot(x, y, marker="o", color="tab:blue")
    for e, xi, yi in zip(sweep, x, y, strict=True):
        ax.annotate(
            f"γ={e['capacity']:g} (ran {e['executed_fraction']:.2f})",
            (xi, yi),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=7,
        )
    ax.set_xlabel("FLOPs per token / dense")
    ax.set_ylabel("test perplexity")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
