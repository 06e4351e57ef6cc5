"""The framework's callbacks under injected faults: preemption signals, NaN losses, routing collapse."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from sdt.common.errors import UserError
from sdt.training.callbacks import NonFiniteGuard, NonFiniteLossError, RoutingHealth
from sdt.training.checkpoint import load_checkpoint
from sdt.training.train import train
from tests.conftest import TINY_MODEL, TINY_TRAINER, compose_cfg, launch_train, tiny_data


def tiny(tmp_path, cache_dir, corpus_files, *extra):
    overrides = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), *extra]
    return compose_cfg("train", overrides, tmp_path, cache_dir)


# ----------------------------------------------------------------------------------------------------- preemption
# SIGTERM in the default suite; SIGUSR1 (SLURM's warning signal) takes the same path, in the slow suite.
@pytest.mark.parametrize("signame", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus_files, cache_dir, signame):
    record = tmp_path / "steps.jsonl"
    args = [*TINY_MODEL, *TINY_TRAINER, *tiny_data(corpus_files), f"hydra.run.dir={tmp_path}"]
    args += ["trainer.max_steps=10000", "trainer.val_check_interval=10000"]  # no save but the signal's
    args += ["+callbacks.record._target_=tests.faults.RecordBatches", f"+callbacks.record.path={record}"]
    args += ["+callbacks.slow._target_=tests.faults.SlowDown", "+callbacks.slow.seconds=0.1"]
    proc = launch_train(args, cache_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (record.is_file() and record.read_text()):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))  # from outside, as a scheduler would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"received {signame}: saved {tmp_path / 'checkpoints' / 'last.ckpt'} at step" in out
    result = json.loads((tmp_path / "train_result.json").read_text())
    assert result["stopped_by_signal"] == signame
    steps = [json.loads(line)["step"] for line in record.read_text().splitlines()]
    ckpt = load_checkpoint(result["last_checkpoint"])
    # Stopped within a step or two of the signal, long before max_steps, with the checkpoint at the stopping step.
    assert ckpt["global_step"] == result["global_step"] == steps[-1] < 100
    assert ckpt["LMDataModule"]["train_batches_done"] == steps[-1]  # and its data position, for an exact resume


def test_last_checkpoint_every_n_steps_rejects_negative():
    from sdt.training.callbacks import LastCheckpoint

    with pytest.raises(UserError, match="every_n_train_steps"):
        LastCheckpoint(dirpath="x", every_n_train_steps=-1)


# ------------------------------------------------------------------------------------------------ numerical faults
def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus_files, cache_dir):
    cfg = tiny(
        tmp_path,
        cache_dir,
        corpus_files,
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "+callbacks.poison._target_=tests.faults.PoisonLoss",
        "+callbacks.poison.steps=[5]",
    )
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "non-finite loss (nan)" in message and "at step 5 " in message
    assert "last.ckpt (step 4) holds the last good weights" in message
    ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert ckpt["global_step"] == 4 and finite(ckpt["state_dict"])


def test_diverging_learning_rate_is_stopped_before_weights_turn_nan(tmp_path, corpus_files, cache_dir):
    # A real divergence, no injection: lr=1e6 without clipping or warm-up.
    cfg = tiny(tmp_path, cache_dir, corpus_files, "optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_steps=0")
    cfg.trainer.max_steps = 50
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step \d+"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() or finite(
        load_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"))["state_dict"]
    )


def test_skip_policy_drops_bad_batches_and_trains_on(tmp_path, corpus_files, cache_dir, caplog):
    cfg = tiny(
        tmp_path,
        cache_dir,
        corpus_files,
        "callbacks.nan_guard.policy=skip",
        "+callbacks.poison._target_=tests.faults.PoisonLoss",
        "+callbacks.poison.steps=[2,3]",
        "+callbacks.poison.value=inf",
    )
    with caplog.at_level(logging.WARNING, logger="sdt.training.callbacks"):
        result = train(cfg)
    assert result["global_step"] == 6
    skipped = [r.getMessage() for r in caplog.records if "skipped this batch" in r.getMessage()]
    assert len(skipped) == 2 and "at step 2 " in skipped[0] and "at step 3 " in skipped[1]
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert finite(ckpt["state_dict"])
    # A NaN gradient that reached AdamW would live on in its moments for ever.
    moments = [t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert moments and all(torch.isfinite(t).all() for t in moments)
    assert math.isfinite(result["metrics"]["val/loss"])


def test_skip_policy_gives_up_after_too_many_bad_batches_in_a_row(tmp_path, corpus_files, cache_dir):
    cfg = tiny(
        tmp_path,
        cache_dir,
        corpus_files,
        "callbacks.nan_guard.policy=skip",
        "callbacks.nan_guard.max_consecutive_skips=2",
        "+callbacks.poison._target_=tests.faults.PoisonLoss",
        "+callbacks.poison.steps=[1,2,3]",
    )
    with pytest.raises(NonFiniteLossError, match="at step 3 .*3 batches in a row"):
        train(cfg)


def test_nan_guard_rejects_an_unknown_policy():
    with pytest.raises(UserError, match="callbacks.nan_guard.policy"):
        NonFiniteGuard(policy="ignore")


# ---------------------------------------------------------------------------------------------- routing collapse
def fake_trainer(step: int, metrics: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step, is_global_zero=True, callback_metrics={k: torch.tensor(v) for k, v in metrics.items()}
    )


def test_routing_collapse_is_warned_once_per_layer(caplog):
    health = RoutingHealth(every_n_steps=10)
    batch = {"input_ids": torch.zeros(8, 16, dtype=torch.long)}
    healthy = {"routing/layers.1.position_consensus": 0.4, "routing/layers.0.g": 0.6, "train/loss": 3.0}
    collapsed = {"routing/layers.1.position_consensus": 1.0, "routing/layers.0.g": 0.999, "train/loss": 3.0}
    with caplog.at_level(logging.WARNING, logger="sdt.training.callbacks"):
        health.on_train_batch_end(fake_trainer(10, healthy), None, None, batch, 0)
        assert not caplog.records
        health.on_train_batch_end(fake_trainer(15, collapsed), None, None, batch, 0)  # not a checking step
        assert not caplog.records
        health.on_train_batch_end(fake_trainer(20, collapsed), None, None, batch, 0)
        health.on_train_batch_end(fake_trainer(30, collapsed), None, None, batch, 0)  # already reported
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert any("layers.1.position_consensus = 1.000" in m and "same positions" in m for m in messages)
    assert any("layers.0.g (mean gate) = 0.9990" in m and "saturated" in m for m in messages)
    assert all("at step 20" in m for m in messages)


def test_position_consensus_of_one_sequence_is_not_a_collapse(caplog):
    health = RoutingHealth(every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="sdt.training.callbacks"):
        health.on_train_batch_end(
            fake_trainer(1, {"routing/layers.1.position_consensus": 1.0}),
            None,
            None,
            {"input_ids": torch.zeros(1, 16, dtype=torch.long)},
            0,
        )
    assert not caplog.records
