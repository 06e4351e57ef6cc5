"""Plots of a sweep: quality against compute, KV-cache size against capacity, and loss curves."""

from __future__ import annotations

from typing import Any

from sdt.analysis.plots import _new_figure, _save

FAMILY_STYLE = {
    "dense": ("black", "*"),
    "mod": ("tab:green", "s"),
    "sdt": ("tab:blue", "o"),
    "stt": ("tab:orange", "^"),
}


def _families(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["arch"], []).append(r)
    for family in out.values():
        family.sort(key=lambda r: r["capacity"] or 0.0)
    return out


def plot_pareto(rows: list[dict[str, Any]], path: str) -> str:
    """Validation perplexity (causal routing) against inference FLOPs per token, one line per model family."""
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for arch, family in _families(rows).items():
        color, marker = FAMILY_STYLE.get(arch, ("tab:gray", "x"))
        x = [r["flops_per_token"] / 1e6 for r in family]
        y = [r["val_perplexity"] for r in family]
        ax.plot(
            x,
            y,
            marker=marker,
            color=color,
            label=arch.upper() if arch != "dense" else "dense",
            markersize=10 if arch == "dense" else 6,
            linewidth=1.5,
        )
        for r, xi, yi in zip(family, x, y, strict=True):
            if r["capacity"] is not None:
                ax.annotate(f"γ={r['capacity']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("inference compute (MFLOPs per token)")
    ax.set_ylabel("validation perplexity (causal routing)")
    ax.set_title("Quality against compute")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_kv_ratio(rows: list[dict[str, Any]], path: str) -> str:
    """KV-cache entries relative to dense against capacity, one line per routed family."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for arch, family in _families(rows).items():
        if arch == "dense":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense")
            continue
        color, marker = FAMILY_STYLE.get(arch, ("tab:gray", "x"))
        ax.plot(
            [r["capacity"] for r in family],
            [r["kv_entries_ratio_vs_dense"] for r in family],
            marker=marker,
            color=color,
            label=arch.upper(),
        )
    ax.set_xlabel("capacity γ (share of tokens a routed layer runs on)")
    ax.set_ylabel("KV-cache entries / dense")
    ax.set_ylim(0, 1.1)
    ax.set_title("KV-cache size against capacity")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, tuple[list[int], list[float]]], rows: list[dict[str, Any]], path: str) -> str:
    """Validation loss against training step for every run of the sweep."""
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for r in rows:
        steps, values = curves.get(r["run"], ([], []))
        if not steps:
            continue
        color, marker = FAMILY_STYLE.get(r["arch"], ("tab:gray", "x"))
        label = r["arch"] if r["capacity"] is None else f"{r['arch']} γ={r['capacity']:g}"
        alpha = 1.0 if r["capacity"] is None else 0.4 + 0.6 * float(r["capacity"])
        ax.plot(steps, values, marker=marker, markersize=3, color=color, alpha=alpha, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
