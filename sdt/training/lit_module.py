"""LightningModule: wires a model to its loss, optimiser, schedule and logging. The model itself knows nothing of it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdt.models import LanguageModel, ModelConfig, build_model
from sdt.models.calibration import calibrate_thresholds
from sdt.training.activation_checkpointing import apply_activation_checkpointing
from sdt.training.distill import DistillConfig, distillation_loss, load_teacher, teacher_logits
from sdt.training.distributed import shard_model
from sdt.training.optim import (
    OptimConfig,
    build_optimizer,
    clip_grad_norm_by_role,
    role_learning_rates,
    warmup_cosine,
)


class LitLM(L.LightningModule):
    """Next-token language modelling for every architecture in `sdt.models`.

    `model` is the run's `ModelConfig` (`sdt.training.train` builds it once; the model is built from that same object),
    or the flat dict a checkpoint stores (`hyper_parameters["model"]`, as Lightning rebuilds the module from it). The
    checkpoint keeps the config as that flat dict, so the model can be rebuilt from the checkpoint alone.
    """

    def __init__(
        self,
        model: ModelConfig | Mapping[str, Any],
        optim: Mapping[str, Any],
        distill: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model if isinstance(model, ModelConfig) else ModelConfig.from_saved(model)
        self.save_hyperparameters(
            {
                "model": self.model_config.to_dict(),
                "optim": dict(optim),
                "distill": None if distill is None else dict(distill),
            }
        )
        self.optim_config = OptimConfig.from_dict(optim)
        self.distill_config = DistillConfig.from_dict(distill)
        self.model = build_model(self.model_config)
        # A separate teacher is frozen and not part of this module's state (checkpoints hold the student only);
        # None with distillation on means the student's own dense pass.
        self._teacher: list[LanguageModel] = []
        if self.distill_config.enabled and self.distill_config.teacher != "self":
            self._teacher.append(load_teacher(self.distill_config.teacher))
        if self.model_config.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.model_config.compile:
            # In place (nn.Module.compile), so parameter names and checkpoints stay those of the eager model.
            self.model.compile()
        # Saved into checkpoint["sdt"]: tokenizer, resolved run config, data statistics (set by `sdt.training.train`).
        self.extra_state: dict[str, Any] = {}
        self._last_step_time: float | None = None
        self._val_sums: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        self.model.set_training_progress(min(1.0, self.global_step / max(1, total)))

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (FSDP2 through Lightning's ModelParallelStrategy): shard the model over the
        data-parallel mesh, one unit per layer of the stack (`sdt.training.distributed.shard_model`). Other strategies
        build no device mesh and leave the model as it is."""
        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh["data_parallel"])

    @property
    def teacher_config(self) -> ModelConfig | None:
        """The distillation teacher's config (the student's own for `teacher: self`), None without distillation."""
        if not self.distill_config.enabled:
            return None
        return self._teacher[0].config if self._teacher else self.model_config

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(batch["input_ids"], batch["targets"])
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        if self.distill_config.enabled:
            teacher = self._teacher[0] if self._teacher else None
            t_logits = teacher_logits(teacher, self.model, batch["input_ids"])
            distill = distillation_loss(out.logits, t_logits, self.distill_config.temperature, batch["targets"])
            out.aux_losses["distill"] = distill.detach()
            loss = loss + self.distill_config.weight * distill
        n_tokens = batch["input_ids"].numel()
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n_tokens)
        self.log("train/ppl", torch.exp(out.loss.detach()), batch_size=n_tokens)
        if out.aux_losses:
            self.log("train/total_loss", loss, batch_size=n_tokens)
            for name, value in out.aux_losses.items():
                self.log(f"train/aux/{name}", value, batch_size=n_tokens)
        for name, value in out.stats.items():
            self.log(f"routing/{name}", value, batch_size=n_tokens)
        optimizer = self.trainer.optimizers[0]
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=n_tokens)
        for role, lr in role_learning_rates(optimizer).items():  # optim.group_lr: each role on its own rate
            self.log(f"train/lr/{role}", lr, batch_size=n_tokens)
        self._log_throughput(n_tokens)
        return loss

    def _log_throughput(self, n_tokens: int) -> None:
        # Wall time between consecutive steps, data loading included: what a user's run actually achieves.
        now = time.perf_counter()
        if self._last_step_time is not None:
            tokens = n_tokens * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_time, 1e-9), prog_bar=True)
        self._last_step_time = now

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_sums = {"nll": zero.clone(), "nll_topk": zero.clone(), "tokens": zero.clone()}
        if self.model.is_routed:
            self.calibrate()

    def calibrate(self) -> None:
        """Calibrate causal routing thresholds on the held-out training blocks, so validation (and the checkpoint
        written after it) uses thresholds that execute the configured share of tokens."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader") else None
        if loader is None:
            return
        calibrate_thresholds(self.model, (b["input_ids"].to(self.device) for b in loader))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Routed models are validated in their causal inference mode: that is the model's real perplexity. The
        # non-causal Top-K oracle is logged beside it (val/loss_topk), never instead of it.
        n_tokens = int(batch["input_ids"].numel())
        routing = self.model_config.inference_routing if self.model.is_routed else "topk"
        out = self.model(batch["input_ids"], batch["targets"], routing=routing)
        n = (batch["targets"] != -100).sum()
        self._val_sums["nll"] += out.loss.double() * n
        self._val_sums["tokens"] += n
        for name, value in out.aux_losses.items():
            self.log(f"val/aux/{name}", value, batch_size=n_tokens, sync_dist=True)
        if self.model.is_routed:
            oracle = self.model(batch["input_ids"], batch["targets"], routing="topk")
            self._val_sums["nll_topk"] += oracle.loss.double() * n
            for name, value in out.stats.items():
                if name.endswith("executed_fraction"):
                    self.log(f"val_routing/{name}", value, batch_size=n_tokens, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over all ranks, so perplexity does not depend on how batches were split.
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._val_sums.items()}
        tokens = sums["tokens"].clamp(min=1)
        loss = (sums["nll"] / tokens).float()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        if self.model.is_routed:
            self.log("val/loss_topk", (sums["nll_topk"] / tokens).float())
        self._last_step_time = None  # do not count validation time as a slow training step

    # -------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_config
        optimizer = build_optimizer(self.model, cfg)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Clip each parameter role (backbone, prior, surprise scalars, routers) by its own gradient norm.

        Auxiliary losses live on very different scales (the prior's MSE grows with the residual stream); clipped
        together, a large auxiliary gradient would shrink the language-model gradients of every other parameter.
        FSDP2's sharded gradients are clipped by role too (by their global norm); DeepSpeed keeps its own clipping.
        """
        if not gradient_clip_val:
            return
        if type(self.trainer.strategy).__name__.startswith("DeepSpeed"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        clip_grad_norm_by_role(optimizer, gradient_clip_val)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sdt"] = self.extra_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run has already set its own state (its config may differ, e.g. new data): keep that, so its
        # checkpoints describe how they were trained. Only a bare module takes the checkpoint's.
        if not self.extra_state:
            self.extra_state = checkpoint.get("sdt", {})
        # Checkpoints from before the capacity dial have no quantile grids: resume with them uncalibrated (the
        # next calibration fills them) rather than fail the strict load.
        state = checkpoint.get("state_dict", {})
        for name, buf in self.state_dict().items():
            if name.endswith(".quantiles") and name not in state:
                state[name] = buf
