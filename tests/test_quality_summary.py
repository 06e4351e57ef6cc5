"""Seeds and significance of the quality benchmark (benchmarks/quality_summary.py): ratios per seed, the spread over
seeds, and a gap marked significant only when it exceeds that spread."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_summary():
    spec = importlib.util.spec_from_file_location("quality_summary", ROOT / "benchmarks" / "quality_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, seed: int, val: float, test: float, arch: str = "sdt") -> dict:
    return {
        "name": name, "arch": arch, "capacity": 0.5, "seed": seed, "steps": 10, "routing": "threshold",
        "val_ppl": val, "test_ppl": test, "flops_ratio": 0.8, "wall_s": 1.0,
    }  # fmt: skip


def test_ratios_are_per_seed_and_summaries_carry_mean_std_and_values():
    qs = load_summary()
    rows = [
        run("dense", 1, 100.0, 120.0, "dense"), run("sdt@0.5", 1, 110.0, 126.0),
        run("dense", 2, 90.0, 110.0, "dense"), run("sdt@0.5", 2, 99.0, 121.0),
    ]  # fmt: skip
    qs.add_ratios(rows)
    assert rows[1]["val_ppl_ratio"] == pytest.approx(1.1) and rows[3]["val_ppl_ratio"] == pytest.approx(1.1)
    summary = {e["name"]: e for e in qs.summarize(rows)}
    sdt = summary["sdt@0.5"]
    assert sdt["seeds"] == [1, 2] and sdt["val_ppl"]["values"] == [110.0, 99.0]
    assert sdt["val_ppl"]["mean"] == pytest.approx(104.5)
    assert sdt["val_ppl"]["std"] == pytest.approx(statistics.stdev([110.0, 99.0]))
    # The per-seed ratio is exactly 1.1 both times: no spread, although the perplexities themselves moved by 10%.
    assert sdt["val_ppl_ratio"]["std"] == pytest.approx(0.0)
    # 104.5 +- 7.8 against 95 +- 7.1: the gap (9.5) is within the spread (14.8), so not significant.
    assert sdt["val_significant_vs_dense"] is False
    assert "val_significant_vs_dense" not in summary["dense"]


def test_a_gap_beyond_the_spread_is_significant_and_one_seed_marks_nothing():
    qs = load_summary()
    rows = [run("dense", s, 100.0 + s, 120.0, "dense") for s in (1, 2, 3)]
    rows += [run("mod@0.5", s, 130.0 + s, 119.0 + s, "mod") for s in (1, 2, 3)]
    rows += [run("dense-equal-flops-mod@0.5", s, 140.0 + s, 150.0 + s, "dense") for s in (1, 2, 3)]
    qs.add_ratios(rows)
    summary = {e["name"]: e for e in qs.summarize(rows)}
    mod = summary["mod@0.5"]
    assert mod["val_significant_vs_dense"] is True  # 132 +- 1 against 102 +- 1
    assert mod["test_significant_vs_dense"] is False  # 121 +- 1 against 120 +- 0: a gap of 1, spread 1
    assert mod["val_ppl_ratio_equal_flops"]["values"] == pytest.approx([131 / 141, 132 / 142, 133 / 143])
    assert mod["val_significant_vs_equal_flops"] is True
    table = qs.summary_markdown(list(summary.values()))
    assert "| mod | 0.500 |" in table and "(sig.)" in table and "(within spread)" in table
    assert "131.00, 132.00, 133.00" in table  # per-seed values

    single = [run("dense", None, 100.0, 120.0, "dense"), run("sdt@0.5", None, 110.0, 126.0)]
    qs.add_ratios(single)
    entry = {e["name"]: e for e in qs.summarize(single)}["sdt@0.5"]
    assert entry["val_ppl"]["std"] is None and entry["val_significant_vs_dense"] is None
    assert "seed" not in qs.runs_markdown("tokens", single).splitlines()[2]
