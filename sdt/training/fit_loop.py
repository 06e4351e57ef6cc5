"""Lightning's fit loop, made to finish a run that was resumed from a checkpoint of its last step."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.loops.fit_loop import _FitLoop

from sdt.training.callbacks import ValidateAtEnd

log = logging.getLogger(__name__)


class FinishingFitLoop(_FitLoop):
    """A run killed after its last optimizer step but before its final validation (where routed models calibrate
    their thresholds, and after which the final `last.ckpt` is written) leaves a `last.ckpt` of step `max_steps`
    that is not what the finished run would have saved. Lightning's fit loop, resumed from it, is done before it
    starts and skips everything. This loop instead does what the last step of an uninterrupted run does next: the
    `on_train_start` hooks (the saved RNG states are restored), the final validation with its checkpoint saves, and
    the `on_train_end` hooks. Every other run goes through Lightning's loop unchanged.
    """

    def run(self) -> None:
        end = next((c for c in self.trainer.callbacks if isinstance(c, ValidateAtEnd)), None)
        if end is None or not end.end_of_training_pending(self.trainer):
            super().run()
            return
        log.info(
            "resumed at step %d = trainer.max_steps: running the final validation the interrupted run did not finish",
            self.trainer.global_step,
        )
        self.setup_data()
        self.reset()
        self.on_run_start()
        val_loop = self.epoch_loop.val_loop
        val_loop.restarting = False  # the saved validation progress is an earlier validation's: start afresh
        self.trainer.validating = True
        val_loop.run()
        self.trainer.training = True
        self._restarting = False
        self.on_run_end()


def install_finishing_fit_loop(trainer: L.Trainer) -> None:
    """Replace `trainer.fit_loop` by a `FinishingFitLoop` with the same settings and inner loops."""
    old = trainer.fit_loop
    loop = FinishingFitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
    loop.epoch_loop = old.epoch_loop
    trainer.fit_loop = loop
