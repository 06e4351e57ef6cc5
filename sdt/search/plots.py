"""Figures of a CoLa search (cola.json): the two shares, the lengths of the best correct paths, and which layers
the search skips or repeats. Drawn on the Agg canvas like sdt/analysis/plots.py."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sdt.analysis.plots import _new_figure, _save


def plot_shares(result: dict[str, Any], path: str) -> str:
    fig = _new_figure(5.5, 3.2)
    ax = fig.add_subplot()
    labels = ["correct inputs with\na shorter correct path", "wrong inputs with\na correct path"]
    values = [result["share_correct_with_shorter_path"], result["share_wrong_with_correct_path"]]
    counts = [result["num_originally_correct"], result["num_items"] - result["num_originally_correct"]]
    bars = ax.bar(labels, [v if v is not None else 0.0 for v in values], color=["tab:green", "tab:blue"])
    for bar, value, n in zip(bars, values, counts, strict=True):
        text = "n/a" if value is None else f"{value:.0%}"
        ax.annotate(f"{text} of {n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of inputs")
    ax.set_title(f"CoLa search, {result['simulations']} simulations (oracle: uses the gold answer)", fontsize=9)
    return _save(fig, path)


def plot_path_lengths(result: dict[str, Any], path: str) -> str:
    depth = result["depth"]
    fig = _new_figure(5.5, 3.2)
    ax = fig.add_subplot()
    groups = [("originally correct", True, "tab:green"), ("originally wrong", False, "tab:blue")]
    lengths = [
        [it["best_correct"]["length"] for it in result["items"] if it["best_correct"] and it["original_correct"] == c]
        for _, c, _ in groups
    ]
    all_lengths = [n for group in lengths for n in group] or [depth]
    bins = np.arange(min(all_lengths + [depth]) - 0.5, max(all_lengths + [depth]) + 1.5)
    ax.hist(lengths, bins=bins, stacked=True, color=[g[2] for g in groups], label=[g[0] for g in groups])
    ax.axvline(depth, color="black", linestyle="--", linewidth=1, label=f"original depth {depth}")
    ax.set_xlabel("length of the shortest correct path found")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_edit_counts(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per layer, the share of inputs whose best correct path skips it / visits it more than once."""
    depth = result["depth"]
    rows: dict[str, list[float]] = {}
    for label, correct in (("orig. correct", True), ("orig. wrong", False)):
        paths = [
            it["best_correct"]["path"]
            for it in result["items"]
            if it["best_correct"] and it["original_correct"] == correct
        ]
        n = max(len(paths), 1)
        rows[f"skipped ({label})"] = [sum(i not in p for p in paths) / n for i in range(depth)]
        rows[f"repeated ({label})"] = [sum(p.count(i) > 1 for p in paths) / n for i in range(depth)]
    return rows


def plot_layer_heatmap(result: dict[str, Any], path: str) -> str:
    rows = layer_edit_counts(result)
    data = np.array(list(rows.values()))  # (4, depth)
    fig = _new_figure(max(5.0, 0.25 * result["depth"] + 2.5), 2.6)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-9))
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.set_xticks(range(result["depth"]), [str(i) for i in range(result["depth"])], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_title("Share of inputs whose best correct path skips / repeats each layer", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)


def cola_plots(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    return {
        "shares": plot_shares(result, os.path.join(out_dir, "cola_shares.png")),
        "path_lengths": plot_path_lengths(result, os.path.join(out_dir, "cola_path_lengths.png")),
        "layer_heatmap": plot_layer_heatmap(result, os.path.join(out_dir, "cola_layer_heatmap.png")),
    }
