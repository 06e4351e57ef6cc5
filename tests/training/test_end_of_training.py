"""A run that dies after its last optimizer step but before its final validation and checkpoint, resumed, ends
exactly as the uninterrupted run: the same final checkpoint (weights, buffers such as calibrated routing thresholds,
optimizer and RNG states) and the same train_result.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sdt.training.checkpoint import load_checkpoint
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, tiny_data
from tests.faults import CrashedOnPurpose

MAX_STEPS = 6  # TINY_TRAINER: validation at step 4 and at the end


def tensors(obj: Any, run_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor anywhere in a checkpoint, by its path of keys (the run's directory in a key written <run>)."""
    if isinstance(obj, torch.Tensor):
        return {prefix.replace(str(run_dir), "<run>"): obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for k, v in items:
        found.update(tensors(v, run_dir, f"{prefix}/{k}"))
    return found


def run(out: Path, cache_dir: Path, corpus: list[str], *extra: str) -> dict[str, Any]:
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus), "model.dropout=0.1"]
    overrides += ["callbacks.last_checkpoint.every_n_train_steps=3", *extra]
    return train(compose_cfg("train", overrides, out, cache_dir))


def result_json(out: Path) -> dict[str, Any]:
    return json.loads((out / "train_result.json").read_text())


def measured(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics two runs of the same training must agree on: all but wall-clock throughput."""
    assert "train/tokens_per_s" in metrics
    return {k: v for k, v in metrics.items() if not k.endswith("tokens_per_s")}


@pytest.mark.parametrize("arch", ["sdt"])
def test_run_killed_before_its_final_validation_resumes_to_the_same_final_checkpoint(
    tmp_path, cache_dir, corpus_files, arch
):
    model = [f"model={arch}"]
    reference = tmp_path / "reference"
    run(reference, cache_dir, corpus_files, *model)

    crashed = tmp_path / "crashed"
    crash = ["+callbacks.crash._target_=tests.faults.CrashAtValidation", f"+callbacks.crash.step={MAX_STEPS}"]
    with pytest.raises(CrashedOnPurpose):
        run(crashed, cache_dir, corpus_files, *model, *crash)
    last = crashed / "checkpoints" / "last.ckpt"
    before = load_checkpoint(str(last))
    assert before["global_step"] == MAX_STEPS  # the step-triggered save of the last step...
    assert before["callbacks"]["ValidateAtEnd"]["validated_step"] == 4  # ...from before the final validation
    assert not (crashed / "train_result.json").exists()
    ref_ckpt = load_checkpoint(str(reference / "checkpoints" / "last.ckpt"))
    ref_tensors = tensors(ref_ckpt, reference)
    thresholds = [k for k in ref_tensors if k.startswith("/state_dict/") and "threshold" in k]
    assert thresholds, "the routed model keeps calibrated thresholds as buffers"
    # Without the final calibration the crashed run's thresholds differ: the comparison below can fail.
    assert any(not torch.equal(before["state_dict"][k.split("/")[2]], ref_tensors[k]) for k in thresholds)

    resumed = tmp_path / "resumed"
    result = run(resumed, cache_dir, corpus_files, *model, f"ckpt_path={last}")
    final = load_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))
    assert final["global_step"] == ref_ckpt["global_step"] == MAX_STEPS
    got = tensors(final, resumed)
    assert sorted(got) == sorted(ref_tensors)
    state_keys = [k for k in got if k.startswith("/state_dict/")]
    assert len(state_keys) == len(ref_ckpt["state_dict"])  # parameters and buffers
    assert any(k.startswith("/optimizer_states/") for k in got) and any(k.startswith("/callbacks/") for k in got)
    for key, want in ref_tensors.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), f"{key} differs"

    ref_result = result_json(reference)
    resumed_result = result_json(resumed)
    assert measured(resumed_result["metrics"]) == measured(ref_result["metrics"]) == measured(result["metrics"])
    assert resumed_result["global_step"] == ref_result["global_step"] == MAX_STEPS
    assert {"val/loss", "train/loss"} <= set(resumed_result["metrics"])

    # Resumed again from the finished checkpoint: nothing left to do, and it says the same.
    again = tmp_path / "again"
    run(again, cache_dir, corpus_files, *model, f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}")
    assert result_json(again)["metrics"] == resumed_result["metrics"]
    assert not (again / "checkpoints" / "last.ckpt").exists()  # nothing trained, nothing rewritten
