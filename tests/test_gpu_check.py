"""scripts/gpu_check.sh (benchmarks/gpu_check.py): its CPU dry run end to end, and what makes it fail."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env

ARCHS = {"dense", "mod", "sdt", "stt"}


def load_gpu_check():
    """benchmarks/ is scripts, not a package: load gpu_check.py by path (it puts its siblings on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # four models trained, compiled and decoded on the CPU: minutes on two shared cores
def test_dry_run_trains_compiles_and_decodes_every_model(tmp_path, cache_dir):
    out = tmp_path / "gpu_check.json"
    env = cli_env(cache_dir) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GPU_CHECK_TIMEOUT": "1800"}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--tiny", "--budget-s", "100000", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checks: all passed" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["scale"] == "tiny"
    train = result["train"]
    assert set(train) == ARCHS
    assert train["dense"]["step_time_ratio"] == 1.0
    for arch, r in train.items():
        assert r["loss_finite"] and r["loss_last"] < r["loss_first"], arch  # the pool is memorised
        assert r["tokens_per_s"] > 0 and r["step_time_ratio"] > 0 and r["train_flop_ratio"] > 0, arch
    for arch in ARCHS:
        c = result["compile"][arch]
        assert c["graph_break_count"] == 0 and c["graph_count"] == 1 and c["compiled"]["fullgraph"], (arch, c)
        assert c["compiled"]["compiled_step_s"] > 0 and c["compiled"]["eager_step_s"] > 0
    hf = result["decode"]["transformers"]
    assert hf["same_tokens"] and hf["sdt_tokens_per_s"] > 0 and hf["transformers_tokens_per_s"] > 0
    assert set(result["decode"]["trained_models"]) == ARCHS
    assert result["checks"] and all(result["checks"].values()) and result["passed"]


def test_checks_fail_on_a_graph_break_or_a_loss_that_does_not_fall():
    gpu_check = load_gpu_check()
    ok = {"loss_first": 5.0, "loss_last": 4.0, "loss_finite": True}
    compiled = {"graph_count": 1, "graph_break_count": 0, "compiled": {"fullgraph": True}}
    result = {"train": {"dense": ok, "sdt": ok}, "compile": {"backend": "inductor", "dense": compiled, "sdt": compiled}}
    assert all(gpu_check.checks(result).values())
    result["compile"]["sdt"] = {"graph_count": 2, "graph_break_count": 1, "compiled": {"fullgraph": False}}
    result["train"]["dense"] = {**ok, "loss_last": 5.5}
    failed = {k for k, v in gpu_check.checks(result).items() if not v}
    assert failed == {"compile/sdt/no_graph_break", "train/dense/loss_falls"}


def test_without_a_gpu_it_says_to_use_the_dry_run(capsys, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", "unused.json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "--tiny" in err
