"""Fault injection for the reliability tests: Lightning callbacks that a test adds to a real `python train.py` run
through the config (`+callbacks.<name>._target_=tests.faults.<Class>`), so the faults hit the real entry point."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import lightning as L
import torch


class RecordBatches(L.Callback):
    """Appends one JSON line per training step to `path`: the step, a fingerprint of the batch and the logged
    `train/loss` (written at once, so a run killed with SIGKILL keeps every line of the steps it finished)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args):
        ids = batch["input_ids"]
        # Position-weighted sum: a different order of the same blocks gives a different fingerprint.
        weights = torch.arange(1, ids.numel() + 1, dtype=torch.float64).reshape(ids.shape)
        record = {
            "step": trainer.global_step,  # after this batch's update
            "rank": trainer.global_rank,
            "batch": float((ids.double() * weights).sum()),
            "loss": float(trainer.callback_metrics["train/loss"]),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class SlowDown(L.Callback):
    """Sleeps after every training step, so a test can send a signal while the run is still training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


class SignalAtStep(L.Callback):
    """Sends `signal_name` to this very process when training reaches `step` (deterministic timing)."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step = step
        self.signum = signal.Signals[signal_name]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonLoss(L.Callback):
    """Makes the loss of the batches at the given steps NaN (or inf) by scaling the model's input embeddings of that
    batch, as an overflow would: the forward pass itself produces the non-finite loss."""

    def __init__(self, steps: list[int], value: float = float("nan")) -> None:
        self.steps = set(steps)
        self.value = value
        self._handle: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step in self.steps:
            embed = pl_module.model.embed_tokens
            self._handle = embed.register_forward_hook(lambda m, i, out: out * self.value)

    def on_before_backward(self, *args: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class CrashedOnPurpose(RuntimeError):
    """Raised by `CrashAtStep` and `CrashAtValidation`: what a process killed at that moment leaves on disk, without
    the kill."""


class CrashAtStep(L.Callback):
    """Ends the run with `CrashedOnPurpose` when training reaches `step` (after that step's update and any
    step-triggered checkpoint): a run dying mid-way, in process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step >= self.step:
            raise CrashedOnPurpose(f"crashed on purpose at step {trainer.global_step}")


class CrashAtValidation(L.Callback):
    """Ends the run with `CrashedOnPurpose` as its validation at `step` starts: after that step's optimizer update
    (and any step-triggered checkpoint), before the validation, calibration and checkpoint that follow it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking and trainer.global_step == self.step:
            raise CrashedOnPurpose(f"crashed on purpose before the validation at step {self.step}")
