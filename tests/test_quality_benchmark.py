"""The quality benchmark (benchmarks/quality.py) end to end on a tiny model: runs, evaluation, ratios, equal FLOPs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL, run_cli, tiny_data

TINY = [
    *TINY_MODEL, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer=cpu",
    "trainer.enable_progress_bar=false",
]  # fmt: skip


@pytest.mark.slow  # three tiny training runs in subprocesses
def test_equal_flops_setting_gives_routed_runs_the_steps_their_training_flops_buy(tmp_path, corpus_files, cache_dir):
    out = tmp_path / "q"
    args = ["benchmarks/quality.py", "--setting", "flops", "--archs", "sdt,mod"]
    args += ["--capacities", "0.5", "--max-batches", "2", "--out", str(out)]
    for o in [*TINY, *tiny_data(corpus_files)]:
        args += ["--override", o]
    proc = run_cli(args, cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "sdt@0.5", "mod@0.5"}
    dense = rows["dense"]
    assert dense["steps"] == 6 and dense["val_ppl_ratio"] == 1.0
    for name in ("sdt@0.5", "mod@0.5"):
        r = rows[name]
        assert r["train_flops_ratio"] < 1.0  # cheaper to train at capacity 0.5 ...
        assert r["steps"] == round(6 / r["train_flops_ratio"]) > 6  # ... so it gets more steps for the same FLOPs
        assert r["val_ppl_ratio"] == pytest.approx(r["val_ppl"] / dense["val_ppl"])
        assert 0.2 < r["val_executed_fraction"] < 0.8 and r["routing"] in ("threshold", "student")
        # FLOPs at what the causal router ran move with it away from those at the nominal capacity.
        over_run = r["val_executed_fraction"] - r["capacity"]
        assert (r["val_flops_ratio_executed"] - r["flops_ratio"]) * over_run >= 0
        assert r["val_flops_ratio_executed"] > 0
    assert "| sdt | 0.500 |" in (out / "quality.md").read_text()
    assert f"| {rows['sdt@0.5']['val_flops_ratio_executed']:.3f} |" in (out / "quality.md").read_text()
    # A second invocation reuses the finished runs instead of training again.
    again = run_cli(args, cache_dir)
    assert again.returncode == 0 and "+ " not in again.stdout


@pytest.mark.slow  # six tiny training runs in subprocesses
def test_seeds_and_the_equal_flops_dense_baseline(tmp_path, corpus_files, cache_dir):
    out = tmp_path / "q"
    args = ["benchmarks/quality.py", "--setting", "tokens", "--archs", "mod", "--capacities", "0.5"]
    args += ["--seeds", "2", "--equal-flops-dense", "--max-batches", "2", "--out", str(out)]
    for o in [*TINY, *tiny_data(corpus_files)]:
        args += ["--override", o]
    proc = run_cli(args, cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    assert result["seeds"] == [1337, 1338]
    runs = {(r["name"], r["seed"]): r for r in result["rows"]}
    assert set(runs) == {(n, s) for n in ("dense", "mod@0.5", "dense-equal-flops-mod@0.5") for s in (1337, 1338)}
    assert (out / "runs" / "mod@0.5" / "seed1338" / "checkpoints" / "last.ckpt").is_file()
    # Different seeds train different models.
    assert runs[("mod@0.5", 1337)]["val_ppl"] != runs[("mod@0.5", 1338)]["val_ppl"]
    for seed in (1337, 1338):
        routed, baseline = runs[("mod@0.5", seed)], runs[("dense-equal-flops-mod@0.5", seed)]
        # The baseline is a smaller dense model that spends the routed model's inference FLOPs, on the same tokens.
        assert baseline["flops_ratio"] == pytest.approx(routed["flops_ratio"], rel=0.03) and baseline["flops_ratio"] < 1
        assert baseline["tokens"] == routed["tokens"]
        assert routed["val_ppl_ratio_equal_flops"] == pytest.approx(routed["val_ppl"] / baseline["val_ppl"])
    summary = {e["name"]: e for e in result["summary"]}
    assert summary["mod@0.5"]["val_ppl"]["values"] == [runs[("mod@0.5", s)]["val_ppl"] for s in (1337, 1338)]
    assert summary["mod@0.5"]["val_significant_vs_equal_flops"] in (True, False)
    assert "± " in (out / "quality.md").read_text()


@pytest.mark.slow  # two tiny conversions in subprocesses
def test_static_pruning_baseline_of_a_conversion(tmp_path, corpus_files, cache_dir):
    from tests.pretrained_helpers import save_hf_model

    save_hf_model(tmp_path / "hf", "llama", num_hidden_layers=6)
    out = tmp_path / "q"
    args = ["benchmarks/quality.py", "--setting", "convert", "--archs", "mod", "--capacities", "0.5", "--no-step0"]
    args += ["--static-pruning", "--pruning-blocks", "4", "--max-batches", "1", "--out", str(out)]
    overrides = [
        f"model.init_from={tmp_path / 'hf'}", "model.dense_first=0", "model.dense_last=0",
        "model.skip_map_fit_blocks=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", *tiny_data(corpus_files),
        "data.batch_size=2", "data.calibration_blocks=2",
    ]  # fmt: skip
    for o in overrides:
        args += ["--override", o]
    proc = run_cli(args, cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "quality.json").read_text())["rows"]}
    assert set(rows) == {"dense", "mod@0.5", "dense-pruned-mod@0.5"}
    pruned, routed = rows["dense-pruned-mod@0.5"], rows["mod@0.5"]
    # The pruned model keeps the depth whose FLOPs are closest to the routed conversion's (one layer is ~1/6).
    assert abs(pruned["flops_ratio"] - routed["flops_ratio"]) < 1 / 12 and pruned["flops_ratio"] < 1
    kept = (out / "runs" / "dense-pruned-mod@0.5" / ".hydra" / "overrides.yaml").read_text()
    assert "model.init_layers=[" in kept
    assert routed["val_ppl_ratio_pruned"] == pytest.approx(routed["val_ppl"] / pruned["val_ppl"])
