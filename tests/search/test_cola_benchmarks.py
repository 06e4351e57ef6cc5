"""benchmarks/cola_prefix_reuse.py and benchmarks/cola_router_vs_routing.py on tiny checkpoints."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from sdt.data import Tokenizer
from sdt.evaluation.loading import load_model
from sdt.search.tasks import PathScorer, load_task
from sdt.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _run_script(name: str, argv: list[str], monkeypatch):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return module.main()


def test_prefix_reuse_benchmark_compares_both_modes_on_identical_searches(dense_run, tmp_path, monkeypatch):
    out = tmp_path / "reuse.json"
    argv = ["--ckpt-path", str(dense_run), "--items", "3", "--simulations", "10", "--out", str(out)]
    result = _run_script("cola_prefix_reuse", argv, monkeypatch)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["identical_results"] and result["mismatched_items"] == []
    assert result["evaluations"]["plain"] == result["evaluations"]["reuse"] > 3
    assert result["speedup_wall"] == result["wall_seconds"]["plain"] / result["wall_seconds"]["reuse"]
    assert 0 < result["share_of_layer_calls_reused"] < 1


def test_router_vs_routing_measures_the_routed_model_on_the_held_out_items(router_run, trained_run, monkeypatch):
    run_dir, _, router, _ = router_run
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    (result,) = _run_script("cola_router_vs_routing", [str(run_dir / "cola_router.json"), str(ckpt)], monkeypatch)
    held = router["heldout_indices"]
    assert result["items"] == len(held)
    assert result["both_correct"] + result["only_router_correct"] + result["only_routed_correct"] + result[
        "neither"
    ] == len(held)
    # The routed model's accuracy is its own answers on those items; its layers lie between its always-run blocks
    # and all of its blocks.
    data = load_checkpoint(str(ckpt))
    model = load_model(data, torch.device("cpu"))
    scorer = PathScorer(
        model, Tokenizer.from_json(data["sdt"]["tokenizer"]), load_task("basic_mc"), torch.device("cpu")
    )
    task = load_task("basic_mc")
    expected = sum(scorer.correct(task.items[i], None) for i in held) / len(held)
    routed = result["routed"]
    assert routed["accuracy"] == expected and routed["arch"] == "sdt"
    assert routed["blocks"] - len(model.routed_layers()) <= routed["executed_layers_per_token"] <= routed["blocks"]
    # The router is taken at its largest mean length within that budget (or the closest one if none fits).
    assert result["router_at_or_below_budget"] == (
        result["router_mean_path_length"] <= routed["executed_layers_per_token"] + 1e-9
    )
