"""benchmarks/scaling.py (time, memory and FLOPs as size and sequence length grow) and benchmarks/gpu_hours.py (the
presets' projected GPU-hours)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


def load(name: str):
    """benchmarks/ is scripts, not a package: load one by path (it puts its siblings on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_scaling(tmp_path_factory):
    scaling = load("scaling")
    out = tmp_path_factory.mktemp("scaling")
    argv = ["--grid", "tiny", "--models", "sdt", "--capacities", "0.5", "--repeats", "1", "--warmup", "0"]
    result = scaling.main([*argv, "--out", str(out / "s.json"), "--markdown", str(out / "s.md")])
    return scaling, result, out


@pytest.mark.slow  # three points, two models each, trained on the CPU (~10 s of CPU time)
def test_every_point_measures_dense_and_each_routed_model(tiny_scaling):
    scaling, result, out = tiny_scaling
    assert result["complete"] and json.loads((out / "s.json").read_text())["complete"]
    points = [p.key for p in scaling.GRIDS["tiny"]]
    assert [(r["point"], r["model"]) for r in result["records"]] == [(p, m) for p in points for m in ("dense", "sdt")]
    for r in result["records"]:
        assert r["train_step_s"] > 0 and r["tokens_per_s"] == pytest.approx(
            r["batch"] * r["seq_len"] / r["train_step_s"]
        )
        assert r["step_peak_bytes"] is None or r["step_peak_bytes"] >= 0
        if r["model"] == "dense":
            assert r["train_time_ratio"] == 1.0 and r["train_flop_ratio"] == 1.0
        else:
            assert r["train_flop_ratio"] < 1  # SDT at capacity 0.5 costs fewer FLOPs than dense
    # The two sequence lengths at d_model 32 make one trend row; d_model 64 has one length, so none.
    (trend,) = result["seq_len_trend"]
    assert (trend["d_model"], trend["model"], set(trend["train_time_ratio_by_seq_len"])) == (32, "sdt", {32, 64})
    markdown = (out / "s.md").read_text()
    assert (
        "benchmarks/scaling.py --grid tiny" in markdown
        and "## Train-time ratio vs dense by sequence length" in markdown
    )


def test_seq_len_trend_compares_the_longest_length_with_the_shortest():
    scaling = load("scaling")

    def rec(t: int, ratio: float) -> dict:
        return {
            "d_model": 8,
            "n_layers": 2,
            "model": "mod",
            "capacity": 0.5,
            "seq_len": t,
            "train_time_ratio": ratio,
            "train_flop_ratio": 0.7,
        }

    met = scaling.seq_len_trend([rec(256, 0.9), rec(2048, 0.8), rec(512, 1.2)])
    assert met[0]["met"] and met[0]["change"] == pytest.approx(0.8 / 0.9) and met[0]["longest"] == 2048
    missed = scaling.seq_len_trend([rec(2048, 0.95), rec(256, 0.9)])
    assert not missed[0]["met"] and missed[0]["change"] == pytest.approx(0.95 / 0.9)


def test_gpu_hours_follow_the_flops_and_the_stated_utilisation(tmp_path):
    gpu_hours = load("gpu_hours")
    rows = {r["preset"]: r for r in gpu_hours.project(0.4, 989.0)}
    assert set(rows) == set(gpu_hours.PRESETS)
    for r in rows.values():
        assert r["gpu_hours"] == pytest.approx(r["train_flops"] / (0.4 * 989e12) / 3600)
    dense = rows["pretrain_125m_dense"]
    # ~6 N D: 124M parameters x 2.5B tokens, plus attention (a few % at 1024 tokens).
    assert 1.0 < dense["train_flops"] / (6 * 124e6 * dense["tokens"]) < 1.15
    assert rows["pretrain_125m_sdt"]["train_flops"] < dense["train_flops"]
    # A measured efficiency below 1 lowers a routed model's MFU and raises its GPU-hours; dense keeps its own.
    scaled = {r["preset"]: r for r in gpu_hours.project(0.4, 989.0, {("sdt", 0.5): 0.5})}
    assert scaled["pretrain_125m_sdt"]["mfu"] == pytest.approx(0.2)
    assert scaled["pretrain_125m_sdt"]["gpu_hours"] == pytest.approx(2 * rows["pretrain_125m_sdt"]["gpu_hours"])
    assert scaled["pretrain_125m_dense"]["gpu_hours"] == dense["gpu_hours"]
