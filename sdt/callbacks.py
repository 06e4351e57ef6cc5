"""Lightning callbacks of the framework."""

from __future__ import annotations

import lightning as L


class ValidateAtEnd(L.Callback):
    """Run a final validation (and so a final checkpoint) at the last training step.

    Lightning validates only every `val_check_interval` steps, so a run whose `max_steps` is not a multiple of it
    would end with its last steps unvalidated and unsaved. Requesting a stop at the last step makes the fit loop
    validate once more, which in turn lets ModelCheckpoint write `last.ckpt` for the final weights.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
