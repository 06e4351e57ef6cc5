"""Lightning callbacks of the framework."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from sdt.common.errors import UserError

log = logging.getLogger(__name__)


class ValidateAtEnd(L.Callback):
    """Run a final validation (and so a final checkpoint) at the last training step.

    Lightning validates only every `val_check_interval` steps, so a run whose `max_steps` is not a multiple of it
    would end with its last steps unvalidated and unsaved. Requesting a stop at the last step makes the fit loop
    validate once more, which in turn lets ModelCheckpoint write `last.ckpt` for the final weights.

    Its state in every checkpoint says which step was last validated and what the run's metrics were, so a run
    resumed from a checkpoint of its last step knows whether that final validation (routed models calibrate their
    thresholds in it) still has to run (`sdt.training.fit_loop.FinishingFitLoop`), and reports the same metrics.
    """

    def __init__(self) -> None:
        self.validated_step: int | None = None  # global step of the last validation during fit
        self.restored_metrics: dict[str, float] = {}  # the metrics saved with the checkpoint this run resumed from
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the checkpoint callbacks' own on_validation_end (Lightning orders those last): the checkpoints
        # written after this validation record it.
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def end_of_training_pending(self, trainer: L.Trainer) -> bool:
        """Whether training reached max_steps but its final validation has not run at that step."""
        step = trainer.global_step
        return 0 < trainer.max_steps <= step and self.validated_step != step and trainer.enable_validation

    def metrics(self, trainer: L.Trainer | None) -> dict[str, float]:
        """The run's metrics: those restored from its checkpoint, updated by everything logged since."""
        current = trainer.callback_metrics if trainer is not None else {}
        return {**self.restored_metrics, **{k: float(v) for k, v in current.items() if v.numel() == 1}}

    def state_dict(self) -> dict[str, Any]:
        return {"validated_step": self.validated_step, "metrics": self.metrics(self._trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validated_step = state_dict.get("validated_step")
        self.restored_metrics = dict(state_dict.get("metrics") or {})


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`: the latest state of the run, refreshed at every validation, every `every_n_train_steps` steps
    (0: only at validations) and on demand (`save_now`, used on preemption).

    One file, overwritten atomically (see `sdt.training.checkpoint.AtomicCheckpointIO`), so a run killed at any moment
    can resume from at most `every_n_train_steps` steps back. Lightning's own step trigger would switch off the saves
    at validation, which must keep happening so that a finished run's last.ckpt is its final step.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_n_train_steps: int = 0, **kwargs: Any) -> None:
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise UserError(
                f"callbacks.last_checkpoint.every_n_train_steps must be an integer >= 0, got {every_n_train_steps!r}"
            )
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, enable_version_counter=False, **kwargs
        )
        self.save_every_n_steps = every_n_train_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.save_every_n_steps and trainer.global_step % self.save_every_n_steps == 0:
            self.save_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation changes the model (routed models recalibrate their thresholds) and adds its metrics: save
        # again even when a step-triggered save already wrote this step.
        if not trainer.sanity_checking:
            self._last_global_step_saved = -1
        super().on_validation_end(trainer, pl_module)

    def save_now(self, trainer: L.Trainer) -> None:
        """Write last.ckpt for the current step (collective under DDP/FSDP: every rank must call it)."""
        if trainer.sanity_checking or self._last_global_step_saved == trainer.global_step:
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def path(self) -> str:
        """Where last.ckpt is ("" before the first save). Unmonitored top-1: Lightning's `best_model_path`."""
        return self.best_model_path

    @property
    def saved_step(self) -> int | None:
        """The global step last.ckpt holds (None before the first save of this run)."""
        return self._last_global_step_saved if self._last_global_step_saved >= 0 else None


def last_checkpoint_callback(trainer: L.Trainer) -> LastCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)


class CheckpointOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1: finish the current step, write last.ckpt, and stop the run cleanly.

    SIGTERM is what schedulers and `docker stop` send before killing; SLURM sends SIGUSR1 (`--signal=USR1@120`)
    ahead of a time limit. Lightning's own SIGTERM handler flags `trainer.received_sigterm` (and forwards the signal
    to DDP workers); this callback installs a SIGUSR1 handler, except where Lightning's SLURM environment with
    auto-requeue already owns SIGUSR1 (it then saves `hpc_ckpt_<n>.ckpt` and requeues the job itself).
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")) -> None:
        unknown = sorted(set(signals) - {"SIGTERM", "SIGUSR1"})
        if unknown:
            raise UserError(f"callbacks.preemption.signals: unsupported {unknown}; choose from SIGTERM, SIGUSR1")
        self.signals = tuple(signals)
        self.received: str | None = None  # name of the signal that stopped the run
        self._pending: str | None = None
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers (it would not install its SLURM one over ours).
        self.received = self._pending = None
        own_usr1 = "SIGUSR1" in self.signals and hasattr(signal, "SIGUSR1") and not _slurm_requeue_active(trainer)
        if own_usr1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the step in progress must finish before its state is consistent enough to save.
        self._pending = signal.Signals(signum).name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        name = self._pending or ("SIGTERM" if "SIGTERM" in self.signals and trainer.received_sigterm else None)
        stop = name is not None
        if trainer.world_size > 1:  # every rank must take the same branch: saving is collective
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self.received:
            return
        self._save_and_stop(trainer, name or "a signal on another rank")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning itself ends the run with SIGTERMException at the end of the step in which SIGTERM arrived (or,
        # under DDP, at the start of the next one on every rank): between steps, so the state is consistent.
        if isinstance(exception, SIGTERMException) and "SIGTERM" in self.signals and not self.received:
            self._save_and_stop(trainer, "SIGTERM")

    def _save_and_stop(self, trainer: L.Trainer, name: str) -> None:
        self.received = name
        last = last_checkpoint_callback(trainer)
        if last is not None:
            last.save_now(trainer)
        trainer.should_stop = True
        if trainer.is_global_zero:
            where = last.path if last is not None else "(no last-checkpoint callback configured)"
            log.warning(
                "received %s: saved %s at step %d and stopping; resume with ckpt_path=%s",
                name,
                where,
                trainer.global_step,
                where,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None


def _slurm_requeue_active(trainer: L.Trainer) -> bool:
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


class RngState(L.Callback):
    """Saves the random number generators' states in checkpoints and restores them when training resumes, so
    dropout masks after a resume are those an uninterrupted run would have drawn.

    Stored as tensors and plain Python values only, so checkpoints still load with `weights_only=True`.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, mt_state, gauss = random.getstate()
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": [version, list(mt_state), gauss],
            "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, not at load time: setting up the run in between may draw random numbers.
        state, self._to_restore = self._to_restore, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(mt_state), gauss))
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss (or gradients) and was stopped."""


NanPolicy = Literal["stop", "skip"]
NAN_POLICIES: tuple[NanPolicy, ...] = get_args(NanPolicy)


class NonFiniteGuard(L.Callback):
    """Catches a NaN/inf loss or gradient before the optimizer applies it.

    policy "stop": raise `NonFiniteLossError` naming the step; the weights were never updated with the bad
    gradients, and last.ckpt still holds the last good state. policy "skip": drop this batch's update (gradients
    cleared, so the optimizer leaves every parameter and its moments untouched), warn, and go on; after
    `max_consecutive_skips` bad batches in a row, stop as with "stop".
    """

    def __init__(self, policy: NanPolicy = "stop", max_consecutive_skips: int = 10) -> None:
        if policy not in NAN_POLICIES:
            raise UserError(f"callbacks.nan_guard.policy must be one of {', '.join(NAN_POLICIES)}, got {policy!r}")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise UserError(
                f"callbacks.nan_guard.max_consecutive_skips must be an integer >= 1, got {max_consecutive_skips!r}"
            )
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._loss: Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.ones((), dtype=torch.bool)
        if self._loss is not None:
            finite = torch.isfinite(self._loss).all().cpu()
        if grads:
            # One fused norm: non-finite if any gradient element is.
            finite = finite & torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))).cpu()
        bad = not bool(finite)
        if trainer.world_size > 1:  # sharded gradients differ per rank: all ranks must agree to skip or stop
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._consecutive = 0
            return
        loss = float(self._loss) if self._loss is not None else float("nan")
        self._consecutive += 1
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.policy == "skip" and self._consecutive <= self.max_consecutive_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            if trainer.is_global_zero:
                log.warning(
                    "non-finite loss %s or gradients at %s: skipped this batch (%d skipped so far)",
                    loss,
                    where,
                    self.skipped,
                )
            return
        last = last_checkpoint_callback(trainer)
        kept = (
            f"{last.path} (step {last.saved_step}) holds the last good weights"
            if last is not None and last.saved_step is not None and os.path.exists(last.path)
            else "no checkpoint was written yet"
        )
        why = (
            f"{self._consecutive} batches in a row" if self.policy == "skip" else "training stopped before applying it"
        )
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) or gradients at {where}: {why}; {kept}. Lower optim.lr, raise "
            "optim.warmup_steps or check the data; callbacks.nan_guard.policy=skip skips such batches instead"
        )


class RoutingHealth(L.Callback):
    """Warns when a routed model's routing collapses, read from the routing statistics the model logs.

    - `position_consensus` near 1: every sequence of the batch executes the same positions, i.e. the router has
      stopped looking at the content (for example always the first tokens).
    - mean gate `g` near 0 or 1: the surprise gates saturate, so they no longer rank tokens.
    Checked every `every_n_steps` steps (reading the values is a host synchronisation); each problem is reported
    once per layer.
    """

    def __init__(self, every_n_steps: int = 50, max_position_consensus: float = 0.98, gate_saturation: float = 0.99):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise UserError(f"callbacks.routing_health.every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        for key, value in (("max_position_consensus", max_position_consensus), ("gate_saturation", gate_saturation)):
            if not 0.5 <= value <= 1.0:
                raise UserError(f"callbacks.routing_health.{key} must be in [0.5, 1], got {value!r}")
        self.every_n_steps = every_n_steps
        self.max_position_consensus = max_position_consensus
        self.gate_saturation = gate_saturation
        self.warned: set[str] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args):
        if trainer.global_step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        batch_size = batch["input_ids"].shape[0] if isinstance(batch, dict) and "input_ids" in batch else 0
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("routing/") or key in self.warned or value.numel() != 1:
                continue
            v = float(value)
            if key.endswith(".position_consensus") and batch_size >= 2 and v >= self.max_position_consensus:
                message = (
                    f"routing collapse at step {trainer.global_step}: {key} = {v:.3f}, every sequence executes "
                    "(almost) the same positions, so the router ignores the tokens' content"
                )
            elif key.endswith(".g") and (v >= self.gate_saturation or v <= 1 - self.gate_saturation):
                message = (
                    f"routing collapse at step {trainer.global_step}: {key} (mean gate) = {v:.4f}, the surprise "
                    "gates are saturated and no longer rank tokens"
                )
            else:
                continue
            self.warned.add(key)
            log.warning(message)


MatmulPrecision = Literal["highest", "high", "medium"]
MATMUL_PRECISIONS: tuple[MatmulPrecision, ...] = get_args(MatmulPrecision)


class Float32MatmulPrecision(L.Callback):
    """`trainer.float32_matmul_precision`: `torch.set_float32_matmul_precision` in every training process, when it
    runs on CUDA ("high": fp32 matmuls on TF32 tensor cores, about 8x the fp32 rate on A100/H100, 10 mantissa bits
    instead of 23; what is left in fp32 under bf16-mixed, such as the routing scores, runs there). Nothing on CPU,
    where "high" and "medium" would let oneDNN run fp32 matmuls in bf16."""

    def __init__(self, precision: MatmulPrecision) -> None:
        if precision not in MATMUL_PRECISIONS:
            raise UserError(
                f"trainer.float32_matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}"
            )
        self.precision = precision

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision(self.precision)
