"""What a run tells its loggers (W&B, CSV) besides metrics: the whole resolved config, and, for W&B, that the run is
over. Inside a Hydra multirun every job runs in the same process, so a W&B run left open would swallow the next job's
metrics (`WandbLogger` reuses a run in progress): each job finishes its own."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def hydra_context() -> dict[str, Any]:
    """How Hydra composed this run: the command-line overrides, the chosen config group options (model, data,
    trainer, experiment, ...) and, inside a multirun, the sweep dir and this job's number. Empty outside Hydra."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    context: dict[str, Any] = {
        "overrides": list(hc.overrides.task),
        "choices": {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra/")},
    }
    if hc.mode == RunMode.MULTIRUN:
        context["sweep_dir"] = hc.sweep.dir
        context["job_num"] = hc.job.num
    return context


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config (model, data, optim, trainer, callbacks, logger, paths, ...) plus `hydra`: how it was
    composed (`hydra_context`)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    context = hydra_context()
    if context:
        config["hydra"] = context
    return config


def log_run_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    """Every logger gets the whole config (W&B: the run config; CSV: hparams.yaml). The LightningModule's own
    hyper-parameters, logged by Lightning at fit start, then replace `model`, `optim` and `distill` with the values
    the model was really built from (e.g. the vocabulary size the data decided)."""
    config = run_config(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(config)


def finish_loggers(trainer: L.Trainer, failed: bool) -> None:
    """End this job's W&B run, marked failed when the job raised, so the next job of a sweep starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            # The logger keeps the finished run: were it cleared, a late log call would open a new, stray run.
            logger._experiment.finish(exit_code=1 if failed else 0)
