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
# The equal-compute baselines of a routed point: a dense model of its inference FLOPs trained from scratch
# (fewer layers or a narrower MLP), and for conversions the pretrained model statically pruned to its FLOPs.
BASELINES = {"equal_flops": "dense-equal-flops-{}", "pruned": "dense-pruned-{}"}
METRICS = (
    "val_ppl", "test_ppl", "val_ppl_ratio", "test_ppl_ratio",
    *(f"{split}_ppl_ratio_{kind}" for kind in BASELINES for split in ("val", "test")),
    "val_ppl_topk", "flops_ratio", "train_flops_ratio", "val_executed_fraction", "val_flops_ratio_executed", "steps",
    "wall_s",
)  # fmt: skip


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per run: perplexity over that of the dense run of the same seed (step-0 rows against the step-0 dense row,
    when there is one), and over that of each equal-compute baseline it has."""
    by_key = {(r.get("seed"), r["steps"] == 0, r["name"]): r for r in rows}
    for r in rows:
        seed, step0 = r.get("seed"), r["steps"] == 0
        dense = by_key.get((seed, step0, "dense")) or by_key.get((seed, False, "dense"))
        for split in ("val", "test"):
            if dense is not None:
                r[f"{split}_ppl_ratio"] = r[f"{split}_ppl"] / dense[f"{split}_ppl"]
            for kind in BASELINES:
                baseline = by_key.get((seed, step0, baseline_name(kind, r["name"])))
                if baseline is not None:
                    r[f"{split}_ppl_ratio_{kind}"] = r[f"{split}_ppl"] / baseline[f"{split}_ppl"]


def baseline_name(kind: str, name: str) -> str:
    """The name of routed point `name`'s equal-compute baseline of `kind` (e.g. dense-equal-flops-sdt@0.5)."""
    return BASELINES[kind].format(name)


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
        for split in ("val", "test"):
            key = f"{split}_ppl"
            if dense is not None and e is not dense:
                e[f"{split}_significant_vs_dense"] = significant(e[key], dense[key])
            for kind in BASELINES:
                baseline = index.get((baseline_name(kind, e["name"]), e["step0"]))
                if baseline is not None:
                    e[f"{split}_significant_vs_{kind}"] = significant(e[key], baseline[key])
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
    kinds = [k for k in BASELINES if any(f"val_ppl_ratio_{k}" in e for e in summary)]
    titles = {"equal_flops": "equal-FLOPs dense", "pruned": "pruned dense"}
    head = f"| model | capacity | steps | val ppl (mean ± std, {n} seed{'s' if n > 1 else ''}) | test ppl | val / dense | test / dense "
    head += "".join(f"| val / {titles[k]} | test / {titles[k]} " for k in kinds)
    head += "| FLOPs vs dense (inference) | per-seed val ppl |"
    lines = ["", head, "|" + " --- |" * (9 + 2 * len(kinds))]
    for e in summary:
        per_seed = ", ".join(f"{v:.2f}" for v in e["val_ppl"]["values"])
        cells = [
            e["name"] if e["arch"] == "dense" else e["arch"], _fmt(e["capacity"], 3), _mean_std(e.get("steps"), 0),
            _mean_std(e["val_ppl"]), _mean_std(e["test_ppl"]),
        ]  # fmt: skip
        for suffix in ("", *(f"_{k}" for k in kinds)):
            for split in ("val", "test"):
                flag = e.get(f"{split}_significant_vs_{suffix[1:] or 'dense'}")
                cells.append(_mean_std(e.get(f"{split}_ppl_ratio{suffix}"), 3) + _mark(flag))
        cells += [_mean_std(e.get("flops_ratio"), 3), per_seed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
