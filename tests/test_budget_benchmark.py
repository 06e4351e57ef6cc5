"""benchmarks/budget_exactness.py: the per-sequence deviation it reports, and the budget mode held to its band on a
trained tiny SDT checkpoint."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdt.routing.selection import BUDGET_MIN_TOKENS, BUDGET_TOLERANCE
from tests.conftest import ROOT, TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data


def load_benchmark():
    spec = importlib.util.spec_from_file_location("budget_exactness", ROOT / "benchmarks" / "budget_exactness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefix_deviation_is_the_worst_prefix_from_min_tokens_on():
    bench = load_benchmark()
    # Row 0 executes the first 4 of 8 tokens: prefix shares 1, 1, 1, 1, 0.8, 0.667, 0.571, 0.5.
    # Row 1 executes every other token: 1, 0.5, 0.667, 0.5, 0.6, 0.5, 0.571, 0.5.
    d = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    prefix, whole = bench.prefix_deviation(d, 0.5, min_tokens=5)
    torch.testing.assert_close(prefix, torch.tensor([0.3, 0.1], dtype=torch.float64))
    torch.testing.assert_close(whole, torch.zeros(2, dtype=torch.float64))
    prefix_all, _ = bench.prefix_deviation(d, 0.5, min_tokens=1)
    torch.testing.assert_close(prefix_all, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.slow
def test_budget_mode_holds_each_sequence_to_its_band(tmp_path, corpus_files, cache_dir):
    from sdt.training.train import train

    overrides = ["model=sdt", *TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files)]
    train(compose_cfg("train", overrides, tmp_path / "run", cache_dir))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "budget.json"
    T = 32  # tiny_data's seq_len
    args = [str(ckpt), "--capacities", "0.25,0.5", "--split", "val", "--min-tokens", str(T), "--out", str(out)]
    load_benchmark().main([*args, "--markdown", str(tmp_path / "budget.md"), "--cache-dir", str(cache_dir)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["capacity"], r["routing"]) for r in rows} == {
        (c, m) for c in (0.25, 0.5) for m in ("threshold", "student", "budget")
    }
    band = BUDGET_TOLERANCE * BUDGET_MIN_TOKENS / T  # the budget's band in share at a T-token prefix
    for r in rows:
        assert 0 < r["sequences_x_layers"] and 0 <= r["share_within_tolerance"] <= 1
        if r["routing"] == "budget":
            assert r["max_prefix_dev"] <= band + 1e-9
            assert abs(r["executed_fraction"] - r["capacity"]) <= band
    assert "| sdt | 0.5 | budget |" in (tmp_path / "budget.md").read_text()


def test_a_capacity_outside_the_unit_interval_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark().main(["unused.ckpt", "--capacities", "0.5,1.5"])
    assert exit_info.value.code == 2
    assert "--capacities must be in (0, 1]" in capsys.readouterr().err
