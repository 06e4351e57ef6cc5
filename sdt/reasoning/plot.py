"""Accuracy against mean thinking tokens for several runs' `reasoning.json`, and a table of the same numbers.

python -m sdt.reasoning.plot run_a/reasoning.json run_b/reasoning.json --out accuracy_vs_tokens.png
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from sdt.analysis.plots import _new_figure, _save
from sdt.data.reasoning.braking import VARIANTS

VARIANT_LABELS = {"none": "plain SFT", "exact": "self-braking (exact)", "dynamic": "self-braking (dynamic)"}


def accuracy_stderr(r: dict[str, Any]) -> float:
    """Binomial standard error of the accuracy over the run's problems (0 when the count is unknown)."""
    n = r.get("num_problems") or 0
    return math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n) if n else 0.0


def plot_accuracy_vs_tokens(results: list[dict[str, Any]], path: str, title: str | None = None) -> str:
    """One point per run (error bar: one standard error of the accuracy); a dotted line at the mean thinking
    tokens of the dataset's own traces, when the runs report it."""
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot()
    reference = next(
        (r["reference_mean_thinking_tokens"] for r in results if r.get("reference_mean_thinking_tokens")), None
    )
    if reference:
        ax.axvline(reference, color="gray", linestyle=":", label="dataset traces, untrimmed")
    for r in results:
        ax.errorbar(
            r["mean_thinking_tokens"],
            r["accuracy"],
            yerr=accuracy_stderr(r),
            fmt="o",
            ms=7,
            capsize=3,
            zorder=3,
            label=r.get("label", r["variant"]),
        )
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("mean thinking tokens per answer")
    ax.set_ylabel("accuracy (exact answer)")
    ax.set_ylim(0, min(1.05, max(0.5, max(r["accuracy"] for r in results) + 0.2)))
    ax.set_xlim(left=0, right=max([r["mean_thinking_tokens"] for r in results] + [reference or 0]) * 1.25 + 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Accuracy against reasoning length")
    return _save(fig, path)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(results: list[dict[str, Any]]) -> str:
    """Markdown table; the token cut and accuracy change are relative to the plain-SFT run when there is one."""
    base = next((r for r in results if r["variant"] == "none"), None)
    lines = [
        (
            "| run | accuracy ± s.e. | mean thinking tokens | self-stop share | overthink score | token cut vs plain | "
            "accuracy change vs plain |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cut = change = "n/a"
        if base is not None and r is not base:
            cut = f"{1 - r['mean_thinking_tokens'] / base['mean_thinking_tokens']:.1%}"
            change = f"{(r['accuracy'] - base['accuracy']) * 100:+.1f} pts"
        lines.append(
            f"| {r.get('label', r['variant'])} | {_fmt(r['accuracy'], '.3f')} ± {accuracy_stderr(r):.3f} | "
            f"{_fmt(r['mean_thinking_tokens'], '.1f')} | {_fmt(r['self_stop_share'], '.3f')} | "
            f"{_fmt(r['overthink_score'], '.3f')} | {cut} | {change} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="reasoning.json files written by evaluate.py task=reasoning")
    parser.add_argument("--out", default="accuracy_vs_tokens.png", help="where to write the plot")
    parser.add_argument("--title", default=None, help="the plot's title")
    args = parser.parse_args(argv)
    results = []
    for p in args.results:
        with open(p) as f:
            results.append(json.load(f))
    order = {variant: i for i, variant in enumerate(VARIANTS)}
    results.sort(key=lambda r: order.get(r["variant"], len(order)))
    print(results_table(results))
    print(f"plot: {plot_accuracy_vs_tokens(results, args.out, args.title)}")


if __name__ == "__main__":
    main()
