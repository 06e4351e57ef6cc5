"""Seeds and significance for benchmarks/quality.py: per-configuration mean, spread and per-seed values of every
metric, and the markdown tables.

A difference between two configurations counts as significant only when it exceeds the seeds' spread: the gap
between their means is larger than the sum of their standard deviations over seeds (sample standard deviation).
With one seed there is no spread, and nothing is marked either way.
"""

from __future__ import annotations

import statistics
from typing import Any

# Per-run metrics summarised over seeds (ratios are taken per seed, against the reference run of the same seed).
METRICS = (
    "val_ppl", "test_ppl", "val_ppl_ratio", "test_ppl_ratio", "val_ppl_ratio_equal_flops",
    "test_ppl_ratio_equal_flops", "val_ppl_topk", "flops_ratio", "train_flops_ratio", "val_executed_fraction",
    "val_flops_ratio_executed", "steps", "wall_s",
)  # fmt: skip


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per run: perplexity over that of the dense run of the same seed (step-0 rows against the step-0 dense row,
    when there is one), and over that of its equal-FLOPs dense baseline when it has one."""
    by_key = {(r.get("seed"), r["steps"] == 0, r["name"]): r for r in rows}
    for r in rows:
        seed, step0 = r.get("seed"), r["steps"] == 0
        dense = by_key.get((seed, step0, "dense")) or by_key.get((seed, False, "dense"))
        baseline = by_key.get((seed, step0, equal_flops_name(r["name"])))
        for split in ("val", "test"):
            if dense is not None:
                r[f"{split}_ppl_ratio"] = r[f"{split}_ppl"] / dense[f"{split}_ppl"]
            if baseline is not None:
                r[f"{split}_ppl_ratio_equal_flops"] = r[f"{split}_ppl"] / baseline[f"{split}_ppl"]


def equal_flops_name(name: str) -> str:
    """The name of the dense run with the inference FLOPs of routed point `name` (e.g. dense-equal-flops-sdt@0.5)."""
    return f"dense-equal-flops-{name}"


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def significant(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two configurations' means differ by more than the sum of their spreads (None: fewer than 2 seeds)."""
    if a["std"] is None or b["std"] is None:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration (name and step-0 flag), in the order first seen, with the spread of every metric
    and whether its validation and test perplexity differ from dense's and from its equal-FLOPs baseline's."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["steps"] == 0), []).append(r)
    summary = []
    for (name, step0), runs in groups.items():
        entry: dict[str, Any] = {"name": name, "arch": runs[0]["arch"], "capacity": runs[0]["capacity"]}
        entry.update(step0=step0, routing=runs[0]["routing"], seeds=[r.get("seed") for r in runs])
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                entry[metric] = spread(values)
        summary.append(entry)
    index = {(e["name"], e["step0"]): e for e in summary}
    for e in summary:
        dense = index.get(("dense", e["step0"])) or index.get(("dense", False))
        baseline = index.get((equal_flops_name(e["name"]), e["step0"]))
        for split in ("val", "test"):
            key = f"{split}_ppl"
            if dense is not None and e is not dense:
                e[f"{split}_significant_vs_dense"] = significant(e[key], dense[key])
            if baseline is not None:
                e[f"{split}_significant_vs_equal_flops"] = significant(e[key], baseline[key])
    return summary


def _fmt(v: Any, p: int = 2) -> str:
    return "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))


def _mean_std(stat: dict[str, Any] | None, p: int = 2) -> str:
    if stat is None:
        return "-"
    return _fmt(stat["mean"], p) if stat["std"] is None else f"{stat['mean']:.{p}f} ± {stat['std']:.{p}f}"


def _mark(flag: bool | None) -> str:
    return {True: " (sig.)", False: " (within spread)", None: ""}[flag]


def runs_markdown(setting: str, rows: list[dict[str, Any]]) -> str:
    """Every run, one row each (a seed column when there are several seeds)."""
    seeded = any(r.get("seed") is not None for r in rows)
    head = (
        "| model | capacity | steps | routing | val ppl | test ppl | val / dense | test / dense | Top-K val ppl "
        "| FLOPs vs dense (inference) | training FLOPs vs dense | executed fraction (val) "
        "| FLOPs vs dense at the executed fraction (val) | wall s |"
    )
    lines = [f"### setting: {setting}", "", ("| seed " if seeded else "") + head]
    lines.append("|" + " --- |" * (15 if seeded else 14))
    for r in rows:
        lines.append(
            (f"| {r.get('seed')} " if seeded else "")
            + f"| {r['name'] if r['arch'] == 'dense' else r['arch']} | {_fmt(r['capacity'], 3)} | {r['steps']} "
            f"| {r['routing']} | {_fmt(r['val_ppl'])} | {_fmt(r['test_ppl'])} | {_fmt(r.get('val_ppl_ratio'), 3)} "
            f"| {_fmt(r.get('test_ppl_ratio'), 3)} | {_fmt(r.get('val_ppl_topk'))} | {_fmt(r['flops_ratio'], 3)} "
            f"| {_fmt(r.get('train_flops_ratio'), 3)} | {_fmt(r.get('val_executed_fraction'), 3)} "
            f"| {_fmt(r.get('val_flops_ratio_executed'), 3)} | {_fmt(r['wall_s'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """Mean ± standard deviation over seeds; "(sig.)" marks a perplexity gap larger than the seeds' spread."""
    n = max(len(e["seeds"]) for e in summary)
    head = (
        f"| model | capacity | steps | val ppl (mean ± std, {n} seeds) | test ppl | val / dense | test / dense "
        "| val / equal-FLOPs dense | test / equal-FLOPs dense | FLOPs vs dense (inference) | per-seed val ppl |"
    )
    lines = ["", head, "|" + " --- |" * 11]
    for e in summary:
        per_seed = ", ".join(f"{v:.2f}" for v in e["val_ppl"]["values"])
        lines.append(
            f"| {e['name'] if e['arch'] == 'dense' else e['arch']} | {_fmt(e['capacity'], 3)} "
            f"| {_mean_std(e.get('steps'), 0)} | {_mean_std(e['val_ppl'])} | {_mean_std(e['test_ppl'])} "
            f"| {_mean_std(e.get('val_ppl_ratio'), 3)}{_mark(e.get('val_significant_vs_dense'))} "
            f"| {_mean_std(e.get('test_ppl_ratio'), 3)}{_mark(e.get('test_significant_vs_dense'))} "
            f"| {_mean_std(e.get('val_ppl_ratio_equal_flops'), 3)}{_mark(e.get('val_significant_vs_equal_flops'))} "
            f"| {_mean_std(e.get('test_ppl_ratio_equal_flops'), 3)}"
            f"{_mark(e.get('test_significant_vs_equal_flops'))} | {_mean_std(e.get('flops_ratio'), 3)} "
            f"| {per_seed} |"
        )
    return "\n".join(lines) + "\n"
